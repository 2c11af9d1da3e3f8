"""The exceptions distexec raises.

The tree is rooted in the standard library wherever the standard library already has the concept,
so that code written for :mod:`concurrent.futures` keeps catching what it expects::

    Exception
     ├── DistexecError                        root of everything distexec defines
     │    ├── WorkerLostError                 a task's workers kept dying or vanishing while
     │    │                                   running it (also concurrent.futures.process.
     │    │                                   BrokenProcessPool)
     │    ├── TaskTimeoutError                a task ran past its time limit (also TimeoutError)
     │    ├── DependencyError                 a future a task depends on failed or was cancelled
     │    ├── TaskDeclined                    raised by a task to decline its worker
     │    │                                   (distexec.decline()); the future fails with it
     │    │                                   only once every worker has declined the task
     │    ├── RemoteError                     stand-in for a remote exception that could not travel
     │    ├── ProtocolError                   bad bytes on a distexec connection
     │    │    └── HandshakeError             a peer failed authentication or version checks
     │    ├── TaskPicklingError               (also pickle.PicklingError)
     │    └── TaskUnpicklingError             (also pickle.UnpicklingError)
     └── RuntimeError
          └── concurrent.futures.BrokenExecutor
               ├── concurrent.futures.process.BrokenProcessPool
               │    └── WorkerLostError        (see above)
               └── BrokenDistributedExecutor  (also DistexecError) the executor cannot run tasks

*Closed* versus *broken*: an executor you shut down refuses new work with the standard
``RuntimeError('cannot schedule new futures after shutdown')``; an executor that something outside
your control made unusable (an initializer that raised, workers that cannot start, an internal
error) raises :class:`BrokenDistributedExecutor`, whose ``__cause__`` says why.

A worker that dies while running a task costs that task a retry: it runs again on another
worker. Only a task whose workers are lost more than ``max_retries`` times fails, with
:class:`WorkerLostError` listing every attempt; the executor replaces the workers and carries on.
``WorkerLostError`` is also a :class:`~concurrent.futures.process.BrokenProcessPool`, so code
written for ProcessPoolExecutor that catches that error keeps working; unlike there, the
executor stays usable.
"""

from __future__ import annotations

import pickle
from concurrent.futures import BrokenExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

__all__ = [
    "BrokenDistributedExecutor",
    "DependencyError",
    "DistexecError",
    "HandshakeError",
    "LostAttempt",
    "ProtocolError",
    "RemoteError",
    "TaskDeclined",
    "TaskPicklingError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "WorkerLostError",
]


class DistexecError(Exception):
    """Base class of every exception defined by distexec."""


class BrokenDistributedExecutor(BrokenExecutor, DistexecError):
    """The executor can no longer run tasks.

    Raised by :meth:`~distexec.DistributedExecutor.submit` once the executor is broken, and set on
    every future that was still pending when it broke. The ``__cause__`` carries the reason, for
    example the exception an ``initializer`` raised on a worker.
    """


class LostAttempt(NamedTuple):
    """One attempt at running a task that ended with its worker lost.

    Attributes:
        attempt: the attempt number (1 for the first run).
        worker_id: the executor's number for the worker.
        host: the host the worker ran on.
        pid: the worker's process id on that host, if known.
        exitcode: the process exit code, ``-N`` when signal ``N`` killed it, ``None`` if unknown
            (a worker started by hand, or one that vanished with its connection). A local
            worker declared lost for missing its heartbeats is killed, so it reports ``-9``.
        reason: what happened, in words, with a hint where there is one.
    """

    attempt: int
    worker_id: int
    host: str
    pid: int | None
    exitcode: int | None
    reason: str

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        return f"attempt {self.attempt} on worker {self.worker_id} ({pid} on {self.host}): " \
               f"{self.reason}"


# WorkerLostError is a BrokenProcessPool, whose module imports multiprocessing: it lives in
# distexec._lost and is loaded at first use, so that a worker process (which never raises it)
# does not pay for multiprocessing at startup.
if TYPE_CHECKING:
    from ._lost import WorkerLostError as WorkerLostError


def __getattr__(name: str) -> Any:
    if name == "WorkerLostError":
        from ._lost import WorkerLostError

        globals()[name] = WorkerLostError
        return WorkerLostError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



class TaskTimeoutError(DistexecError, TimeoutError):
    """A task ran longer than its ``time_limit``; its worker was stopped and replaced.

    The message names the task, the worker and, when the worker reported it, the line the task
    was executing when the limit expired. A timed-out task is not retried.
    """


class RemoteError(DistexecError):
    """Stand-in for a remote exception that could not be pickled or unpickled.

    It keeps everything that could be kept: the remote exception's qualified type name, its
    message (``str(exc)``), the full formatted remote traceback (also shown when this error is
    printed) and the reason the original could not travel.

    Attributes:
        type_name: qualified name of the remote exception's type, e.g. ``"mymod.MyError"``.
        message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback, formatted as the worker saw it.
        reason: why the original exception could not be transported.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str, reason: str) -> None:
        super().__init__(type_name, message, remote_traceback, reason)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"{self.type_name}: {self.message}\n"
            f"(the original exception could not be transported: {self.reason})\n"
            f"Remote traceback:\n{self.remote_traceback.rstrip()}"
        )


class ProtocolError(DistexecError):
    """Bytes on a distexec connection did not follow the protocol (see :mod:`distexec.protocol`)."""


class HandshakeError(ProtocolError):
    """A peer failed the handshake: wrong key, other protocol version or mismatched versions."""


class TaskPicklingError(DistexecError, pickle.PicklingError):
    """A task's function, arguments or result could not be pickled.

    Only that task's future fails; the executor keeps working. The message names the task and
    what could not be pickled, and ``__cause__`` holds the pickler's own error.
    """


class MessageTooLargeError(DistexecError, ValueError):
    """A task's function and arguments, its result, its exception, a child task or shared
    data would make a message larger than the executor's ``max_message_size``.

    It is raised (or fails the one future concerned) where the message is made, before
    anything is sent: the executor and its workers are unaffected. ``size`` and ``limit`` are
    in bytes. Raise ``max_message_size=`` on :class:`~distexec.DistributedExecutor`, or move the
    data another way (a file or object store the workers read, or smaller pieces).
    """

    def __init__(self, message: str, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.size, self.limit))


def too_large(what: str, size: int, limit: int) -> MessageTooLargeError:
    """The error for ``what`` (e.g. "the result of task 3 (f)") being ``size`` bytes."""
    return MessageTooLargeError(
        f"{what} is {_size(size)} pickled, more than the limit of {_size(limit)} set by "
        f"max_message_size={limit}. Raise max_message_size= on DistributedExecutor (every "
        "message of that size is held in memory on both sides), or move the data another "
        "way: a file or object store that the workers read, or smaller pieces",
        size, limit)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


class TaskUnpicklingError(DistexecError, pickle.UnpicklingError):
    """Something a task needs could not be unpickled where it is needed.

    In the calling process: the task's result; typically its type lives in a module that the
    calling process cannot import, and ``__cause__`` holds the unpickler's own error. On the
    worker: rebuilding the task's function and arguments did not finish within the executor's
    ``unpickle_timeout`` (something in them blocks while it is unpickled); the remote
    traceback shows where it was stuck. (Other errors raised while a worker unpickles a task
    reach the caller as they are, with a note saying so.)
    """


class DependencyError(DistexecError):
    """A task was not run because a future it depends on failed or was cancelled.

    The ``__cause__`` is the dependency's exception (a
    :class:`~concurrent.futures.CancelledError` if it was cancelled).
    """


class TaskDeclined(DistexecError):
    """Raised inside a task (by :func:`distexec.decline`) to give the task back: it returns to
    the queue and runs on another worker; the one that declined it never gets it again.

    A future fails with this error only when every live worker has declined its task.
    """
