"""Dependencies and barriers: tasks that wait for other futures, callers that wait for tasks.

Owns the BLOCKED tasks' waiting (a task whose arguments or ``depends_on`` include futures is
filed BLOCKED; each dependency's done-callback, whatever thread runs it, posts a
:class:`~.events.DependencyDone`, and the task is queued with the results in place of the
futures, or fails with :class:`~distexec.errors.DependencyError`) and the ``wait_for_all()``
barriers (answered once every task submitted before them has ended). Manager thread only,
except :meth:`Dependencies._callback`, which only posts.
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError, Future
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import serialization
from ..errors import DependencyError
from ..scheduler import Task, TaskState
from . import events

if TYPE_CHECKING:
    from .loop import Manager

logger = logging.getLogger(__name__)


class Dependencies:
    def __init__(self, m: Manager) -> None:
        self.m = m
        self._barriers: list[tuple[int, Future[Any]]] = []  # (task id, reply) of wait_for_all

    # ---------------------------------------------------------------- dependencies
    def add(self, task: Task) -> None:
        """File a task whose arguments include futures: it waits until they are done."""
        self.m.books.add_blocked(task)
        assert task.deps is not None
        callback = partial(self._callback, task.id)
        for dep in task.deps:
            dep.add_done_callback(callback)  # runs at once (posting) if already done

    def _callback(self, task_id: int, _: Future[Any]) -> None:
        # Whichever thread completed the dependency: hand the news to the manager thread.
        self.m.post(events.DependencyDone(task_id))

    def done(self, task_id: int) -> None:
        """One of the task's dependencies is done: queue it, fail it, or keep it waiting."""
        m = self.m
        task = m.books.tasks.get(task_id)
        if task is None or task.state is not TaskState.BLOCKED:
            return
        deps = task.deps
        assert deps is not None
        if task.future.cancelled():
            m.books.end_task(task, TaskState.CANCELLED)
            task.future.set_running_or_notify_cancel()  # wakes wait() and as_completed()
            return
        pending = False
        for index, dep in enumerate(deps):
            if not dep.done():
                pending = True
                continue
            cause: BaseException | None
            if dep.cancelled():
                cause, what = CancelledError(), "was cancelled"
            else:
                cause = dep.exception()
                what = (f"failed with {type(cause).__name__}: {serialization.safe_str(cause)}"
                        if cause is not None else "")
            if cause is not None:
                dep_id = getattr(dep, "_distexec_task_id", None)
                which = f"task {dep_id}" if dep_id is not None else "a future"
                err = DependencyError(
                    f"task {task.id} ({serialization.describe_callable(task.fn)}) was not run: "
                    f"it depends on {which} (dependency {index + 1} of {len(deps)}), which "
                    f"{what}")
                err.__cause__ = cause
                logger.info("task %d not run: %s %s", task.id, which, what)
                m.books.end_task(task, TaskState.FAILED)
                m.settle(task.future, False, err)
                return
        if pending:
            return
        # Every dependency succeeded: put the values in place of the futures.
        task.args = tuple(a.result() if isinstance(a, Future) else a for a in task.args)
        if task.kwargs:
            task.kwargs = {k: v.result() if isinstance(v, Future) else v
                           for k, v in task.kwargs.items()}
        task.deps = None
        if task.needs is not None:
            m.fleet.warn_if_unplaceable(task)
        m.books.unblock(task)

    # ---------------------------------------------------------------- barriers
    def barrier(self, task_id: int, reply: Future[Any]) -> None:
        self._barriers.append((task_id, reply))
        self.check_barriers()

    def check_barriers(self) -> None:
        """Answer the wait_for_all() calls whose earlier tasks have all ended."""
        if not self._barriers:
            return
        tasks = self.m.books.tasks
        oldest = next(iter(tasks), None)  # insertion order: (nearly) the smallest id
        still = []
        for threshold, reply in self._barriers:
            if oldest is not None and oldest < threshold:
                still.append((threshold, reply))
            elif oldest is not None and any(tid < threshold for tid in tasks):
                still.append((threshold, reply))  # a rare out-of-order submission
            else:
                self.m.settle(reply, True, None)
        self._barriers = still

    def release_all(self) -> None:
        """Teardown: every task has ended now, one way or another."""
        for _, reply in self._barriers:
            self.m.settle(reply, True, None)
        self._barriers = []
