"""Stopping tasks: ``abort()``, time limits, and the answers to ABORT.

Owns each worker's time-limit clock (a time-limited task has its worker to itself, so one
deadline per worker suffices, and the deadline heap holds ids, not tasks) and the way a task
is stopped where it runs: its future is settled first (cancelled, or failed with
:class:`~distexec.errors.TaskTimeoutError` quoting the worker's last stack), then a local worker
running it is killed, and any other worker is sent ``ABORT`` on its control connection and
takes no new task until it answers (it restarts if it ran the task; SKIPPED if it had not
started it). Tasks the worker held besides go back to the queue, uncharged. Manager thread only;
no sockets.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from .. import protocol, serialization
from ..errors import TaskTimeoutError
from ..scheduler import Task, TaskState
from .lifecycle import Life, WorkerHandle

if TYPE_CHECKING:
    from .loop import Manager

logger = logging.getLogger(__name__)

# How long a task past its time limit may take to report its stack before it is stopped.
DUMP_WAIT = 0.5


class Stopper:
    def __init__(self, m: Manager) -> None:
        self.m = m

    def abort(self, task_id: int) -> bool:
        """Stop a task wherever it is; its future ends cancelled."""
        m = self.m
        task = m.books.tasks.get(task_id)
        if task is None:
            return False
        if task.state is TaskState.BLOCKED or (task.state is TaskState.QUEUED
                                               and not task.attempt):
            m.books.end_task(task, TaskState.CANCELLED)
            m.complete(task.future.cancel)  # never claimed, so it can be cancelled
            return True
        logger.info("aborting task %d", task_id)
        self.stop_task(task, TaskState.CANCELLED, None)
        return True

    # ---------------------------------------------------------------- time limits
    def arm_limit(self, handle: WorkerHandle, task: Task) -> None:
        """Start the clock of a time-limited task just sent to ``handle``'s worker."""
        assert task.time_limit is not None
        expires = time.monotonic() + task.time_limit
        handle.limit = (task.id, task.attempt, expires)
        if not handle.limit_timer:
            handle.limit_timer = True
            self.m.at(expires, partial(self._check_limit, handle))

    def _check_limit(self, handle: WorkerHandle) -> None:
        """Deadline: has the time-limited task on this worker run past its limit?"""
        handle.limit_timer = False
        if handle.over or handle.limit is None:
            return
        task_id, attempt, expires = handle.limit
        task = self.m.books.tasks.get(task_id)
        if (task is None or task.state is not TaskState.ASSIGNED or task.attempt != attempt
                or task.worker_id != handle.worker_id):
            handle.limit = None
            return
        if time.monotonic() < expires:  # a later task replaced the one this timer was for
            handle.limit_timer = True
            self.m.at(expires, partial(self._check_limit, handle))
            return
        self._expired(task_id, attempt)

    def _expired(self, task_id: int, attempt: int, asked: WorkerHandle | None = None) -> None:
        """The limit has passed: ask the worker for its stack (once), then stop the task.
        ``asked`` is the worker that was asked (the second call, by answer or by DUMP_WAIT)."""
        m = self.m
        if asked is not None:
            asked.on_dump = None
        task = m.books.tasks.get(task_id)
        if task is None or task.state is not TaskState.ASSIGNED or task.attempt != attempt:
            return
        assert task.time_limit is not None and task.worker_id is not None
        handle = m.fleet.workers.get(task.worker_id)
        if (asked is None and handle is not None and handle.ctrl is not None
                and handle.on_dump is None):
            # Ask where it is first; stop it when the dump arrives, or after DUMP_WAIT anyway
            # (a task holding the GIL cannot answer).
            final = partial(self._expired, task_id, attempt, handle)
            if m.watchdog.send_control(handle, protocol.DUMP, task.id, attempt):
                handle.on_dump = final
                m.at(time.monotonic() + DUMP_WAIT, final)
                return
        if handle is not None:
            handle.on_dump = None
        record = m.books.workers.get(task.worker_id)
        where = record.describe() if record is not None else f"worker {task.worker_id}"
        stack = handle.main_stack() if handle is not None else None
        name = serialization.describe_callable(task.fn)
        err = TaskTimeoutError(
            f"task {task.id} ({name}) exceeded its time limit of {task.time_limit:g} s on "
            f"{where}; the worker was stopped and will be replaced"
            + (f". Its last reported stack (most recent call first):\n{stack}" if stack else
               f". It did not report its stack within {DUMP_WAIT:g} s (a task that holds the "
               "GIL, in a C call, cannot)" if asked is not None else ""))
        logger.warning("task %d (%s) exceeded its time limit of %g s; stopping %s", task.id,
                       name, task.time_limit, where)
        self.stop_task(task, TaskState.FAILED, err)

    # ---------------------------------------------------------------- stopping
    def stop_task(self, task: Task, state: TaskState, err: BaseException | None) -> None:
        """Settle a task now (cancelled, or failed with ``err``) and stop it where it runs."""
        m = self.m
        worker_id = task.worker_id if task.state is TaskState.ASSIGNED else None
        attempt = task.attempt
        future = task.future
        if err is not None and task.fallback is not None and worker_id is not None:
            m.dispatch.fail(task, err)  # runs the fallback elsewhere; the worker is stopped below
        else:
            m.books.end_task(task, state)
            if err is None:
                m.force_cancel(future)
            else:
                m.settle(future, False, err)
        handle = m.fleet.workers.get(worker_id) if worker_id is not None else None
        if handle is None:
            return
        how = "time limit" if err is not None else "abort"
        reason = f"stopped by the executor ({how} of task {task.id})"
        proc = handle.proc
        if proc.killable and (proc.running_task() == (task.id, attempt) or handle.ctrl is None):
            self._kill(handle, reason)
        elif m.watchdog.send_control(handle, protocol.ABORT, task.id, attempt):
            # If it runs the task, the worker exits (or restarts) and no one is charged for
            # that; if it had not started it, it says so (SKIPPED) and carries on. Until one
            # or the other, it gets no new task (whose time limit would run meanwhile).
            handle.aborts.add((task.id, attempt))
            if handle.life in (Life.READY, Life.RETIRING):
                handle.to(Life.ABORTING, reason)
            elif handle.stopped is None:  # (told to leave already: it stays LEAVING)
                handle.stopped = reason
                handle.record.set_paused(True)
        else:
            logger.warning("cannot reach worker %d to stop task %d; its result will be dropped",
                           handle.worker_id, task.id)

    def _kill(self, handle: WorkerHandle, reason: str) -> None:
        if handle.life not in (Life.STOPPING, Life.SILENT):
            handle.to(Life.STOPPING, reason)
        self.m.books.drain(handle.worker_id)  # no new task for a worker about to die
        self.m.status.publish()
        handle.proc.kill()

    def skipped(self, handle: WorkerHandle, task_id: int, attempt: int) -> None:
        """The worker had not started a task it was told to abort: it carries on."""
        handle.aborts.discard((task_id, attempt))
        if not handle.aborts:
            handle.carry_on()
