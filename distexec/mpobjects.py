"""multiprocessing objects in tasks and initargs: which workers they can reach, and how.

ProcessPoolExecutor users hand its workers objects of :mod:`multiprocessing`:

* **Objects shared by inheritance** (``Queue``, ``SimpleQueue``, ``JoinableQueue``, ``Lock``,
  ``RLock``, ``Semaphore``, ``Condition``, ``Event``, ``Barrier``, ``Value``, ``Array``,
  ``Pipe`` connections), passed in ``initargs``. They refuse to be pickled except while a
  process is being started ("should only be shared between processes through inheritance"), and
  then they pickle handles that only a child started right then can use: file descriptors it
  inherits, or the names of POSIX semaphores on this machine.
* **Manager proxies** (``Manager().Queue()``, ``.dict()``, ``.Event()``, ...), as arguments or
  initargs. A proxy connects to its manager's server, which admits only processes holding the
  manager's *authkey*: a child of the creating process inherits it
  (``multiprocessing.current_process().authkey``), others are refused ("digest sent was
  rejected").

distexec's local workers are fresh interpreters, not multiprocessing children, so both are done
here by hand, as a spawn start would do them:

* ``initargs`` are pickled once, in the constructor, with multiprocessing's "spawning" state set to
  a stand-in (:class:`_Spawning`) and with multiprocessing's own reducers (those of
  ``ForkingPickler``). The file descriptors the objects hand over are duplicated into descriptors
  the executor owns (:class:`Inheritance`); every local worker started later inherits them, at
  the same numbers, through ``pass_fds``. Semaphores travel by name.
* Each local worker gets the caller's multiprocessing authkey on its stdin (never argv), next to
  the executor's key, and installs it as its own, so proxies pickled as task arguments work.

What cannot work fails at once with an error that names the object and says what to do
instead: an object made in a *fork* context (its semaphore has no name, so no fresh process can
open it); any of them for workers on other hosts or started by hand (descriptors, semaphores and
a manager on this machine's loopback or Unix socket are out of their reach), checked in the
constructor for ``initargs`` and when a task is sent for arguments; and, as with
ProcessPoolExecutor, an inheritance-only object as a task argument.

Nothing here is imported unless initargs or a failed or remote pickle mention multiprocessing.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import weakref
from collections import ChainMap
from dataclasses import dataclass, field
from typing import Any

from . import _cloud, serialization

logger = logging.getLogger(__name__)

# Bytes that appear in any pickle holding a multiprocessing object (its module name).
MARKER = b"multiprocessing"

_CONTEXTS_HINT = ("create it from a spawn or forkserver context, "
                  "multiprocessing.get_context('spawn').Queue() and so on")


class _InheritedFd:
    """A file descriptor a local worker inherits at the same number (pickled in initargs)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        return (_InheritedFd, (self.fd,))

    def detach(self) -> int:
        return self.fd


class _Spawning:
    """What multiprocessing's pickling code asks of the process being started (its "popen")."""

    DupFd = _InheritedFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        # Our own duplicate: the user may close the original while workers are still started.
        dup = os.dup(fd)
        self.fds.append(dup)
        return dup


def _describe(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _proxy_address(proxy: Any) -> Any:
    token = getattr(proxy, "_token", None)
    return getattr(token, "address", None)


def _reachable_from_other_hosts(address: Any) -> bool:
    """Whether a manager at ``address`` can be reached from another machine at all."""
    if not (isinstance(address, tuple) and len(address) == 2 and isinstance(address[0], str)):
        return False  # a Unix socket path (the default) or something unknown
    host = address[0]
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def _survey(obj: Any, found: list[Any], spawning: bool,
            main_versions: serialization.MainVersions | None = None) -> bytes:
    """Pickle ``obj`` noting every multiprocessing object in it (appended to ``found``)."""
    from multiprocessing.reduction import ForkingPickler

    class Survey(_cloud.Pickler):
        # multiprocessing's own reducers (shared ctypes, arenas, connections) come first.
        dispatch_table = (ChainMap(ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
                                                 _cloud.Pickler.dispatch_table)
                          if spawning else _cloud.Pickler.dispatch_table)

        def reducer_override(self, item: Any) -> Any:
            module = getattr(type(item), "__module__", None) or ""
            if module.startswith("multiprocessing"):
                found.append(item)
                semlock = getattr(item, "_semlock", None)
                if spawning and semlock is not None and getattr(semlock, "name", "") is None:
                    raise ForkContextError(item)
            return super().reducer_override(item)

    with io.BytesIO() as file:
        pickler = Survey(file, protocol=serialization.PROTOCOL)
        pickler.main_versions = main_versions
        pickler.dump(obj)
        return file.getvalue()


class ForkContextError(RuntimeError):
    """A multiprocessing object made in a fork context, which no fresh process can open."""

    def __init__(self, obj: Any) -> None:
        super().__init__(
            f"it holds a {_describe(obj)} made in a 'fork' context (on Python before 3.14 the "
            f"default one, multiprocessing.{type(obj).__name__}()): its semaphore has no name, "
            f"so a freshly started worker cannot open it; {_CONTEXTS_HINT}")


def _remote_obstacles(found: list[Any]) -> list[str]:
    """What among ``found`` a worker on another host (or started by hand) cannot use."""
    from multiprocessing.managers import BaseProxy

    out: list[str] = []
    for obj in found:
        if isinstance(obj, BaseProxy):
            address = _proxy_address(obj)
            if not _reachable_from_other_hosts(address):
                out.append(f"a {type(obj).__name__} proxy of a multiprocessing manager at "
                           f"{address!r}, which only processes on this machine can reach")
            else:
                out.append(f"a {type(obj).__name__} proxy of a multiprocessing manager at "
                           f"{address!r}, whose authkey only workers this executor starts on "
                           f"this machine receive")
        elif hasattr(obj, "_semlock") or type(obj).__name__ in ("Queue", "SimpleQueue",
                                                                "JoinableQueue", "Connection"):
            out.append(f"a {_describe(obj)}, which only processes started on this machine can "
                       f"inherit")
        elif type(obj).__module__ == "multiprocessing.shared_memory":
            out.append(f"a {_describe(obj)} ({getattr(obj, 'name', '?')!r}), which lives in "
                       f"this machine's memory")
    return list(dict.fromkeys(out))


_REMOTE_HINT = ("Send the data itself, keep such objects to the workers this executor starts "
                "on this machine, or have the task connect to a server of its own (for "
                "example a multiprocessing.managers.BaseManager at an address and authkey the "
                "host can reach)")


@dataclass
class Inheritance:
    """The pickled initializer and initargs, and the descriptors local workers inherit with
    them (owned here, closed when this object is collected or :meth:`close` is called)."""

    data: bytes
    fds: tuple[int, ...] = ()
    # Why the pickle can only reach workers started on this machine (empty: it can go anywhere).
    local_only: list[str] = field(default_factory=list)
    keep: Any = None  # the initargs, kept alive: their semaphores must outlive every start

    def __post_init__(self) -> None:
        self._finalizer = weakref.finalize(self, _close_fds, self.fds)

    def close(self) -> None:
        self._finalizer()


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def pickle_initializer(initializer: Any, initargs: tuple[Any, ...],
                       main_versions: serialization.MainVersions | None = None) -> Inheritance:
    """Client thread: pickle ``(initializer, initargs)`` for the workers (see the module doc).

    Raises:
        Exception: whatever pickling raised, or :class:`ForkContextError`.
    """
    payload = (initializer, initargs)
    try:
        data = serialization.dumps_inband(payload, main_versions)
    except Exception:
        data = None  # perhaps an object that travels only to a process being started
    if data is not None and MARKER not in data:
        return Inheritance(data)
    from multiprocessing import context

    found: list[Any] = []
    spawning = _Spawning()
    previous = context.get_spawning_popen()
    context.set_spawning_popen(spawning)  # type: ignore[arg-type]
    try:
        data = _survey(payload, found, spawning=True, main_versions=main_versions)
    except BaseException:
        _close_fds(tuple(spawning.fds))
        raise
    finally:
        context.set_spawning_popen(previous)
    local_only = _remote_obstacles(found)
    if spawning.fds and not local_only:
        local_only.append("file descriptors that only processes started on this machine inherit")
    logger.debug("initargs hold %d multiprocessing objects; %d descriptors to inherit",
                 len(found), len(spawning.fds))
    return Inheritance(data, tuple(spawning.fds), local_only, keep=initargs)


def local_only_initargs_error(reasons: list[str], where: str) -> str:
    """The constructor's message when initargs cannot reach the workers it would have."""
    return (f"initargs hold {'; '.join(reasons)}: they can be handed only to workers this "
            f"executor starts on this machine, not to {where}. Give those workers initargs "
            f"without them, or use only local workers (max_workers=N, no hosts or listen). "
            f"{_REMOTE_HINT}")


def check_for_remote(data: Any, obj: Any, worker: str) -> str | None:
    """Manager thread: None if the pickle ``data`` of ``obj`` can go to a worker that is not
    local (``worker`` describes it), else why not and what to do. Cheap unless ``data``
    mentions multiprocessing."""
    if MARKER not in data:
        return None
    found: list[Any] = []
    try:
        _survey(obj, found, spawning=False)
    except BaseException:
        return None  # it pickled once; the worker will report anything else
    obstacles = _remote_obstacles(found)
    if not obstacles:
        return None
    return (f"it holds {'; '.join(obstacles)}, and {worker} is not a worker this executor "
            f"started on this machine. {_REMOTE_HINT}")


def explain_pickling_error(exc: BaseException) -> str | None:
    """A better message for a multiprocessing object refused as a task argument, or None."""
    text = serialization.safe_str(exc)
    if "through inheritance" not in text and not isinstance(exc, ForkContextError):
        return None
    name = text.split(" objects should", 1)[0] if " objects should" in text else "object"
    return (f"It holds a multiprocessing {name}, which can be handed to a worker only when the "
            f"worker starts (as with ProcessPoolExecutor): pass it in initargs= and keep it in "
            f"a global from the initializer (local workers only), or use a "
            f"multiprocessing.Manager() {name}, whose proxy can be passed with any task to "
            f"local workers")
