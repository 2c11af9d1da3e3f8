"""What other threads tell the task manager: one small typed event each, posted to the one inbox.

Caller threads (the executor's methods), done-callbacks of dependencies and of child tasks
(whatever thread runs them), process reapers and SSH host threads never touch the manager's
tables; they build one of these and call :meth:`Manager.post`, and the manager thread handles
it at its next turn (see ``Manager._drain_inbox``, which dispatches on the type). New tasks go
into the same inbox as :class:`~distexec.scheduler.Task` objects, not wrapped, because there
is one per ``submit()``.

An event that wants an answer carries a ``reply`` future, which the manager settles.
"""

from __future__ import annotations

import signal
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..launchers.base import Launcher, WorkerProcess


class _Event:
    """Plain classes with slots rather than dataclasses: importing thirteen dataclasses cost
    about 6 ms of every executor's start."""

    __slots__: tuple[str, ...] = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Shutdown(_Event):
    """``shutdown()``: take no new task; with ``cancel_futures``, cancel the queued ones."""

    __slots__ = ("cancel_futures",)

    def __init__(self, cancel_futures: bool) -> None:
        self.cancel_futures = cancel_futures


class Terminate(_Event):
    """Stop every task and worker now (``shutdown(cancel_running=True)``, ``terminate_workers``,
    ``kill_workers``); ``sig`` is the signal local workers are sent."""

    __slots__ = ("reason", "sig")

    def __init__(self, reason: str, sig: int = signal.SIGKILL) -> None:
        self.reason = reason
        self.sig = sig


class Abort(_Event):
    """``abort(future)``: stop one task wherever it is; the reply says whether it did."""

    __slots__ = ("task_id", "reply")

    def __init__(self, task_id: int, reply: Future[Any]) -> None:
        self.task_id = task_id
        self.reply = reply


class Resize(_Event):
    """``resize(n)``: the number of local workers to keep."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class Query(_Event):
    """``workers()``: the reply is a list of worker snapshots."""

    __slots__ = ("reply",)

    def __init__(self, reply: Future[Any]) -> None:
        self.reply = reply


class Status(_Event):
    """``status()``: the reply is (counts per tag, worker snapshots)."""

    __slots__ = ("reply",)

    def __init__(self, reply: Future[Any]) -> None:
        self.reply = reply


class Barrier(_Event):
    """``barrier()``: reply once every task submitted before ``task_id`` has ended."""

    __slots__ = ("task_id", "reply")

    def __init__(self, task_id: int, reply: Future[Any]) -> None:
        self.task_id = task_id
        self.reply = reply


class DependencyDone(_Event):
    """A future that task ``task_id`` depends on is done (from its done-callback)."""

    __slots__ = ("task_id",)

    def __init__(self, task_id: int) -> None:
        self.task_id = task_id


class Store(_Event):
    """``store(name, value)``: ``payload`` and ``buffers`` are the pickled value."""

    __slots__ = ("name", "payload", "buffers", "reply")

    def __init__(self, name: str, payload: bytes, buffers: list[Any], reply: Future[Any]) -> None:
        self.name = name
        self.payload = payload
        self.buffers = buffers
        self.reply = reply


class Retrieve(_Event):
    """``retrieve(name)``: the reply is (payload, buffers), or KeyError."""

    __slots__ = ("name", "reply")

    def __init__(self, name: str, reply: Future[Any]) -> None:
        self.name = name
        self.reply = reply


class Delete(_Event):
    """``delete(name)``: the reply is None, or KeyError."""

    __slots__ = ("name", "reply")

    def __init__(self, name: str, reply: Future[Any]) -> None:
        self.name = name
        self.reply = reply


class ProcessExited(_Event):
    """A worker process the executor started has exited (from its reaper thread or its
    launcher's thread; pidfds are watched by the manager's selector directly)."""

    __slots__ = ("proc",)

    def __init__(self, proc: WorkerProcess) -> None:
        self.proc = proc


class HostChanged(_Event):
    """A launcher's thread (an SSH host's) reports progress: ``kind`` is "ready" (then
    ``info`` describes the host's interpreter and ``slots`` is how many workers it takes) or
    "failed" (``detail`` says why). The manager thread alone updates the launcher's state."""

    __slots__ = ("kind", "host", "detail", "info", "slots")

    def __init__(self, kind: str, host: Launcher, detail: str,
                 info: dict[str, Any] | None = None, slots: int = 0) -> None:
        self.kind = kind
        self.host = host
        self.detail = detail
        self.info = info
        self.slots = slots
