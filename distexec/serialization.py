"""Turning functions, arguments, results and exceptions into bytes and back. Never touches sockets.

Pickling strategy
-----------------
* Everything uses pickle protocol 5 with out-of-band buffers: an object that exposes its memory
  (a NumPy array, a :class:`pickle.PickleBuffer`) travels as a separate buffer that is written
  straight from, and read straight into, its final memory.
* ``bytes``, ``bytearray`` and contiguous ``memoryview`` objects of at least :data:`OOB_MIN`
  bytes travel out of band too (pickle would copy them into the pickle stream; the C pickler
  offers no hook for built-in types except ``persistent_id``, which costs a call per object,
  so it is switched on only when a quick look at the top of the object finds such a buffer,
  see :func:`_has_big_buffer`). The receiving side reads each buffer straight into what it
  becomes: a read-only one into a new ``bytes`` object, a bytearray's into a ``bytearray``, an
  array's into anonymous memory (see :class:`distexec.protocol.FrameDecoder`), so a large
  ``bytes`` argument or result is copied by the kernel only: never into a pickle, never out of
  a receive buffer.
* The C pickler is tried first because it is several times faster than cloudpickle on plain data.
  Its output is kept only when it pickled nothing *by reference into* ``__main__`` (which a worker
  cannot import) and no module is registered with
  :func:`cloudpickle.register_pickle_by_value`; otherwise, or if it fails, cloudpickle pickles the
  object by value. Lambdas, closures, and functions or classes defined in ``__main__`` or in a
  notebook therefore work everywhere.
* Functions are pickled once per executor and cached (see :class:`FunctionCache`), not once per
  task: ``map`` over a million items pickles its function once.
* Code objects pickled by value keep their file name. cloudpickle 3.1.3 and newer replace
  ``co_filename`` with ``"<dynamic-code>"`` (so that pickles are deterministic); a remote frame of
  a function defined in ``__main__`` or a notebook cell would then name no file and show no
  source line. Our pickler (in :mod:`distexec._cloud`) wraps cloudpickle's code reducer and puts
  the real name back when the code object is rebuilt, so the traceback re-raised here points at the
  script or the notebook cell, whose source lines this process has.

Exceptions
----------
A remote exception is pickled together with its traceback, its ``__cause__``/``__context__``
chain and the members of exception groups, using tblib's reducers in a pickler of our own. The
reducers are installed on that one pickler, never in :mod:`copyreg`, so neither the worker nor the
calling process has its global pickling behaviour changed. The formatted traceback text always
travels alongside, so that an exception that cannot be pickled or unpickled still arrives as a
:class:`~distexec.errors.RemoteError` with everything a human needs.
"""

from __future__ import annotations

import io
import logging
import pickle
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import sys

from .errors import RemoteError

logger = logging.getLogger(__name__)

PROTOCOL = 5
_MAIN_MARKER = b"__main__"
_MP_MARKER = b"multiprocessing"  # in every pickle that holds a multiprocessing object

Payload = tuple[bytes, list[memoryview]]


# Key added to the globals pickled with a function from __main__: {name: version} (see
# MainVersions); no Python identifier can clash with it.
_VERSIONS_KEY = "distexec versions"


class MainVersions:
    """Caller side, one per executor: a version number for each global of ``__main__`` that a
    function pickled by value carries, new whenever the caller has rebound the name since.

    A worker keeps its own value of a global whose version it already has (the initializer may
    have filled the dict or set the placeholder the caller still holds); see
    :class:`MainNamespace`. Holds the objects it has seen, to tell them apart by identity.
    Used by one thread at a time (the constructor, then the manager thread).
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, int]] = {}
        self._next = 1

    def version(self, name: str, value: Any) -> int:
        entry = self._seen.get(name)
        if entry is None or entry[0] is not value:
            entry = self._seen[name] = (value, self._next)
            self._next += 1
        return entry[1]


def _by_value_modules_registered() -> bool:
    # Nobody can have registered a module before cloudpickle was imported (its import is what
    # makes the first pickling by value slower, so it waits until then). cloudpickle keeps the
    # registry in a private module attribute; if that ever moves we simply always take the
    # cloudpickle path, which is correct, only slower.
    module = sys.modules.get("cloudpickle.cloudpickle")
    if module is None:
        return False
    registry = getattr(module, "_PICKLE_BY_VALUE_MODULES", None)
    return registry is None or bool(registry)


def cloud_dumps(obj: Any, buffer_callback: Any = None,
                main_versions: MainVersions | None = None) -> bytes:
    """``cloudpickle.dumps(obj)`` with protocol 5 and file names kept (see
    :mod:`distexec._cloud`); imports cloudpickle on first use."""
    from . import _cloud

    return _cloud.cloud_dumps(obj, buffer_callback, main_versions)


# bytes-like objects at least this large travel out of band (below it, a copy into the pickle
# is cheaper than a buffer of their own).
OOB_MIN = 64 * 1024
# Prefix of a pickle whose bytes-like objects travel out of band: it needs an unpickler with
# persistent_load (see _OOBUnpickler). No pickle starts with it (they start with b"\x80").
OOB_MARK = b"DXOB"
# How much _has_big_buffer looks at: containers in all, items per container.
_SCAN_BUDGET = 256
_SCAN_ITEMS = 64
# At most this many out-of-band buffers per pickle: a payload with more is pickled in band
# (a frame carries at most protocol.MAX_BUFFERS, and results share frames).
MAX_OOB_BUFFERS = 1024


def _has_big_buffer(obj: Any) -> bool:
    """True if ``obj`` is, or near its top holds, a bytes-like object that should travel out
    of band. Looks at no more than _SCAN_BUDGET containers (a few type checks for a task's usual
    arguments, however its containers share items; about 0.5 us for ``((1,), {})``); a buffer
    further in is pickled in band, which is correct, only slower."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= OOB_MIN
    if t is memoryview:
        return True
    if t is not tuple and t is not list and t is not dict:
        return False
    todo = [obj]
    budget = _SCAN_BUDGET
    while todo:
        items = todo.pop()
        if type(items) is dict:
            if len(items) > _SCAN_ITEMS:
                continue
            items = items.values()
        elif len(items) > _SCAN_ITEMS:
            items = items[:8]
        for item in items:
            it = type(item)
            if it is int or it is str or it is float or item is None:
                continue
            if it is tuple or it is list or it is dict:
                if item:
                    budget -= 1
                    if budget < 0:
                        return False
                    todo.append(item)
            elif it is bytes or it is bytearray:
                if len(item) >= OOB_MIN:
                    return True
            elif it is memoryview:
                return True
    return False


class OOBPicklerMixin:
    """``persistent_id`` that sends large bytes-like objects out of band (see the module doc).

    The buffers go to the same list as the pickle's other out-of-band buffers, in the order the
    pickle meets them, which is the order the unpickler meets them again (:class:`_OOBLoader`).
    """

    def _setup_oob(self, out: list[Any]) -> None:
        self._oob_out = out
        # id -> (the object, kept alive so that its id is not reused, and its persistent id)
        self._oob_ids: dict[int, tuple[Any, Any]] = {}

    def persistent_id(self, obj: Any) -> Any:
        t = type(obj)
        if t is bytes or t is bytearray:
            if len(obj) < OOB_MIN:
                return None
            kind: tuple[Any, ...] = ("b",) if t is bytes else ("a",)
        elif t is memoryview:
            kind = ("m", obj.format, obj.shape)
        else:
            return None
        known = self._oob_ids.get(id(obj))
        if known is not None:
            return known[1]
        if len(self._oob_out) >= MAX_OOB_BUFFERS:
            return None  # in band from here on (a memoryview then fails, as with pickle)
        if t is bytes:
            view = memoryview(obj)
        elif t is bytearray:
            # A copy, taken now: the caller may change or resize it before it is sent (as a
            # bytes object in band would have been copied too).
            view = memoryview(bytearray(obj))
        elif obj.c_contiguous:
            view = obj
        else:  # strided: a contiguous copy of what it shows, as writable as it was
            copy = obj.tobytes()
            view = memoryview(copy if obj.readonly else bytearray(copy))
        self._oob_out.append(view.cast("B") if view.ndim != 1 or view.format != "B" else view)
        pid = (len(self._oob_ids), *kind)
        self._oob_ids[id(obj)] = (obj, pid)
        return pid


class _OOBPickler(OOBPicklerMixin, pickle.Pickler):
    pass


def _oob_dumps(obj: Any, main_versions: MainVersions | None) -> Payload:
    """:func:`dumps` for an object holding large bytes-like objects: they go out of band."""
    out: list[Any] = []

    def add(buf: pickle.PickleBuffer) -> None:
        out.append(buf.raw())

    if not _by_value_modules_registered():
        with io.BytesIO() as file:
            file.write(OOB_MARK)
            try:
                pickler = _OOBPickler(file, protocol=PROTOCOL, buffer_callback=add)
                pickler._setup_oob(out)
                pickler.dump(obj)
            except Exception:
                pass
            else:
                data = file.getvalue()
                if _MAIN_MARKER not in data:
                    return data, out
        out.clear()
    from . import _cloud

    return _cloud.cloud_dumps_oob(obj, add, out, main_versions), out


def dumps(obj: Any, main_versions: MainVersions | None = None) -> Payload:
    """Pickle ``obj``; return the pickle and its out-of-band buffers (as byte views)."""
    if _has_big_buffer(obj):
        data, views = _oob_dumps(obj, main_versions)
    else:
        data, views = _dumps(obj, main_versions, True)
    if len(views) > MAX_OOB_BUFFERS:  # thousands of arrays: in band
        return _dumps(obj, main_versions, False)
    return data, views


def _dumps(obj: Any, main_versions: MainVersions | None, oob: bool) -> Payload:
    """The C pickler when it can, else cloudpickle; with ``oob``, buffers out of band."""
    buffers: list[pickle.PickleBuffer] = []
    callback = buffers.append if oob else None
    if not _by_value_modules_registered():
        try:
            fast = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
        except Exception:
            pass
        else:
            if _MAIN_MARKER not in fast:
                return fast, [b.raw() for b in buffers]
        buffers.clear()
    data = cloud_dumps(obj, callback, main_versions)
    return data, [b.raw() for b in buffers]


def nbytes(data: Any, buffers: Any = ()) -> int:
    """Bytes of a pickle and its out-of-band buffers: what a message carries for it."""
    return len(data) + sum(memoryview(b).nbytes for b in buffers)


def dumps_inband(obj: Any, main_versions: MainVersions | None = None) -> bytes:
    """Pickle ``obj`` into one byte string (used for functions and small control data); with
    ``main_versions``, the ``__main__`` globals it carries are versioned (see
    :class:`MainNamespace`)."""
    return _dumps(obj, main_versions, False)[0]


def loads(data: Any, buffers: Any = ()) -> Any:
    """Inverse of :func:`dumps`."""
    if data[:4] == OOB_MARK:
        return _OOBUnpickler(_after_mark(data), buffers).load()
    return pickle.loads(data, buffers=buffers)


def _after_mark(data: Any) -> io.BytesIO:
    return io.BytesIO(memoryview(data)[len(OOB_MARK):])


class _OOBLoader:
    """``persistent_load`` for :class:`OOBPicklerMixin`'s ids. The out-of-band buffers are
    taken from one iterator, shared with the unpickler's own ``NEXT_BUFFER`` opcodes, in the
    order the pickle meets them."""

    def _setup_oob(self, buffers: Any) -> Any:
        self._oob_iter = iter(buffers)
        self._oob_loaded: dict[int, Any] = {}
        return self._oob_iter

    def persistent_load(self, pid: Any) -> Any:
        try:
            index, kind = pid[0], pid[1]
        except (TypeError, IndexError):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}") from None
        obj = self._oob_loaded.get(index)
        if obj is not None:
            return obj
        try:
            buf = next(self._oob_iter)
        except StopIteration:
            raise pickle.UnpicklingError("the pickle refers to more out-of-band buffers than "
                                         "arrived with it") from None
        if kind == "b":
            obj = buf if type(buf) is bytes else bytes(buf)
        elif kind == "a":
            obj = buf if type(buf) is bytearray else bytearray(buf)
        elif kind == "m":
            view = memoryview(buf)
            try:
                obj = view.cast("B").cast(pid[2], pid[3])
            except (TypeError, ValueError):  # a format cast() cannot make: plain bytes
                obj = view
        else:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        self._oob_loaded[index] = obj
        return obj


class _OOBUnpickler(_OOBLoader, pickle.Unpickler):
    def __init__(self, file: Any, buffers: Any) -> None:
        super().__init__(file, buffers=self._setup_oob(buffers))


# ---------------------------------------------------------------------------- __main__
_MISSING = object()


class MainNamespace:
    """Worker side: one namespace for every function pickled by value from the caller's
    ``__main__`` (a script or a notebook), as that module would be in a worker of
    ProcessPoolExecutor.

    cloudpickle rebuilds each pickled function with a globals dict of its own, so a global that
    the initializer sets (``global queue; queue = q``) or fills (``STATE["db"] = ...``) would be
    invisible to the tasks. Here all of them share :attr:`ns`, and a global arriving with a
    function replaces the worker's value of that name only if the caller has rebound the name
    since the worker got it (a new version, see :class:`MainVersions`): a notebook cell that
    set ``N = 20`` reaches the workers, while the caller's placeholder (``queue = None``, an
    empty ``STATE``) does not undo what the initializer or a task did to it. Without versions
    (a child task's function, pickled by its parent), a name that code on the worker rebound is
    kept. Main thread of the worker only.
    """

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {"__name__": "__main__"}
        # Called once, before the first pickle that mentions multiprocessing is loaded (the
        # worker installs the caller's multiprocessing authkey then, see distexec.worker).
        self.before_multiprocessing: Callable[[], None] | None = None
        self._installed: dict[str, Any] = {}  # name -> the object a pickle put there
        self._versions: dict[str, int] = {}  # name -> the caller's version of that object

    def make_function(self, code: Any, globals_: dict[str, Any], name: str, argdefs: Any,
                      closure: Any) -> Any:
        if globals_.get("__name__") == "__main__":
            for key, value in globals_.items():
                self.ns.setdefault(key, value)
            globals_ = self.ns
        from cloudpickle import cloudpickle  # imported already: the pickle refers to it

        return cloudpickle._make_function(code, globals_, name, argdefs, closure)

    def function_setstate(self, obj: Any, state: Any) -> Any:
        if obj.__globals__ is self.ns:
            incoming = state[1].get("__globals__") or {}
            versions = incoming.pop(_VERSIONS_KEY, None)
            ns, installed, have = self.ns, self._installed, self._versions
            for key in list(incoming):
                current = ns.get(key, _MISSING)
                if versions is not None and key in versions:
                    if current is not _MISSING and have.get(key) == versions[key]:
                        del incoming[key]  # the object the worker has, perhaps changed here
                        continue
                    have[key] = versions[key]
                elif current is not _MISSING and installed.get(key, _MISSING) is not current:
                    del incoming[key]  # rebound by code that ran here: keep it
                    continue
                installed[key] = incoming[key]
        from cloudpickle import cloudpickle

        return cloudpickle._function_setstate(obj, state)


class _MainUnpickler(_OOBLoader, pickle.Unpickler):
    def __init__(self, file: Any, main: MainNamespace, buffers: Any) -> None:
        super().__init__(file, buffers=self._setup_oob(buffers))
        self._main = main

    def find_class(self, module: str, name: str) -> Any:
        if module == "cloudpickle.cloudpickle":
            if name == "_make_function":
                return self._main.make_function
            if name == "_function_setstate":
                return self._main.function_setstate
        return super().find_class(module, name)


def loads_into(main: MainNamespace, data: Any, buffers: Any = ()) -> Any:
    """:func:`loads`, with functions from the caller's ``__main__`` sharing ``main``'s globals."""
    if main.before_multiprocessing is not None and _MP_MARKER in data:
        hook, main.before_multiprocessing = main.before_multiprocessing, None
        hook()
    if _MAIN_MARKER not in data:
        return loads(data, buffers)
    file = _after_mark(data) if data[:4] == OOB_MARK else io.BytesIO(data)
    return _MainUnpickler(file, main, buffers).load()


class Pickled:
    """Something already pickled elsewhere (a child task's function or arguments, pickled by
    the task that submitted it): the task manager passes it on without unpickling it."""

    __slots__ = ("data", "buffers", "__qualname__")

    def __init__(self, data: Any, buffers: list[Any], name: str = "") -> None:
        self.data = data
        self.buffers = buffers
        self.__qualname__ = name  # what describe_callable() shows for a child's function


# ---------------------------------------------------------------------------- functions
class FunctionCache:
    """Client-side cache: function object -> (function id, pickled bytes). Manager thread only.

    Only plain functions are cached, keyed by identity: a bound method or a ``functools.partial``
    carries state that may change between submissions, so those are pickled with every task.
    A cached function is captured as it was when its first task was sent to a worker (for a
    function pickled by value, that includes the globals it reads).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Callable[..., Any], tuple[int, bytes]] = OrderedDict()
        self._next_id = 1

    def lookup(self, fn: Callable[..., Any]) -> tuple[int, bytes] | None:
        """Return (fn_id, bytes) if ``fn`` is cached, else None."""
        if type(fn) is not types.FunctionType and type(fn) is not types.BuiltinFunctionType:
            return None
        entry = self._entries.get(fn)
        if entry is not None:
            self._entries.move_to_end(fn)
        return entry

    def add(self, fn: Callable[..., Any], data: bytes) -> int:
        """Record a freshly pickled function and return its id (0 = not cacheable)."""
        fn_id = self._next_id
        self._next_id += 1
        if type(fn) is types.FunctionType or type(fn) is types.BuiltinFunctionType:
            self._entries[fn] = (fn_id, data)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return fn_id

    def __len__(self) -> int:
        return len(self._entries)


def describe_callable(fn: Any) -> str:
    """A short human name for a task's function, for error messages."""
    if type(fn) is Pickled:
        return fn.__qualname__ or "a child task's function"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return type(fn).__qualname__ + " instance"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


# ---------------------------------------------------------------------------- exceptions
def _exception_types(exc: BaseException, seen: set[int], out: set[type]) -> None:
    if id(exc) in seen:
        return
    seen.add(id(exc))
    out.add(type(exc))
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            _exception_types(linked, seen, out)
    members = getattr(exc, "exceptions", None)
    if isinstance(members, (tuple, list)):
        for member in members:
            if isinstance(member, BaseException):
                _exception_types(member, seen, out)


def _pickle_exception(exc: BaseException) -> bytes:
    from functools import partial

    from tblib import pickling_support

    types_: set[type] = set()
    _exception_types(exc, set(), types_)
    table: dict[type, Any] = {t: _reduce_exception for t in types_}
    table[types.TracebackType] = partial(pickling_support.pickle_traceback, get_locals=None)
    from ._cloud import ExceptionPickler

    buf = io.BytesIO()
    ExceptionPickler(buf, table).dump(exc)
    return buf.getvalue()


def _reduce_exception(exc: BaseException) -> Any:
    """tblib's reducer, except for built-in types, which rebuild faithfully from their args.

    (tblib treats any class with its own ``__init__`` but the default ``__reduce__`` as opaque
    and restores only ``args``; built-ins such as SystemExit would lose ``code`` that way.)
    """
    from tblib import pickling_support

    if type(exc).__module__ != "builtins":
        return pickling_support.pickle_exception(exc)
    reduced: Any = exc.__reduce__()
    func, args, *rest = reduced
    return (
        pickling_support.unpickle_exception,
        (func, args, exc.__cause__, exc.__traceback__, exc.__context__,
         exc.__suppress_context__, getattr(exc, "__notes__", None)),
        *rest,
    )


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` on every supported Python (3.10 keeps the list, unprinted)."""
    add = getattr(exc, "add_note", None)
    if add is not None:
        add(note)
    else:
        notes = getattr(exc, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            try:
                exc.__notes__ = notes  # type: ignore[attr-defined]
            except Exception:
                return
        notes.append(note)


def format_exception(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as err:  # user __str__ or __repr__ may raise anything
        return f"{type(exc).__qualname__}: <could not format the exception: {err!r}>\n"


def qualified_type_name(exc: BaseException) -> str:
    t = type(exc)
    module = getattr(t, "__module__", "builtins")
    return t.__qualname__ if module in ("builtins", "__main__") else f"{module}.{t.__qualname__}"


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException as err:
        return f"<str() of the exception raised {err!r}>"


def dumps_exception(exc: BaseException, note: str | None = None) -> tuple[bytes, str, str, str]:
    """Worker side: pickle a task's exception with its traceback and chain.

    Returns (pickle or b"" if it could not be pickled, type name, message, formatted traceback).
    Never raises: a failure to pickle becomes a :class:`RemoteError` stand-in.
    """
    if note:
        try:
            add_note(exc, note)
        except BaseException:
            pass
    text = format_exception(exc)
    type_name = qualified_type_name(exc)
    message = safe_str(exc)
    try:
        return _pickle_exception(exc), type_name, message, text
    except BaseException as err:
        reason = f"pickling it failed on the worker: {type(err).__name__}: {safe_str(err)}"
    stand_in = RemoteError(type_name, message, text, reason)
    try:
        stand_in.__traceback__ = exc.__traceback__
        return _pickle_exception(stand_in), type_name, message, text
    except BaseException:
        stand_in.__traceback__ = None
        return _pickle_exception(stand_in), type_name, message, text


def loads_exception(
    data: bytes | bytearray | memoryview, type_name: str, message: str, text: str
) -> BaseException:
    """Client side: rebuild a remote exception; never raises, falls back to a stand-in."""
    if data:
        try:
            exc = pickle.loads(data)
        except BaseException as err:
            reason = f"unpickling it failed here: {type(err).__name__}: {safe_str(err)}"
        else:
            if isinstance(exc, BaseException):
                return exc
            reason = f"it unpickled as a {type(exc).__name__}, not an exception"
    else:
        reason = "the worker sent no pickle"
    return RemoteError(type_name, message, text, reason)
