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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..launchers.local import LocalProcess
    from ..launchers.ssh import SSHHost, SSHProcess


@dataclass(frozen=True, slots=True)
class Shutdown:
    """``shutdown()``: take no new task; with ``cancel_futures``, cancel the queued ones."""

    cancel_futures: bool


@dataclass(frozen=True, slots=True)
class Terminate:
    """Stop every task and worker now (``shutdown(cancel_running=True)``, ``terminate_workers``,
    ``kill_workers``); ``sig`` is the signal local workers are sent."""

    reason: str
    sig: int = signal.SIGKILL


@dataclass(frozen=True, slots=True)
class Abort:
    """``abort(future)``: stop one task wherever it is; the reply says whether it did."""

    task_id: int
    reply: Future[Any]


@dataclass(frozen=True, slots=True)
class Resize:
    """``resize(n)``: the number of local workers to keep."""

    n: int


@dataclass(frozen=True, slots=True)
class Query:
    """``workers()``: the reply is a list of worker snapshots."""

    reply: Future[Any]


@dataclass(frozen=True, slots=True)
class Status:
    """``status()``: the reply is (counts per tag, worker snapshots)."""

    reply: Future[Any]


@dataclass(frozen=True, slots=True)
class Barrier:
    """``barrier()``: reply once every task submitted before ``task_id`` has ended."""

    task_id: int
    reply: Future[Any]


@dataclass(frozen=True, slots=True)
class DependencyDone:
    """A future that task ``task_id`` depends on is done (from its done-callback)."""

    task_id: int


@dataclass(frozen=True, slots=True)
class Store:
    """``store(name, value)``: ``payload`` and ``buffers`` are the pickled value."""

    name: str
    payload: bytes
    buffers: list[Any]
    reply: Future[Any]


@dataclass(frozen=True, slots=True)
class Retrieve:
    """``retrieve(name)``: the reply is (payload, buffers), or KeyError."""

    name: str
    reply: Future[Any]


@dataclass(frozen=True, slots=True)
class Delete:
    """``delete(name)``: the reply is None, or KeyError."""

    name: str
    reply: Future[Any]


@dataclass(frozen=True, slots=True)
class ProcessExited:
    """A worker process the executor started has exited (from its reaper thread or its SSH
    host's thread; pidfds are watched by the manager's selector directly)."""

    proc: LocalProcess | SSHProcess


@dataclass(frozen=True, slots=True)
class HostChanged:
    """An SSH host's thread reports progress: ``kind`` is what happened, ``detail`` says more."""

    kind: str
    host: SSHHost
    detail: str
