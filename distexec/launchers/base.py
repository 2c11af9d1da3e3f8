"""The launcher interface: what the task manager needs from a kind of worker.

Two small classes, so that a new kind of worker (a batch scheduler's jobs, say) is one class of
each and no change in the task manager:

* :class:`WorkerProcess` -- the manager's handle on one worker process: how to learn that it
  exited (a descriptor to wait on, or a callback from a thread), how to end it, and what it can
  report (the task it runs, how it exited). Local processes, SSH channels and workers that
  joined by hand each implement it.
* :class:`Launcher` -- one origin of workers (this machine, one SSH host): how to start one, how
  many it wants now, what resources its workers share, and what to do when starts keep failing.

Threads: the manager thread calls everything here except :meth:`WorkerProcess.wait` at teardown
and whatever a launcher runs on its own threads. The fields documented as "manager thread" are
written by the manager thread only; a launcher's own threads report news by posting events
(see :mod:`distexec.manager.events`), never by writing them.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Callable
from typing import Any

__all__ = ["JoinedProcess", "Launcher", "WorkerProcess"]


class WorkerProcess:
    """The task manager's handle on one worker process (defaults suit a remote process).

    Attributes:
        worker_id: the id the manager gave the worker.
        pid: its process id on its host, once known (the worker's handshake tells).
        exit_fd: a descriptor that becomes readable when the process exits (a pidfd), for the
            manager's selector; None: :meth:`watch` reports the exit instead.
        killable: :meth:`kill` ends the process and its exit will be reported. False for a
            worker started by hand: the manager can only disconnect it.
        local_child: a child of this process on this machine: it has this process's
            ``sys.path``, multiprocessing authkey and inherited descriptors, and can be sent
            signals.
        reports_progress: :meth:`running_task` knows exactly which task it is running.
    """

    exit_fd: int | None = None
    killable = True
    local_child = False
    reports_progress = False

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.pid: int | None = None

    def connected(self, pid: int | None) -> None:
        """The worker's handshake named its pid (manager thread)."""
        if self.pid is None:
            self.pid = pid

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait (bounded) for the exit; the exit code, or None if it still runs."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the process (does not wait); its exit is reported as usual."""
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """Send ``sig`` where that is possible; elsewhere SIGTERM and SIGKILL end it."""
        if sig in (_signal.SIGKILL, _signal.SIGTERM):
            self.kill()

    def close(self) -> None:
        """Release what the handle holds; the process ends if it still runs."""

    def describe_exit(self, code: int | None) -> str:
        """How the process ended, for error messages."""
        from .local import describe_exit

        return describe_exit(code)

    def running_task(self) -> tuple[int, int] | None:
        """(task id, attempt) it runs, or None between tasks or when not known."""
        return None

    def watch(self, on_exit: Callable[[Any], None]) -> None:
        """Call ``on_exit(self)`` (from any thread) when the process exits; used when
        :attr:`exit_fd` is None."""
        raise NotImplementedError


class JoinedProcess(WorkerProcess):
    """A worker started by hand (``distexec worker --connect``): no process to watch or kill;
    its connection is all there is, and its end is the end of the connection."""

    killable = False

    def poll(self) -> int | None:
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        return None

    def kill(self) -> None:
        pass  # the manager disconnects it instead

    def signal(self, sig: int) -> None:
        pass

    def describe_exit(self, code: int | None) -> str:
        return "disconnected"

    def watch(self, on_exit: Callable[[Any], None]) -> None:
        pass  # it never reports an exit


class Launcher:
    """One origin of workers: this machine, one SSH host, and the like.

    Attributes (written by the manager thread only):
        label: the origin of its workers, as ``status()`` shows it ("local", a host's label).
        host: the host name of its workers until their handshake says.
        info: what it found out about its hosts (an SSH host: its interpreter's versions).
        state: "starting" (not able to start workers yet), "ready" or "failed".
        wanted: how many workers it should have running while ready.
        not_before: no worker start before this ``time.monotonic()`` value (backoff).
        failures: worker starts in a row that failed (reset by a worker that gets ready).
        error: why it failed, once failed.
        essential: True if repeated start failures break the executor rather than retire
            the launcher (the local launcher: failing local starts mean a broken setup, such
            as an interpreter that cannot run the worker, which no retry fixes).
    """

    essential = False

    def __init__(self, label: str, wanted: int = 0, state: str = "ready") -> None:
        self.label = label
        self.host = label  # the host name its workers' records show until they connect
        self.state = state
        self.wanted = wanted
        self.not_before = 0.0
        self.failures = 0
        self.error: str | None = None
        self.info: dict[str, Any] = {}

    def open(self) -> None:
        """Begin what must happen before workers can start (an SSH host connects and checks
        its interpreter on a thread of its own and then reports, see :attr:`state`)."""

    def start(self, worker_id: int, address: str, key: bytes) -> WorkerProcess:
        """Start one worker that connects to ``address`` with ``key`` (never on a command line).
        Must not block for long. Raises OSError if it cannot even be started."""
        raise NotImplementedError

    def resources(self) -> tuple[dict[str, float | str] | None, int | None]:
        """What its workers share: resources and the number of slots (None: unbounded)."""
        return None, None

    def describe_start(self) -> str:
        """What starts its workers, for the message when starts keep failing."""
        return self.label

    def close(self) -> None:
        """Stop starting workers and release what it holds (manager thread; does not wait)."""

    def join(self, timeout: float) -> None:
        """Wait (bounded) until what :meth:`close` started has finished (teardown)."""
