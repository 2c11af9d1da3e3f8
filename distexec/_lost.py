"""WorkerLostError, loaded at first use (see :mod:`distexec.errors`, where it belongs)."""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

from .errors import DistexecError, LostAttempt


class WorkerLostError(DistexecError, BrokenProcessPool):
    """A task's worker died or vanished while running it, more often than the task may retry.

    The message lists every attempt. The attributes describe the last one; :attr:`attempts` has
    them all.

    Attributes:
        worker_id: the executor's number for the last worker.
        host: the host the last worker ran on.
        pid: the last worker's process id on that host, if known.
        exitcode: the last worker's exit code, or ``-N`` when signal ``N`` killed it; ``None`` if
            unknown.
        attempts: every lost attempt, oldest first (:class:`LostAttempt`).
    """

    def __init__(
        self,
        message: str,
        *,
        worker_id: int | None = None,
        host: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        attempts: tuple[LostAttempt, ...] = (),
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.host = host
        self.pid = pid
        self.exitcode = exitcode
        self.attempts = tuple(attempts)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_worker_lost,
            (self.args[0], self.worker_id, self.host, self.pid, self.exitcode,
             tuple(tuple(a) for a in self.attempts)),
        )


def _rebuild_worker_lost(
    message: str, worker_id: int | None, host: str | None, pid: int | None, exitcode: int | None,
    attempts: tuple[tuple[object, ...], ...] = (),
) -> WorkerLostError:
    return WorkerLostError(message, worker_id=worker_id, host=host, pid=pid, exitcode=exitcode,
                           attempts=tuple(LostAttempt(*a) for a in attempts))  # type: ignore[arg-type]


WorkerLostError.__module__ = "distexec.errors"
