"""Recovery: what a lost worker's tasks become.

Owns the rule for a worker's loss: every task it held goes back to the front of the queue, in
order, uncharged, except the one it was *running* (a local worker publishes its id in shared
memory; otherwise the oldest task it held, as results come back in order), which is charged
with the loss, together with the parents it ran inline in. A task charged more than its
``max_retries`` is a *poison* task and fails with :class:`~distexec.errors.WorkerLostError`
listing every attempt (or runs its fallback). Children whose parent's connection is gone are
cancelled: nobody waits for them. Manager thread only; no sockets, no clock.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import serialization
from ..errors import LostAttempt, WorkerLostError
from ..scheduler import Task, TaskState

if TYPE_CHECKING:
    from .loop import Manager
    from .lifecycle import WorkerHandle

logger = logging.getLogger(__name__)


class Recovery:
    def __init__(self, m: Manager) -> None:
        self.m = m

    def max_retries(self, task: Task) -> int:
        return self.m.config.max_retries if task.max_retries is None else task.max_retries

    def worker_lost(self, handle: WorkerHandle, exitcode: int | None, what: str,
                    stopped: bool) -> list[Task]:
        """Re-queue what a lost worker held; charge the loss to the task it was running.
        ``stopped``: the executor stopped the worker (to stop a task that is settled already),
        so its death charges nobody. Returns the tasks charged."""
        m = self.m
        books = m.books
        record = handle.record
        held = books.worker_lost(handle.worker_id)
        culprit = None if stopped else self._running_task(handle, held)
        if culprit is None and handle.bad_frame and held:
            culprit = held[0]  # results come back in order: its result was in the bad frame
        quiet = stopped or (not held and m.closing)
        logger.log(logging.INFO if quiet else logging.WARNING, "lost %s: %s%s",
                   record.describe(), what,
                   f"; it was running task {culprit.id}" if culprit is not None else "")
        poisoned: list[Task] = []
        charged: list[Task] = []
        by_id = {t.id: t for t in held}
        running = culprit
        while running is not None:
            # The running task, and the parents waiting for it if it ran inline in them: they
            # all ran on the lost worker (a child that kills its worker must not make its
            # parent retry for ever).
            charged.append(running)
            lost = LostAttempt(running.attempt, record.id, record.host, record.pid, exitcode,
                               what)
            if not books.charge_loss(running, lost, m.config.max_retries):
                poisoned.append(running)
            running = by_id.get(running.parent) if running.parent is not None else None
        # Everything else goes back to the front of the queue, in its order: tasks that had not
        # started, or had finished with their result still in the worker's outgoing batch.
        # Children whose parent's connection is gone are cancelled: nobody waits for them.
        for task in reversed(held):
            if task in poisoned:
                continue
            if task.client is not None and task.client[0] not in m.door.conns:
                books.end_task(task, TaskState.CANCELLED)
                m.force_cancel(task.future)
                continue
            books.requeue(task)
        if culprit is not None and culprit not in poisoned:
            logger.warning("task %d (%s) will run again (its worker was lost %d time(s); "
                           "max_retries=%d)", culprit.id,
                           serialization.describe_callable(culprit.fn), len(culprit.losses or ()),
                           self.max_retries(culprit))
        if len(held) > (culprit is not None):
            logger.info("re-queued %d task(s) that worker %d held besides the one it ran",
                        len(held) - (culprit is not None), handle.worker_id)
        for task in poisoned:
            self._poisoned(task)
        return charged

    def _poisoned(self, task: Task) -> None:
        """Fail a task whose workers were lost more often than its max_retries allows."""
        losses = task.losses or []
        last = losses[-1]
        name = serialization.describe_callable(task.fn)
        lines = "\n".join(f"  - {lost.describe()}" for lost in losses)
        err = WorkerLostError(
            f"task {task.id} ({name}) was running on a worker that was lost, "
            f"{len(losses)} time(s) (max_retries={self.max_retries(task)}), so it is not "
            f"retried again:\n{lines}\nIf the task itself kills its worker (memory, a crash "
            "in native code, os._exit), fix the task; otherwise raise max_retries",
            worker_id=last.worker_id, host=last.host, pid=last.pid, exitcode=last.exitcode,
            attempts=tuple(losses))
        logger.error("task %d (%s) failed: its worker was lost %d time(s)", task.id, name,
                     len(losses))
        self.m.dispatch.fail(task, err)

    @staticmethod
    def _running_task(handle: WorkerHandle, held: list[Task]) -> Task | None:
        """Which of a lost worker's tasks it was running: exact for local workers (they publish
        it in shared memory); otherwise the oldest task it held, as results come back in order."""
        if handle.proc.reports_progress:
            running = handle.proc.running_task()
            if running is None:
                return None
            for task in held:
                if (task.id, task.attempt) == running:
                    return task
            return None
        return held[0] if held else None
