"""The task manager's books: task and worker records, their states, and the dispatch policy.

Pure bookkeeping: no sockets, no threads, no clock (callers pass ``now``), no futures completed
here. The task manager thread is the only caller; tests drive it directly.

Task states::

    QUEUED ──► ASSIGNED ──► DONE
      │  ▲        ├───────► FAILED (raised, could not be pickled, ran past its time limit, or
      │  │        │                 its workers were lost more than max_retries times)
      │  └────────┤ (its worker was lost: back to the front of the queue)
      │           └───────► CANCELLED (aborted, or the executor was terminated)
      └──────────────────► CANCELLED (future cancelled or aborted before dispatch) / FAILED

ASSIGNED means "sent to a worker": the worker may be running it or holding it in its prefetch
queue. Every assignment increments the task's ``attempt``; a result must quote the attempt it
belongs to, so a late result from an abandoned attempt is recognised and dropped. Each loss of
the worker that was *running* a task is recorded on the task (:meth:`Scheduler.charge_loss`);
tasks that were only prefetched go back without a charge.

Worker states::

    LAUNCHING ──► CONNECTED ──► IDLE ◄──► BUSY ──► DRAINING ──► GONE
        └────────────┴───────────┴────────┴──────────┴────────► LOST

CONNECTED: handshake done, initializer running. IDLE/BUSY: takes tasks. DRAINING: finishes what
it holds and takes nothing new (``max_tasks_per_child`` reached, or shutdown). GONE: left cleanly.
LOST: died, disconnected or never came up.

Prefetch policy
---------------
A worker is sent more than one task at a time only when tasks are short: the window is sized so
that what a worker holds beyond its running task amounts to about ``PREFETCH_TARGET`` seconds of
work (by a moving average of the durations it reported). Long tasks are therefore handed out one
at a time (nothing hoarded, nothing to re-run when a worker dies), while no-op tasks travel in
batches of up to ``MAX_WINDOW``. A task with a time limit goes only to a worker that holds
nothing else, and that worker gets nothing more until it is done, so that the time it has been
assigned is the time it has been running.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from .errors import LostAttempt

__all__ = ["Scheduler", "Task", "TaskKind", "TaskState", "WorkerRecord", "WorkerState"]

# Seconds of queued work a worker may hold besides the one it runs. Larger: fewer round trips for
# short tasks; smaller: less imbalance at the end of a run and less work re-run on a crash.
PREFETCH_TARGET = 0.005
# Upper bound on tasks held by one worker (also bounds the size of one TASKS frame).
MAX_WINDOW = 512
# Weight of the newest duration in the moving average.
EWMA_ALPHA = 0.2


class TaskState(enum.Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskKind(enum.IntEnum):
    CALL = 0  # fn(*args, **kwargs)
    CHUNK = 1  # [fn(*a) for a in args]  (map with chunksize > 1)


_TASK_EDGES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.ASSIGNED, TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.ASSIGNED: frozenset(
        {TaskState.DONE, TaskState.FAILED, TaskState.QUEUED, TaskState.CANCELLED}
    ),
    TaskState.DONE: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


class WorkerState(enum.Enum):
    LAUNCHING = "launching"
    CONNECTED = "connected"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    GONE = "gone"
    LOST = "lost"


_LIVE = frozenset({WorkerState.IDLE, WorkerState.BUSY})
_WORKER_EDGES: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.LAUNCHING: frozenset({WorkerState.CONNECTED, WorkerState.LOST, WorkerState.GONE}),
    WorkerState.CONNECTED: frozenset({WorkerState.IDLE, WorkerState.LOST, WorkerState.DRAINING}),
    WorkerState.IDLE: frozenset({WorkerState.BUSY, WorkerState.DRAINING, WorkerState.LOST}),
    WorkerState.BUSY: frozenset({WorkerState.IDLE, WorkerState.DRAINING, WorkerState.LOST}),
    WorkerState.DRAINING: frozenset({WorkerState.GONE, WorkerState.LOST}),
    WorkerState.GONE: frozenset(),
    WorkerState.LOST: frozenset(),
}


_ENDED_INDEX = {TaskState.DONE: 0, TaskState.FAILED: 1, TaskState.CANCELLED: 2}


class InvalidTransition(RuntimeError):
    """A state change the diagrams above do not allow: a bug in distexec."""


class Task:
    """One unit of work. Created in the caller's thread, owned by the manager thread after that."""

    __slots__ = ("id", "future", "fn", "args", "kwargs", "kind", "state", "attempt", "worker_id",
                 "time_limit", "max_retries", "losses", "tag")

    def __init__(
        self,
        task_id: int,
        future: Future[Any],
        fn: Callable[..., Any],
        args: Any,
        kwargs: dict[str, Any] | None,
        kind: TaskKind = TaskKind.CALL,
        time_limit: float | None = None,
        max_retries: int | None = None,
        tag: Any = None,
    ) -> None:
        self.id = task_id
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.kind = kind
        self.state = TaskState.QUEUED
        self.attempt = 0
        self.worker_id: int | None = None
        self.time_limit = time_limit  # seconds, or None
        self.max_retries = max_retries  # None: the executor's default
        self.losses: list[LostAttempt] | None = None
        self.tag = tag  # any hashable; status counts are kept per tag

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.state.value} attempt={self.attempt}>"

    def transition(self, new: TaskState) -> None:
        if new not in _TASK_EDGES[self.state]:
            raise InvalidTransition(f"task {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    def release(self) -> None:
        """Drop references to user objects once the task is finished (frees memory early)."""
        self.fn = None  # type: ignore[assignment]
        self.args = None
        self.kwargs = None


class WorkerRecord:
    """What the manager knows about one worker."""

    __slots__ = (
        "id", "state", "host", "pid", "assigned", "tasks_sent", "max_tasks", "ewma",
        "started_at", "connected_at", "info", "exitcode", "reason", "limited", "local",
        "tasks_done", "blocked", "origin",
    )

    def __init__(self, worker_id: int, host: str, max_tasks: int | None, now: float) -> None:
        self.id = worker_id
        self.state = WorkerState.LAUNCHING
        self.host = host
        self.pid: int | None = None
        self.assigned: dict[int, Task] = {}  # insertion order = order sent
        self.tasks_sent = 0
        self.max_tasks = max_tasks
        self.ewma: float | None = None
        self.started_at = now
        self.connected_at: float | None = None
        self.info: dict[str, Any] = {}
        self.exitcode: int | None = None
        self.reason: str | None = None
        self.limited = 0  # assigned tasks with a time limit (such a worker takes nothing more)
        self.local = True  # started by this executor on this machine
        self.origin = "local"  # "local", the label of the SSH host it runs on, or "joined"
        self.tasks_done = 0
        # Sent no new task while set: an ABORT awaits its answer, or the worker is dying.
        self.blocked = False

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.state.value} host={self.host} pid={self.pid}>"

    def transition(self, new: WorkerState) -> None:
        if new not in _WORKER_EDGES[self.state]:
            raise InvalidTransition(f"worker {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def window(self) -> int:
        """How many tasks this worker may hold at once (running + prefetched)."""
        if self.blocked:
            return 0
        if self.limited:
            return 1
        if self.ewma is None or self.ewma >= PREFETCH_TARGET:
            window = 1
        else:
            window = min(MAX_WINDOW, 1 + math.ceil(PREFETCH_TARGET / max(self.ewma, 1e-7)))
        if self.max_tasks is not None:
            window = min(window, self.max_tasks - self.tasks_sent + len(self.assigned))
        return window

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        return f"worker {self.id} ({pid} on {self.host})"


class Scheduler:
    """Task and worker tables plus the dispatch policy. Manager thread only."""

    def __init__(self) -> None:
        self.tasks: dict[int, Task] = {}
        self.queue: deque[Task] = deque()
        self.workers: dict[int, WorkerRecord] = {}
        # Per tag: [done, failed, cancelled]. Queued and assigned tasks are counted only when
        # asked (tag_counts), so that the per-task cost is one counter, at the end.
        self.tag_ended: dict[Any, list[int]] = {}

    def tag_counts(self) -> dict[Any, tuple[int, int, int, int, int]]:
        """Per tag: (queued, assigned, done, failed, cancelled). O(pending tasks)."""
        live: dict[Any, list[int]] = {}
        for task in self.tasks.values():
            counts = live.get(task.tag)
            if counts is None:
                counts = live[task.tag] = [0, 0]
            counts[task.state is not TaskState.QUEUED] += 1
        out = {}
        for tag in live.keys() | self.tag_ended.keys():
            queued, assigned = live.get(tag, (0, 0))
            done, failed, cancelled = self.tag_ended.get(tag, (0, 0, 0))
            out[tag] = (queued, assigned, done, failed, cancelled)
        return out

    # -- tasks ---------------------------------------------------------------------------
    def add_task(self, task: Task) -> None:
        self.tasks[task.id] = task
        self.queue.append(task)

    def has_work(self) -> bool:
        """True while any task is queued or assigned."""
        return bool(self.tasks)

    def _unassign(self, task: Task) -> None:
        worker = self.workers.get(task.worker_id) if task.worker_id is not None else None
        if worker is not None and worker.assigned.pop(task.id, None) is not None:
            if task.time_limit is not None:
                worker.limited -= 1
            if worker.state is WorkerState.BUSY and not worker.assigned:
                worker.transition(WorkerState.IDLE)

    def _finish(self, task: Task, state: TaskState) -> None:
        task.transition(state)
        ended = self.tag_ended.get(task.tag)
        if ended is None:
            ended = self.tag_ended[task.tag] = [0, 0, 0]
        ended[_ENDED_INDEX[state]] += 1
        del self.tasks[task.id]
        if task.worker_id is not None:
            self._unassign(task)
        task.release()

    def cancel_queued(self) -> list[Task]:
        """Take every queued task out (shutdown with cancel_futures); caller cancels futures."""
        out = list(self.queue)
        self.queue.clear()
        for task in out:
            self._finish(task, TaskState.CANCELLED)
        return out

    def result_arrived(
        self, worker_id: int, task_id: int, attempt: int, duration: float, ok: bool
    ) -> Task | None:
        """Record a result; return the task, or None if the result is stale (drop it)."""
        task = self.tasks.get(task_id)
        if (
            task is None
            or task.state is not TaskState.ASSIGNED
            or task.attempt != attempt
            or task.worker_id != worker_id
        ):
            return None
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.tasks_done += 1
            if duration >= 0:
                worker.ewma = (
                    duration if worker.ewma is None
                    else EWMA_ALPHA * duration + (1 - EWMA_ALPHA) * worker.ewma
                )
        self._finish(task, TaskState.DONE if ok else TaskState.FAILED)
        return task

    # -- workers -------------------------------------------------------------------------
    def add_worker(
        self, worker_id: int, host: str, max_tasks: int | None, now: float
    ) -> WorkerRecord:
        record = WorkerRecord(worker_id, host, max_tasks, now)
        self.workers[worker_id] = record
        return record

    def live_workers(self) -> Iterator[WorkerRecord]:
        over = (WorkerState.GONE, WorkerState.LOST)
        return (w for w in self.workers.values() if w.state not in over)

    def worker_ready(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        worker.transition(WorkerState.IDLE)

    def worker_lost(self, worker_id: int) -> list[Task]:
        """Mark a worker lost; return the tasks it held (ASSIGNED still, for the caller)."""
        worker = self.workers[worker_id]
        if worker.state is not WorkerState.LOST:
            worker.transition(WorkerState.LOST)
        held = list(worker.assigned.values())
        return held

    def requeue(self, task: Task) -> None:
        """Put an assigned task back at the front of the queue (its worker was lost first)."""
        self._unassign(task)
        task.transition(TaskState.QUEUED)
        task.worker_id = None
        self.queue.appendleft(task)

    def fail_task(self, task: Task) -> None:
        """Settle an assigned task as failed (its worker was lost)."""
        self._finish(task, TaskState.FAILED)

    def stop_task(self, task: Task, state: TaskState) -> None:
        """Settle a queued or assigned task as CANCELLED (aborted) or FAILED (time limit)."""
        if task.state is TaskState.QUEUED:
            try:
                self.queue.remove(task)
            except ValueError:
                pass
        self._finish(task, state)

    @staticmethod
    def charge_loss(task: Task, lost: LostAttempt, default_max_retries: int) -> bool:
        """Record that ``task`` was running on a worker that was lost. True: it may run again;
        False: it was lost more than its ``max_retries`` allows (a poison task)."""
        if task.losses is None:
            task.losses = []
        task.losses.append(lost)
        limit = default_max_retries if task.max_retries is None else task.max_retries
        return len(task.losses) <= limit

    def forget_worker(self, worker_id: int) -> None:
        self.workers.pop(worker_id, None)

    def drain(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        if worker.state in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.CONNECTED):
            worker.transition(WorkerState.DRAINING)

    # -- dispatch ------------------------------------------------------------------------
    def plan(self, claim: Callable[[Task], bool]) -> list[tuple[WorkerRecord, list[Task]]]:
        """Assign queued tasks to workers with room, round-robin, one task per worker per pass.

        ``claim(task)`` is asked before a task is assigned; False means the task was cancelled in
        the meantime and it is dropped. A task coming back after a lost worker (attempt > 0)
        was claimed before and is not asked again. Returns the new assignments per worker, in order.
        """
        queue = self.queue
        if not queue:
            return []
        ready = [w for w in self.workers.values()
                 if w.state in _LIVE and len(w.assigned) < w.window]
        if not ready:
            return []
        batches: dict[int, list[Task]] = {}
        windows = {w.id: w.window for w in ready}
        while queue and ready:
            still: list[WorkerRecord] = []
            for worker in ready:
                task = None
                while queue:
                    candidate = queue[0]
                    if candidate.time_limit is not None and worker.assigned:
                        break  # it needs a worker of its own; this one holds tasks
                    queue.popleft()
                    if candidate.attempt or claim(candidate):
                        task = candidate
                        break
                    self._finish(candidate, TaskState.CANCELLED)
                if task is None:
                    continue
                task.transition(TaskState.ASSIGNED)
                task.attempt += 1
                task.worker_id = worker.id
                worker.assigned[task.id] = task
                worker.tasks_sent += 1
                batches.setdefault(worker.id, []).append(task)
                if worker.state is WorkerState.IDLE:
                    worker.transition(WorkerState.BUSY)
                if task.time_limit is not None:
                    worker.limited += 1  # nothing more for this worker while it runs
                if worker.max_tasks is not None and worker.tasks_sent >= worker.max_tasks:
                    worker.transition(WorkerState.DRAINING)
                elif not worker.limited and len(worker.assigned) < windows[worker.id]:
                    still.append(worker)
            ready = still
        return [(self.workers[wid], tasks) for wid, tasks in batches.items()]

    # -- status --------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        assigned = sum(len(w.assigned) for w in self.workers.values())
        return {
            "queued": len(self.queue),
            "assigned": assigned,
            "finished": sum(ended[0] for ended in self.tag_ended.values()),
            "failed": sum(ended[1] for ended in self.tag_ended.values()),
            "cancelled": sum(ended[2] for ended in self.tag_ended.values()),
        }
