"""One worker's life as the task manager sees it: a checked state machine, and what its end means.

Owns :class:`WorkerHandle` (the manager's handles on one worker: its process, its connections,
its caches) and :class:`Life` (what the worker is doing, in the manager's eyes). Pure: no
sockets, no clock, no threads; the manager thread is the only caller.

Life states::

    STARTING ──► READY ◄──► ABORTING (an ABORT awaits its answer: back where it was)
       │           │  ▲
       │           ▼  │
       │        RETIRING (finishes what it holds, then is told to leave)
       │           │
       ├───────────┴──► LEAVING (told to leave, or ended while the executor stops)
       ├───────────────► STOPPING (killed by the executor: a stopped task)
       └───────────────► SILENT (declared lost for missing heartbeats) ──► ZOMBIE (it cannot
                            be killed: connections kept, what it sends dropped) ──► BURIED
    every state but ZOMBIE and BURIED ──► ENDED (its books are settled)

The scheduler's :class:`~distexec.scheduler.WorkerState` says what a worker can be given
(LAUNCHING, CONNECTED, IDLE, BUSY, DRAINING, GONE, LOST); ``Life`` says what the manager has
done to it and why, which decides what its end means: a clean leave, a failed start (counted
towards breaking the executor), a start interrupted from outside (retried with backoff), a loss
charged to the task it ran, or a loss nobody is charged for (the executor stopped it).

Besides the state, a handle records facts that outlive a state: ``exited`` (the process's exit
status) and ``disconnected`` (its main connection ended, and why), which arrive in either order
(a worker is over when both are known, or when it is declared lost); and ``stopped``, set while
the executor stops a task on it (ABORTING, STOPPING) and kept if the worker moves on before it
answers (told to leave, declared lost), so that its end charges no task whatever state it ends
in.
"""

from __future__ import annotations

import enum
import os
import signal
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..launchers.base import WorkerProcess
    from ..scheduler import WorkerRecord
    from .connections import Conn

__all__ = ["Ending", "InvalidLifeTransition", "Life", "WorkerHandle", "verdict", "what_ended"]


class Life(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    ABORTING = "aborting"
    STOPPING = "stopping"
    LEAVING = "leaving"
    SILENT = "silent"
    ZOMBIE = "zombie"
    ENDED = "ended"
    BURIED = "buried"


_OUT = frozenset({Life.STOPPING, Life.LEAVING, Life.SILENT, Life.ENDED})
EDGES: dict[Life, frozenset[Life]] = {
    Life.STARTING: _OUT | {Life.READY, Life.RETIRING},
    Life.READY: _OUT | {Life.RETIRING, Life.ABORTING},
    Life.RETIRING: _OUT | {Life.ABORTING},
    Life.ABORTING: _OUT | {Life.READY, Life.RETIRING},
    Life.STOPPING: frozenset({Life.ENDED}),
    Life.LEAVING: frozenset({Life.STOPPING, Life.SILENT, Life.ENDED}),
    Life.SILENT: frozenset({Life.ENDED, Life.ZOMBIE}),
    Life.ZOMBIE: frozenset({Life.BURIED}),
    Life.ENDED: frozenset(),
    Life.BURIED: frozenset(),
}
# No new task while in these states (nor once its connection is gone).
_PAUSED = frozenset({Life.ABORTING, Life.STOPPING, Life.SILENT})
# States in which the executor stops the worker on purpose (see WorkerHandle.stopped).
STOPPED_BY_US = frozenset({Life.ABORTING, Life.STOPPING})


class InvalidLifeTransition(RuntimeError):
    """A change of life the diagram above does not allow: a bug in distexec."""


class WorkerHandle:
    """The manager's handles on one worker: its record, process, connections and caches."""

    __slots__ = ("worker_id", "record", "proc", "life", "resume", "reason", "exited",
                 "disconnected", "stopped", "bad_frame", "conn", "ctrl", "client", "known_fns",
                 "last_seen", "lost_at", "dump", "main_thread", "on_dump", "aborts", "limit",
                 "limit_timer")

    def __init__(self, record: WorkerRecord, proc: WorkerProcess) -> None:
        self.worker_id = record.id
        self.record = record
        self.proc = proc
        self.life = Life.STARTING
        self.resume = Life.READY  # where an ABORTING worker goes back to
        # Why the executor refused, stopped or declared lost this worker (for its end's message).
        self.reason: str | None = None
        self.exited = not proc.killable  # a worker started by hand has no exit to wait for
        self.disconnected: str | None = None  # why its main connection ended, once it did
        # Set while the executor is stopping a task on it (ABORTING, STOPPING) and kept if it
        # moves on (told to leave, declared lost) before answering: its end charges no task.
        self.stopped: str | None = None
        self.bad_frame = False  # dropped for a frame that could not be taken: charge a task
        self.conn: Conn | None = None  # the main connection (tasks and results)
        self.ctrl: Conn | None = None  # the control connection (heartbeats, ABORT, DUMP)
        self.client: Conn | None = None  # the client connection, if its tasks opened one
        self.known_fns: OrderedDict[int, None] = OrderedDict()  # function ids it holds
        self.last_seen = 0.0  # monotonic time of the last byte from either connection
        self.lost_at = 0.0
        self.dump = b""  # newest control-channel text (stack dumps it was asked for)
        self.main_thread: int | None = None  # the worker's main thread id, as in the dumps
        self.on_dump: Callable[[], None] | None = None  # waiting for a requested stack dump
        self.aborts: set[tuple[int, int]] = set()  # (task id, attempt) of unanswered ABORTs
        self.limit: tuple[int, int, float] | None = None  # time-limited task, its deadline
        self.limit_timer = False  # a deadline entry for `limit` is armed

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.worker_id} {self.life.value}>"

    def to(self, new: Life, reason: str | None = None) -> None:
        """Change life, checked against :data:`EDGES`; ``reason`` says why (kept for the end's
        message). Going back to READY or RETIRING (an ABORT answered) forgets the reason."""
        if new not in EDGES[self.life]:
            raise InvalidLifeTransition(
                f"worker {self.worker_id}: {self.life.value} -> {new.value}")
        if new is Life.ABORTING:
            self.resume = self.life
        self.life = new
        if reason is not None:
            self.reason = reason
        if new in STOPPED_BY_US:
            self.stopped = reason or self.reason
        elif new in (Life.READY, Life.RETIRING):
            self.reason = None
            self.stopped = None
        self._pause()

    def carry_on(self) -> None:
        """The worker answered every ABORT with "not started": an ordinary worker again."""
        if self.life is Life.ABORTING:
            self.to(self.resume)
        elif self.life is not Life.STOPPING:
            self.stopped = None
            self._pause()

    def lose_connection(self, why: str) -> None:
        """Its main connection ended: nothing more can reach it."""
        if self.disconnected is None:
            self.disconnected = why
        self._pause()

    def _pause(self) -> None:
        self.record.set_paused(self.life in _PAUSED or self.disconnected is not None
                               or self.stopped is not None)

    @property
    def staying(self) -> bool:
        """Counted among the workers its launcher wants (not on its way out)."""
        return self.life in (Life.STARTING, Life.READY) or (
            self.life is Life.ABORTING and self.resume is Life.READY)

    @property
    def over(self) -> bool:
        return self.life in (Life.ENDED, Life.ZOMBIE, Life.BURIED)

    def main_stack(self) -> str | None:
        """The worker's main-thread stack from its newest complete dump, or None."""
        text = self.dump.decode("ascii", "replace")
        dumps = text.split("Timeout (")
        if len(dumps) < 2 or self.main_thread is None:
            return None
        marker = f"hread 0x{self.main_thread:016x} "
        for dump in reversed(dumps[1:]):
            at = dump.find(marker)
            if at < 0:
                continue
            end = dump.find("\n\n", at)
            lines = []
            for line in dump[at:end if end >= 0 else len(dump)].splitlines()[1:]:
                if _WORKER_FRAME in line or line.startswith("End of requested dump"):
                    break  # distexec's own frames below the task's: not of interest
                lines.append(line)
            return "\n".join(lines) if lines else None
        return None


_WORKER_FRAME = os.path.join("distexec", "worker.py") + '"'

# Signals a process raises against itself when it fails: a death by one of these during start-up
# is the worker's own failure. Any other signal came from outside.
SELF_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT",
                                       "SIGSYS", "SIGTRAP", "SIGXCPU", "SIGXFSZ")
    if hasattr(signal, name))


class Ending(enum.Enum):
    """What a worker's end means (see :func:`verdict`)."""

    START_FAILED = "start failed"  # counts towards giving up on its launcher
    START_INTERRUPTED = "start interrupted"  # killed from outside while starting: retry later
    START_ABANDONED = "start abandoned"  # the executor no longer wanted it: nothing to say
    LEFT = "left"  # a clean leave
    LOST = "lost"  # a loss: re-queue what it held, charge the task it ran


def verdict(handle: WorkerHandle, exitcode: int | None, *, started: bool, terminating: bool,
            wanted: bool) -> Ending:
    """What the end of ``handle``'s worker means.

    ``started``: it got ready for tasks; ``terminating``: the executor is stopping everything;
    ``wanted``: workers are still needed (tasks remain, or the executor is not shutting down).
    """
    life = handle.life
    if not started:
        if terminating or not wanted or life in (Life.RETIRING, Life.STOPPING, Life.LEAVING):
            return Ending.START_ABANDONED
        if (handle.proc.local_child and handle.reason is None and exitcode is not None
                and exitcode < 0 and -exitcode not in SELF_SIGNALS):
            return Ending.START_INTERRUPTED  # a signal it did not raise, and not from us
        return Ending.START_FAILED
    leaving = life is Life.LEAVING or (terminating and life is Life.STOPPING)
    if (leaving and not handle.record.assigned
            and (exitcode is None or exitcode == 0 or terminating)):
        return Ending.LEFT
    return Ending.LOST


def what_ended(handle: WorkerHandle, exitcode: int | None, started: bool) -> str:
    """The end of a worker in words, for its loss or failed start."""
    proc = handle.proc
    if not started:
        what = (proc.describe_exit(exitcode) if proc.killable
                else handle.disconnected or "connection lost")
        if handle.life is Life.SILENT:
            return handle.reason or what
        if handle.reason:  # refused or timed out (only ever for workers we started)
            return f"{handle.reason} ({what})"
        stage = ("before connecting" if handle.conn is None
                 else "while starting up (in the initializer or before it)")
        return f"worker {handle.worker_id} (pid {handle.record.pid}) exited {stage}: {what}"
    if handle.life in (Life.SILENT, Life.ZOMBIE):
        return (handle.reason or "declared lost") + ("; it was killed" if proc.killable else "")
    if handle.bad_frame and handle.disconnected:
        return handle.disconnected
    if handle.stopped:
        return handle.stopped
    if proc.killable:
        return proc.describe_exit(exitcode)
    return handle.reason or handle.disconnected or "connection lost"

