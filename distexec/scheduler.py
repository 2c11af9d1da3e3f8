"""The task manager's books: task and worker records, their states, and the dispatch policy.

Pure bookkeeping: no sockets, no threads, no clock (callers pass ``now``), no futures completed
here. The task manager thread is the only caller; tests drive it directly.

Task states::

    BLOCKED (waiting for the futures it depends on) ──► QUEUED / FAILED / CANCELLED
    QUEUED ──► ASSIGNED ──► DONE
      │  ▲        ├───────► FAILED (raised, could not be pickled, ran past its time limit, or
      │  │        │                 its workers were lost more than max_retries times)
      │  └────────┤ (its worker was lost, it raised an exception it is retried on, or it
      │           │  declined the worker: back to the queue)
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
assigned is the time it has been running. The same holds for a task that needs resources
(its worker's pool lends them exactly while it runs) and for a task submitted by another task
(it must be either queued, where its parent can claim it to run inline, or running).

Placement
---------
Workers belong to a resource pool: the local workers share one (the executor's ``resources``),
the workers on one SSH host share that host's (its ``slots`` and ``key=value`` settings), and
a worker started by hand has its own (``--resources``). A pool has numeric capacities (``slots``,
``gpu=2``, ``mem=64``) and text labels (``zone=a``). A task's needs fit a worker when each
numeric need is at most what its pool has free and each label matches. ``slots`` is special:
every worker of the pool that holds a task uses one, and a task needing ``slots=k`` uses k.

Which queued task a worker with room gets is decided by a :class:`Policy` (one method, tested
on its own); the default takes the highest priority first, then the oldest task, among those
that fit the worker. The queue keeps one FIFO per (priority, needs) class, so that choice
costs one look per class, not one per queued task.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from .errors import LostAttempt

__all__ = ["Needs", "Policy", "Pool", "Scheduler", "Task", "TaskKind", "TaskQueue", "TaskState",
           "WorkerRecord", "WorkerState"]

# Task ids, for every executor of this process (itertools.count is atomic under the GIL).
task_ids = itertools.count(1)

# Seconds of queued work a worker may hold besides the one it runs. Larger: fewer round trips for
# short tasks; smaller: less imbalance at the end of a run and less work re-run on a crash.
PREFETCH_TARGET = 0.005
# Upper bound on tasks held by one worker (also bounds the size of one TASKS frame).
MAX_WINDOW = 512
# Weight of the newest duration in the moving average.
EWMA_ALPHA = 0.2


class TaskState(enum.Enum):
    BLOCKED = "blocked"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskKind(enum.IntEnum):
    CALL = 0  # fn(*args, **kwargs)
    CHUNK = 1  # [fn(*a) for a in args]  (map with chunksize > 1)


_TASK_EDGES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.BLOCKED: frozenset({TaskState.QUEUED, TaskState.CANCELLED, TaskState.FAILED}),
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
_LIVE_OR_DRAINING = frozenset({WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING})
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


class _Extras:
    """The options and history of a task that has any (most tasks have none: a plain task
    keeps one empty slot for all of them, which keeps the memory of a queued task small)."""

    __slots__ = ("time_limit", "max_retries", "losses", "priority", "needs", "exclusive",
                 "declined", "retry_on", "fallback", "errors", "deps", "client", "parent")

    def __init__(self) -> None:
        self.time_limit: float | None = None  # seconds, or None
        self.max_retries: int | None = None  # None: the executor's default
        self.losses: list[LostAttempt] | None = None
        self.priority = 0  # higher runs first
        self.needs: Needs | None = None  # resources it needs from its worker's pool
        # Sent only to a worker that holds nothing else, which then gets nothing more until it
        # is done: time limits and resources count from the moment it is sent.
        self.exclusive = False
        self.declined: set[int] | None = None  # workers that declined it
        self.retry_on: tuple[type[BaseException], ...] | None = None  # re-run on these
        self.fallback: Callable[..., Any] | None = None  # runs once every attempt failed
        self.errors = 0  # attempts that raised an exception it is retried on
        self.deps: list[Future[Any]] | None = None  # futures to resolve before it is queued
        self.client: Any = None  # (connection, request id) of a task submitted by a task
        self.parent: int | None = None  # run inline: the id of the task waiting for it


def _extra(name: str, doc: str) -> property:
    """A Task attribute kept in its _Extras (read: the default when there are none)."""
    default = getattr(_Extras(), name)

    def get(task: Task) -> Any:
        x = task.extras
        return default if x is None else getattr(x, name)

    def set_(task: Task, value: Any) -> None:
        x = task.extras
        if x is None:
            if value is default or value == default and type(value) is type(default):
                return
            x = task.extras = _Extras()
        setattr(x, name, value)

    return property(get, set_, doc=doc)


class Task:
    """One unit of work. Created in the caller's thread, owned by the manager thread after that.

    The options and history most tasks do not have live in ``extras`` (None for a plain task); the
    properties below read and write them. Hot paths test ``task.extras is None`` first.
    """

    __slots__ = ("id", "future", "fn", "args", "kwargs", "kind", "state", "attempt", "worker_id",
                 "tag", "line", "extras")

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
        priority: int = 0,
        needs: Needs | None = None,
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
        self.tag = tag  # any hashable; status counts are kept per tag
        self.line: Any = None  # the TaskQueue line it waits in, while queued
        self.extras: _Extras | None = None
        if time_limit is not None or max_retries is not None or priority or needs is not None:
            x = self.extras = _Extras()
            x.time_limit = time_limit
            x.max_retries = max_retries
            x.priority = priority
            x.needs = needs
            x.exclusive = time_limit is not None or needs is not None

    time_limit = _extra("time_limit", "Seconds it may run, or None.")
    max_retries = _extra("max_retries", "Re-runs allowed; None: the executor's default.")
    losses = _extra("losses", "The attempts that ended with their worker lost.")
    priority = _extra("priority", "Higher runs first.")
    needs = _extra("needs", "What it needs from its worker's pool, or None.")
    exclusive = _extra("exclusive", "Sent only to a worker holding nothing else.")
    declined = _extra("declined", "The workers that declined it.")
    retry_on = _extra("retry_on", "Exception types after which it runs again.")
    fallback = _extra("fallback", "Called once every attempt failed.")
    errors = _extra("errors", "Attempts that raised an exception it is retried on.")
    deps = _extra("deps", "Futures to resolve before it is queued.")
    client = _extra("client", "(connection, request id) of a child task.")
    parent = _extra("parent", "Run inline: the id of the task waiting for it.")

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
        x = self.extras
        if x is not None:
            x.fallback = None
            x.deps = None

    def retries_used(self) -> int:
        """Re-runs so far: for lost workers and for exceptions it is retried on."""
        x = self.extras
        if x is None:
            return 0
        return x.errors + (len(x.losses) if x.losses else 0)


class Needs:
    """What a task needs from its worker's pool: numeric amounts and text labels."""

    __slots__ = ("amounts", "labels", "key")

    def __init__(self, spec: dict[str, float | int | str]) -> None:
        amounts: dict[str, float] = {}
        labels: dict[str, str] = {}
        for name, value in spec.items():
            if isinstance(value, str):
                labels[name] = value
            else:
                amounts[name] = float(value)
        self.amounts = amounts
        self.labels = labels
        # Tasks with equal needs share a queue class.
        self.key = (tuple(sorted(amounts.items())), tuple(sorted(labels.items())))

    def __repr__(self) -> str:
        parts = [f"{k}={v:g}" for k, v in sorted(self.amounts.items())]
        parts += [f"{k}={v}" for k, v in sorted(self.labels.items())]
        return ", ".join(parts)


class Pool:
    """Resources shared by a group of workers (the local ones, one SSH host, one joined
    worker). Capacities are fixed while the pool lives; ``used`` follows the tasks that
    needed something from it, from dispatch until they end."""

    __slots__ = ("name", "amounts", "labels", "used", "workers", "slot_extra")

    def __init__(self, name: str, spec: dict[str, float | int | str] | None = None,
                 slots: int | None = None) -> None:
        self.name = name
        needs = Needs(dict(spec or {}))
        self.amounts = needs.amounts
        self.labels = needs.labels
        if slots is not None:
            self.amounts["slots"] = float(slots)
        self.used: dict[str, float] = {}
        self.workers: set[WorkerRecord] = set()
        self.slot_extra = 0.0  # slots beyond one used by tasks that need several

    def __repr__(self) -> str:
        return f"<Pool {self.name} {self.amounts} {self.labels}>"

    def describe(self) -> dict[str, float | str]:
        out: dict[str, float | str] = dict(self.amounts)
        out.update(self.labels)
        return out

    def free_slots(self) -> float:
        busy = sum(1 for w in self.workers if w.assigned and w.state in _LIVE_OR_DRAINING)
        return self.amounts.get("slots", math.inf) - busy - self.slot_extra

    def _labels_match(self, needs: Needs) -> bool:
        return all(self.labels.get(name) == value for name, value in needs.labels.items())

    def could_ever_fit(self, needs: Needs) -> bool:
        """True if an idle pool could run a task with these needs."""
        return self._labels_match(needs) and all(self.amounts.get(name, 0.0) >= amount
                   for name, amount in needs.amounts.items())

    def fits(self, needs: Needs, idle_worker: bool) -> bool:
        """True if the pool has what ``needs`` asks for, free now."""
        if not self._labels_match(needs):
            return False
        for name, amount in needs.amounts.items():
            if name == "slots":
                # The worker taking the task counts as one busy slot already if it holds
                # something; an idle one is about to become busy.
                free = self.free_slots() - (1 if idle_worker else 0)
                if free < amount - 1:
                    return False
            elif self.amounts.get(name, 0.0) - self.used.get(name, 0.0) < amount:
                return False
        return True

    def take(self, needs: Needs) -> None:
        used = self.used
        for name, amount in needs.amounts.items():
            if name == "slots":
                self.slot_extra += amount - 1
            else:
                used[name] = used.get(name, 0.0) + amount

    def give_back(self, needs: Needs) -> None:
        used = self.used
        for name, amount in needs.amounts.items():
            if name == "slots":
                self.slot_extra -= amount - 1
            else:
                used[name] = used.get(name, 0.0) - amount


class TaskQueue:
    """Queued tasks, one FIFO per (priority, needs) class, plus the tasks some worker declined.

    The common case, every task with priority 0 and no needs, uses only ``main``. A task in
    another line records it (``Task.line``; None means ``main``), so taking it out never
    depends on options that may change while it waits (a failed task turned into its fallback).
    """

    __slots__ = ("main", "classes", "order", "declined", "_len")

    def __init__(self) -> None:
        self.main: deque[Task] = deque()
        # Class key -> FIFO, and the keys sorted: highest priority first, tasks without needs
        # before tasks with needs. A class is dropped when it empties (except main).
        self.classes: dict[tuple[Any, ...], deque[Task]] = {_MAIN_KEY: self.main}
        self.order: list[tuple[Any, ...]] = [_MAIN_KEY]
        self.declined: list[Task] = []  # scanned in full: a worker must skip what it declined
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Task]:
        for key in self.order:
            yield from self.classes[key]
        yield from self.declined

    def simple(self) -> bool:
        """Only plain tasks are queued (the fast path)."""
        return len(self.main) == self._len

    def _line(self, task: Task) -> deque[Task] | list[Task]:
        x = task.extras
        if x is None or (x.priority == 0 and x.needs is None and not x.declined):
            return self.main
        if x.declined:
            return self.declined
        key = (-x.priority, x.needs is not None, x.needs.key if x.needs is not None else ())
        fifo = self.classes.get(key)
        if fifo is None:
            fifo = self.classes[key] = deque()
            bisect.insort(self.order, key)
        return fifo

    def append(self, task: Task) -> None:
        self._len += 1
        if task.extras is None:
            self.main.append(task)
            return
        line = self._line(task)
        task.line = None if line is self.main else line
        line.append(task)

    def appendleft(self, task: Task) -> None:
        self._len += 1
        if task.extras is None:
            self.main.appendleft(task)
            return
        line = self._line(task)
        task.line = None if line is self.main else line
        if line is self.declined:
            self.declined.insert(0, task)
        else:
            line.appendleft(task)  # type: ignore[union-attr]

    def remove(self, task: Task) -> None:
        """Take a task out wherever it is (ValueError if it is not queued)."""
        line = task.line if task.line is not None else self.main
        line.remove(task)
        self._taken(task, line)

    def take(self, task: Task) -> None:
        """Take out a task that :meth:`Policy.pick` returned (usually the head of its FIFO)."""
        line = task.line if task.line is not None else self.main
        if line and line[0] is task and line is not self.declined:
            line.popleft()
        else:
            line.remove(task)
        self._taken(task, line)

    def _taken(self, task: Task, line: deque[Task] | list[Task]) -> None:
        task.line = None
        self._len -= 1
        if not line and line is not self.main and line is not self.declined:
            for key in self.order:
                if self.classes[key] is line:
                    del self.classes[key]
                    self.order.remove(key)
                    break

    def clear(self) -> list[Task]:
        out = list(self)
        for task in out:
            task.line = None
        self.main.clear()
        self.classes = {_MAIN_KEY: self.main}
        self.order = [_MAIN_KEY]
        self.declined.clear()
        self._len = 0
        return out


_MAIN_KEY: tuple[Any, ...] = (0, False, ())


class Policy:
    """Which queued task a worker with room gets next: the scheduling policy.

    Replace it by subclassing and passing an instance to :class:`Scheduler`. ``pick`` must
    return a task for which ``scheduler.fits(task, worker)`` holds (or None), and leave the
    queue unchanged; the scheduler takes the task out and assigns it.
    """

    def pick(self, scheduler: Scheduler, worker: WorkerRecord) -> Task | None:
        """Default: the highest priority first, then the oldest, among tasks that fit.

        One exception keeps wide tasks from starving: when the best-ranked task that does not
        fit needs several ``slots`` of this worker's pool, and the pool could run it once
        enough of its workers are free, this worker takes nothing ranked below it (the slots
        drain instead of being refilled by smaller tasks).
        """
        queue = scheduler.queue
        fits = scheduler.fits
        if queue.simple():
            head = queue.main[0]
            return head if fits(head, worker) else None
        best: Task | None = None
        reserve: Task | None = None  # a wide task this worker's pool is saving slots for
        pool = worker.pool
        for key in queue.order:
            fifo = queue.classes[key]
            if not fifo:
                continue
            head = fifo[0]
            if best is not None and head.priority < best.priority:
                break  # classes are sorted by priority: nothing better follows
            if best is not None and not (head.priority > best.priority or head.id < best.id):
                continue
            if fits(head, worker):
                best = head
            elif (reserve is None and pool is not None and head.needs is not None
                  and head.needs.amounts.get("slots", 1.0) > 1
                  and pool.could_ever_fit(head.needs)):
                reserve = head
        for task in queue.declined:
            if (best is None or task.priority > best.priority
                    or (task.priority == best.priority and task.id < best.id)) \
                    and fits(task, worker):
                best = task
        if reserve is not None and (best is None or reserve.priority > best.priority or (
                reserve.priority == best.priority and reserve.id < best.id)):
            return None
        return best


class WorkerRecord:
    """What the manager knows about one worker."""

    __slots__ = (
        "id", "state", "host", "pid", "assigned", "tasks_sent", "max_tasks", "ewma", "limited",
        "local", "tasks_done", "paused", "origin", "pool", "_room", "_ready",
    )

    def __init__(self, worker_id: int, host: str, max_tasks: int | None,
                 room: dict[int, WorkerRecord] | None = None,
                 ready: list[int] | None = None) -> None:
        self.id = worker_id
        self.state = WorkerState.LAUNCHING
        self.host = host
        self.pid: int | None = None
        self.assigned: dict[int, Task] = {}  # insertion order = order sent
        self.tasks_sent = 0
        self.max_tasks = max_tasks
        self.ewma: float | None = None
        self.limited = 0  # assigned exclusive tasks (such a worker takes nothing more)
        self.local = True  # started by this executor on this machine
        self.origin = "local"  # "local", the label of the SSH host it runs on, or "joined"
        self.tasks_done = 0
        # Sent no new task while set: an ABORT awaits its answer, or the worker is dying (the
        # manager's lifecycle sets it, see distexec.manager.lifecycle).
        self.paused = False
        self.pool: Pool | None = None  # the resources it shares with its pool
        # The scheduler's workers that may have room (see Scheduler.plan) and its count of
        # ready (IDLE or BUSY) workers, kept up to date here; None for a record on its own.
        self._room = room
        self._ready = ready

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.state.value} host={self.host} pid={self.pid}>"

    def transition(self, new: WorkerState) -> None:
        if new not in _WORKER_EDGES[self.state]:
            raise InvalidTransition(f"worker {self.id}: {self.state.value} -> {new.value}")
        ready = self._ready
        if ready is not None and (self.state in _LIVE) is not (new in _LIVE):
            ready[0] += 1 if new in _LIVE else -1
        self.state = new

    def set_paused(self, paused: bool) -> None:
        """Pause (no new task) or resume the worker."""
        if self.paused and not paused and self._room is not None:
            self._room[self.id] = self  # it may have room again
        self.paused = paused

    @property
    def window(self) -> int:
        """How many tasks this worker may hold at once (running + prefetched)."""
        if self.paused:
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

    def __init__(self, policy: Policy | None = None) -> None:
        self.tasks: dict[int, Task] = {}
        self.queue = TaskQueue()
        self.workers: dict[int, WorkerRecord] = {}
        # Workers that may have room for a task, in the order they got it: the candidates of
        # plan(), which drops those it finds full, so that planning costs O(workers that take
        # a task), not O(workers). Every change that can make room adds the worker back.
        self._room: dict[int, WorkerRecord] = {}
        self._ready = [0]  # workers IDLE or BUSY (ready_count)
        self.policy = policy or Policy()
        # Per tag: [done, failed, cancelled]. Queued and assigned tasks are counted only when
        # asked (tag_counts), so that the per-task cost is one counter, at the end.
        self.tag_ended: dict[Any, list[int]] = {}

    def tag_counts(self) -> dict[Any, tuple[int, int, int, int, int]]:
        """Per tag: (waiting, assigned, done, failed, cancelled). O(pending tasks)."""
        live: dict[Any, list[int]] = {}
        for task in self.tasks.values():
            counts = live.get(task.tag)
            if counts is None:
                counts = live[task.tag] = [0, 0]
            counts[task.state is TaskState.ASSIGNED] += 1
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

    def add_blocked(self, task: Task) -> None:
        """File a task that waits for its dependencies (see :meth:`unblock`)."""
        task.state = TaskState.BLOCKED
        self.tasks[task.id] = task

    def unblock(self, task: Task) -> None:
        """Its dependencies are resolved: queue it."""
        task.transition(TaskState.QUEUED)
        self.queue.append(task)

    @property
    def ready_count(self) -> int:
        """How many workers are ready for tasks (IDLE or BUSY). O(1)."""
        return self._ready[0]

    def _unassign(self, task: Task) -> None:
        worker = self.workers.get(task.worker_id) if task.worker_id is not None else None
        if worker is not None and worker.assigned.pop(task.id, None) is not None:
            self._room[worker.id] = worker
            x = task.extras
            if x is not None and x.exclusive:
                worker.limited -= 1
                if x.needs is not None and worker.pool is not None:
                    worker.pool.give_back(x.needs)
            if worker.state is WorkerState.BUSY and not worker.assigned:
                worker.transition(WorkerState.IDLE)

    def _end(self, task: Task, state: TaskState) -> None:
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
        """Take every queued or blocked task out (shutdown with cancel_futures); caller
        cancels the futures."""
        out = self.queue.clear()
        out += [t for t in self.tasks.values() if t.state is TaskState.BLOCKED]
        for task in out:
            self._end(task, TaskState.CANCELLED)
        return out

    def task_done(self, task: Task, duration: float, ok: bool) -> None:
        """Record the result of an assigned task (the caller dropped stale results)."""
        assert task.worker_id is not None
        self._count_done(task.worker_id, duration)
        self._end(task, TaskState.DONE if ok else TaskState.FAILED)

    def _count_done(self, worker_id: int, duration: float) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.tasks_done += 1
            if duration >= 0:
                worker.ewma = (
                    duration if worker.ewma is None
                    else EWMA_ALPHA * duration + (1 - EWMA_ALPHA) * worker.ewma
                )

    def retry(self, task: Task, duration: float) -> None:
        """An assigned task raised an exception it is retried on: queue it again, at the back
        (a transient failure gets the time the other queued tasks take)."""
        assert task.worker_id is not None
        self._count_done(task.worker_id, duration)
        task.errors += 1
        self._unassign(task)
        task.transition(TaskState.QUEUED)
        task.worker_id = None
        self.queue.append(task)

    def decline(self, task: Task) -> bool:
        """The worker running ``task`` declined it: queue it again for other workers. Returns
        False, leaving it assigned, if every live worker has declined it (the caller fails it
        with :meth:`end_task`)."""
        worker_id = task.worker_id
        assert worker_id is not None
        if task.declined is None:
            task.declined = set()
        task.declined.add(worker_id)
        if all(w.id in task.declined for w in self.live_workers()):
            return False
        self._unassign(task)
        task.worker_id = None
        task.transition(TaskState.QUEUED)
        self.queue.appendleft(task)
        return True

    def fits(self, task: Task, worker: WorkerRecord) -> bool:
        """Can ``worker`` take ``task`` now? (Exclusive tasks need a worker holding nothing;
        needs must fit its pool; a worker that declined the task never gets it again.)"""
        pool = worker.pool
        x = task.extras
        if x is not None:
            if x.exclusive and worker.assigned:
                return False
            if x.declined and worker.id in x.declined:
                return False
            if x.needs is not None:
                return pool is not None and pool.fits(x.needs, not worker.assigned)
        if pool is not None and pool.slot_extra and not worker.assigned:
            return pool.free_slots() >= 1
        return True

    # -- workers -------------------------------------------------------------------------
    def add_worker(
        self, worker_id: int, host: str, max_tasks: int | None, pool: Pool | None = None,
    ) -> WorkerRecord:
        record = WorkerRecord(worker_id, host, max_tasks, self._room, self._ready)
        self.workers[worker_id] = record
        if pool is not None:
            record.pool = pool
            pool.workers.add(record)
        return record

    def live_workers(self) -> Iterator[WorkerRecord]:
        over = (WorkerState.GONE, WorkerState.LOST)
        return (w for w in self.workers.values() if w.state not in over)

    def worker_ready(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        worker.transition(WorkerState.IDLE)
        self._room[worker_id] = worker

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

    def end_task(self, task: Task, state: TaskState) -> None:
        """End a blocked, queued or assigned task as CANCELLED (aborted) or FAILED."""
        if task.state is TaskState.QUEUED:
            try:
                self.queue.remove(task)
            except ValueError:
                pass
        self._end(task, state)

    @staticmethod
    def charge_loss(task: Task, lost: LostAttempt, default_max_retries: int) -> bool:
        """Record that ``task`` was running on a worker that was lost. True: it may run again;
        False: it was lost more than its ``max_retries`` allows (a poison task)."""
        if task.losses is None:
            task.losses = []
        task.losses.append(lost)
        limit = default_max_retries if task.max_retries is None else task.max_retries
        return task.retries_used() <= limit

    def forget_worker(self, worker_id: int) -> None:
        self._room.pop(worker_id, None)
        worker = self.workers.pop(worker_id, None)
        if worker is not None and worker.pool is not None:
            worker.pool.workers.discard(worker)

    def drain(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        if worker.state in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.CONNECTED):
            worker.transition(WorkerState.DRAINING)

    # -- dispatch ------------------------------------------------------------------------
    def assign(self, task: Task, worker: WorkerRecord) -> None:
        """Hand a task taken out of the queue (or claimed by its parent) to a worker."""
        task.transition(TaskState.ASSIGNED)
        task.attempt += 1
        task.worker_id = worker.id
        worker.assigned[task.id] = task
        worker.tasks_sent += 1
        if worker.state is WorkerState.IDLE:
            worker.transition(WorkerState.BUSY)
        x = task.extras
        if x is not None and x.exclusive:
            worker.limited += 1  # nothing more for this worker while it runs
            if x.needs is not None and worker.pool is not None:
                worker.pool.take(x.needs)

    def plan(self, claim: Callable[[Task], bool]) -> list[tuple[WorkerRecord, list[Task]]]:
        """Assign queued tasks to workers with room, round-robin, one task per worker per pass.

        Which task a worker gets is the policy's choice. ``claim(task)`` is asked before a task
        is assigned; False means the task was cancelled in the meantime and it is dropped. A
        task coming back to the queue (attempt > 0) was claimed before and is not asked again.
        Returns the new assignments per worker, in order.
        """
        queue = self.queue
        room = self._room
        if not queue or not room:
            return []
        pick = self.policy.pick
        # The default policy on a queue of plain tasks is "the head, if it fits": inlined.
        default = type(self.policy) is Policy
        main = queue.main
        batches: dict[int, list[Task]] = {}
        windows: dict[int, int] = {}
        # The first pass goes through the candidates in order, dropping those that turn out
        # to have no room, and stops when the queue is empty; later passes (a worker may take
        # several short tasks) go through those that still have room.
        ready: list[WorkerRecord] = list(room.values())
        first = True
        # (queue._len rather than bool(queue): this loop runs once per dispatched task)
        while queue._len and ready:
            still: list[WorkerRecord] = []
            for worker in ready:
                if not queue._len:
                    break
                if first:
                    window = worker.window
                    if worker.state not in _LIVE or len(worker.assigned) >= window:
                        del room[worker.id]
                        continue
                    windows[worker.id] = window
                task = None
                while queue._len:
                    if default and queue._len == len(main):
                        candidate = main[0]
                        if (candidate.extras is not None and candidate.extras.exclusive
                                and worker.assigned) or (
                                worker.pool is not None and worker.pool.slot_extra
                                and not worker.assigned and worker.pool.free_slots() < 1):
                            break
                        main.popleft()
                        queue._len -= 1
                    else:
                        picked = pick(self, worker)
                        if picked is None:
                            break
                        candidate = picked
                        queue.take(candidate)
                    if candidate.attempt or claim(candidate):
                        task = candidate
                        break
                    self._end(candidate, TaskState.CANCELLED)
                if task is None:
                    continue
                if task.extras is None:  # (assign(), inlined for plain tasks)
                    task.transition(TaskState.ASSIGNED)
                    task.attempt += 1
                    task.worker_id = worker.id
                    worker.assigned[task.id] = task
                    worker.tasks_sent += 1
                    if worker.state is WorkerState.IDLE:
                        worker.transition(WorkerState.BUSY)
                else:
                    self.assign(task, worker)
                batches.setdefault(worker.id, []).append(task)
                if worker.max_tasks is not None and worker.tasks_sent >= worker.max_tasks:
                    worker.transition(WorkerState.DRAINING)
                elif not worker.limited and len(worker.assigned) < windows[worker.id]:
                    still.append(worker)
            ready = still
            first = False
        return [(self.workers[wid], tasks) for wid, tasks in batches.items()]
