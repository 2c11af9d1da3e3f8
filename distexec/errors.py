"""The exceptions distexec raises.

The tree is rooted in the standard library wherever the standard library already has the concept,
so that code written for :mod:`concurrent.futures` keeps catching what it expects::

    Exception
     ├── DistexecError                        root of everything distexec defines
     │    ├── WorkerLostError                 a task's worker died or vanished while holding it
     │    │                                   (also concurrent.futures.process.BrokenProcessPool)
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

A worker that dies while running a task fails only that task's future, with
:class:`WorkerLostError`; the executor replaces the worker and carries on. ``WorkerLostError`` is
also a :class:`~concurrent.futures.process.BrokenProcessPool`, so code written for
ProcessPoolExecutor that catches that error keeps working; unlike there, the executor stays usable.
"""

from __future__ import annotations

import pickle
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "BrokenDistributedExecutor",
    "DistexecError",
    "HandshakeError",
    "ProtocolError",
    "RemoteError",
    "TaskPicklingError",
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


class WorkerLostError(DistexecError, BrokenProcessPool):
    """The worker running a task died or disconnected before returning a result.

    Attributes:
        worker_id: the executor's number for the worker.
        host: the host the worker ran on.
        pid: the worker's process id on that host, if known.
        exitcode: the process exit code, or ``-N`` when signal ``N`` killed it; ``None`` if unknown.
    """

    def __init__(
        self,
        message: str,
        *,
        worker_id: int | None = None,
        host: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.host = host
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_worker_lost,
            (self.args[0], self.worker_id, self.host, self.pid, self.exitcode),
        )


def _rebuild_worker_lost(
    message: str, worker_id: int | None, host: str | None, pid: int | None, exitcode: int | None
) -> WorkerLostError:
    return WorkerLostError(message, worker_id=worker_id, host=host, pid=pid, exitcode=exitcode)


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


class TaskUnpicklingError(DistexecError, pickle.UnpicklingError):
    """A task's result could not be unpickled in the calling process.

    Typically the result's type lives in a module that the calling process cannot import.
    ``__cause__`` holds the unpickler's own error.
    """
