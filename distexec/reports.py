"""Snapshots of an executor, as its ``workers()`` and ``status()`` return them.

Plain immutable data, built in the caller's thread from what the task manager answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["ExecutorStatus", "TaskCounts", "WorkerInfo"]


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker, as returned by :meth:`DistributedExecutor.workers`.

    Attributes:
        worker_id: the executor's number for the worker (never reused).
        host: the host name the worker reported.
        pid: its process id on that host.
        state: ``"launching"``, ``"connected"`` (running the initializer), ``"idle"``,
            ``"busy"`` or ``"draining"`` (leaving after the tasks it holds).
        local: True if this executor started it on this machine.
        origin: ``"local"``, the label of the SSH host it was started on, or ``"joined"``
            (started by hand).
        held: ids of the tasks sent to it and not finished (running or prefetched).
        running: id of the task it is running, if known.
        tasks_done: tasks it has finished.
        last_heartbeat_age: seconds since anything was heard from it.
    """

    worker_id: int
    host: str
    pid: int | None
    state: str
    local: bool
    origin: str
    held: tuple[int, ...]
    running: int | None
    tasks_done: int
    last_heartbeat_age: float | None


class TaskCounts(NamedTuple):
    """How many tasks are in each state (for one tag, or in total).

    Attributes:
        waiting: submitted, not sent to a worker yet (including tasks re-queued after a loss).
        running: sent to a worker (running, or prefetched by it).
        finished: completed with a result.
        failed: completed with an exception.
        cancelled: cancelled or aborted.
    """

    waiting: int = 0
    running: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass(frozen=True)
class ExecutorStatus:
    """A snapshot of an executor, as returned by :meth:`DistributedExecutor.status`.

    Attributes:
        tags: task counts per tag (``None`` for tasks without a tag), for every tag used so far.
        total: the counts over all tags.
        workers: the live workers.
    """

    tags: dict[Any, TaskCounts]
    total: TaskCounts
    workers: list[WorkerInfo]
