"""Dispatch: tasks out to workers, results back into futures.

Owns the function cache (each function is pickled once and sent to each worker once, up to
``WORKER_FN_CAPACITY`` per worker), the TASKS frames (batched up to the message size limit;
a task whose function or arguments cannot be pickled, cannot travel to that worker, or are too
large fails alone), and the RESULTS: stale results are dropped, values are unpickled and
settled, exceptions are settled, retried (``retry_on``, up to ``max_retries``), or turned into
the task's fallback; a declined task goes back to the queue until every worker has declined
it. Which worker gets which task is the scheduler's decision (:meth:`Scheduler.plan`); time
limits are armed by :mod:`.stopping`. Manager thread only; no sockets: frames go out through
the door.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import protocol, serialization
from ..errors import (
    RemoteError,
    TaskDeclined,
    TaskPicklingError,
    TaskUnpicklingError,
    too_large,
)
from ..scheduler import Task, TaskKind, TaskState, WorkerState

if TYPE_CHECKING:
    from .connections import Conn
    from .loop import Manager
    from .lifecycle import WorkerHandle

logger = logging.getLogger(__name__)

# How many function definitions each worker keeps; older ones are told to be forgotten.
WORKER_FN_CAPACITY = 256
# In every pickle that holds a multiprocessing object (see distexec.mpobjects).
_MP_MARKER = b"multiprocessing"


class _CannotTravel(Exception):
    """A task's function or arguments hold objects its worker cannot use (the message says)."""


class Dispatch:
    def __init__(self, m: Manager) -> None:
        self.m = m
        self._fn_cache = serialization.FunctionCache()

    def claim(self, task: Task) -> bool:
        """Mark a task's future running; False if it was cancelled meanwhile."""
        return task.future.set_running_or_notify_cancel()

    # ---------------------------------------------------------------- out
    def dispatch(self) -> None:
        """Send queued tasks to the workers with room (the scheduler's plan)."""
        m = self.m
        if m.terminating or not m.books.queue:
            return
        workers = m.fleet.workers
        for record, tasks in m.books.plan(self.claim):
            handle = workers[record.id]
            conn = handle.conn
            assert conn is not None
            self.send_tasks(handle, conn, tasks)
            for task in tasks:
                x = task.extras
                if x is not None and x.time_limit is not None \
                        and task.state is TaskState.ASSIGNED:
                    m.stopper.arm_limit(handle, task)
            if record.state is WorkerState.DRAINING:
                # max_tasks_per_child reached: start its successor now to hide the startup time.
                m.status.publish()
                m.fleet.ensure()
                m.fleet.leave_when_drained(handle)

    def _function(self, task: Task, handle: WorkerHandle, defs: list[Any],
                  forget: list[int]) -> int:
        fn: Any = task.fn
        if type(fn) is serialization.Pickled:  # a child task's function, pickled by its parent
            fn_id = self._fn_cache.add(task.fn, fn.data)  # a fresh id; not cached
            defs.append((fn_id, fn.data, True))
            return fn_id
        cached = self._fn_cache.lookup(fn)
        if cached is None:
            data = serialization.dumps_inband(fn, self.m.config.main_versions)
            fn_id = self._fn_cache.add(fn, data)
            cacheable = self._fn_cache.lookup(fn) is not None
        else:
            fn_id, data = cached
            cacheable = True
        known = handle.known_fns
        if fn_id in known:
            known.move_to_end(fn_id)
            return fn_id
        if _MP_MARKER in data and not handle.proc.local_child:
            self._check_remote(data, fn, handle)
        defs.append((fn_id, data, not cacheable))
        if cacheable:
            known[fn_id] = None
            if len(known) > WORKER_FN_CAPACITY:
                old, _ = known.popitem(last=False)
                forget.append(old)
        return fn_id

    def send_tasks(self, handle: WorkerHandle, conn: Conn, tasks: list[Task],
                   claim_id: int | None = None) -> None:
        """Send ``tasks`` to ``handle``'s worker in TASKS frames (or, with ``claim_id``, as the
        RUN answer to a parent that claimed its child)."""
        door = self.m.door
        defs: list[Any] = []
        forget: list[int] = []
        items: list[Any] = []
        buffers: list[Any] = []
        limit = self.m.config.max_message_size
        batch_bytes = 0  # payload bytes of the frame being built

        def send_batch() -> None:
            nonlocal defs, forget, items, buffers, batch_bytes
            door.send(conn, protocol.encode_frame(protocol.TASKS, (defs, forget, items),
                                                  buffers))
            defs, forget, items, buffers, batch_bytes = [], [], [], [], 0

        for task in tasks:
            first_def = len(defs)
            try:
                fn_id = self._function(task, handle, defs, forget)
            except BaseException as exc:
                self._unpicklable(task, "its function", exc)
                continue
            try:
                if type(task.args) is serialization.Pickled:
                    payload, oob = task.args.data, task.args.buffers
                elif task.kind is TaskKind.CALL:
                    payload, oob = serialization.dumps((task.args, task.kwargs or {}))
                else:
                    payload, oob = serialization.dumps(task.args)
            except BaseException as exc:
                self._unpicklable(task, "its arguments", exc)
                continue
            if _MP_MARKER in payload and not handle.proc.local_child:
                try:
                    self._check_remote(payload, (task.args, task.kwargs), handle)
                except _CannotTravel as exc:
                    self._unpicklable(task, "its arguments", exc)
                    continue
            size = sum(len(d[1]) for d in defs[first_def:]) + serialization.nbytes(payload, oob)
            if size > limit:
                # The function's definitions added for it go too: the worker will not learn it.
                for fid, _, _ in defs[first_def:]:
                    handle.known_fns.pop(fid, None)
                del defs[first_def:]
                self._too_large(task, size)
                continue
            if items and (batch_bytes + size > limit
                          or len(buffers) + len(oob) > protocol.MAX_BUFFERS - 64):
                new_defs = defs[first_def:]
                del defs[first_def:]
                send_batch()
                defs = new_defs
            batch_bytes += size
            items.append(protocol.task_item(task.id, task.attempt, fn_id, int(task.kind),
                                            payload, oob, buffers))
        if claim_id is not None:  # a child task, to run inside its waiting parent
            if items:
                door.send(conn, protocol.encode_frame(protocol.RUN, (claim_id, defs, items),
                                                      buffers))
            else:  # it could not be sent (its future says why): nothing to run
                self.m.children.reply(conn, claim_id, False, "the task could not be sent")
        elif items or forget or defs:
            send_batch()

    def _too_large(self, task: Task, size: int) -> None:
        name = serialization.describe_callable(task.fn)
        err = too_large(f"task {task.id} ({name}): its function and arguments", size,
                        self.m.config.max_message_size)
        logger.debug("task %d not sent: %s", task.id, err)
        self.m.books.end_task(task, TaskState.FAILED)
        self.m.settle(task.future, False, err)

    def _check_remote(self, data: Any, obj: Any, handle: WorkerHandle) -> None:
        """Raise _CannotTravel if ``obj`` (pickled as ``data``, which mentions
        multiprocessing) holds objects a worker not started here cannot use."""
        from ..mpobjects import check_for_remote

        reason = check_for_remote(data, obj, handle.record.describe())
        if reason is not None:
            raise _CannotTravel(reason)

    def _unpicklable(self, task: Task, what: str, exc: BaseException) -> None:
        name = serialization.describe_callable(task.fn)
        if type(exc) is _CannotTravel:
            err = TaskPicklingError(f"task {task.id} ({name}) could not be sent: {what}: {exc}")
            logger.debug("task %d: %s cannot go to that worker", task.id, what)
            self.m.books.end_task(task, TaskState.FAILED)
            self.m.settle(task.future, False, err)
            return
        hint = ("Define the function at module level, or register its module with "
                "cloudpickle.register_pickle_by_value()" if what == "its function" else
                "Pass picklable arguments (plain data, arrays, module-level objects), or open "
                "resources such as files and connections inside the task instead")
        if "through inheritance" in serialization.safe_str(exc) or "fork" in type(exc).__name__:
            from ..mpobjects import explain_pickling_error

            hint = explain_pickling_error(exc) or hint
        err = TaskPicklingError(
            f"task {task.id} ({name}) could not be sent: {what} could not be pickled: "
            f"{type(exc).__name__}: {serialization.safe_str(exc)}. {hint}")
        err.__cause__ = exc
        logger.debug("task %d: %s could not be pickled", task.id, what)
        self.m.books.end_task(task, TaskState.FAILED)
        self.m.settle(task.future, False, err)

    # ---------------------------------------------------------------- back
    def on_results(self, handle: WorkerHandle, frame: protocol.Frame) -> None:
        (items,) = frame.meta
        m = self.m
        books = m.books
        tasks = books.tasks
        settle = m.settle
        worker_id = handle.worker_id
        ASSIGNED = TaskState.ASSIGNED  # noqa: N806 (a local for the loop)
        for task_id, attempt, status, payload, oob, duration, extra in \
                protocol.read_result_items(items, frame.buffers):
            task = tasks.get(task_id)
            if (task is None or task.state is not ASSIGNED or task.attempt != attempt
                    or task.worker_id != worker_id):
                logger.info("dropped a stale result for task %d (attempt %d) from worker %d",
                            task_id, attempt, worker_id)
                continue
            m.fleet.crash_streak = 0
            if (task.extras is not None and task.extras.client is not None
                    and status != protocol.RESULT_DECLINED):
                m.children.finished(task, status == protocol.RESULT_OK, payload, oob, extra,
                                    duration)
                continue
            if status == protocol.RESULT_OK:
                try:
                    value = serialization.loads(payload, oob)
                except BaseException as exc:
                    err = TaskUnpicklingError(
                        f"the result of task {task_id} "
                        f"({serialization.describe_callable(task.fn)}) could not be unpickled "
                        f"here: {type(exc).__name__}: {serialization.safe_str(exc)}. Make sure "
                        "the modules that define the result's types are importable in this "
                        "process")
                    err.__cause__ = exc
                    books.task_done(task, duration, True)
                    settle(task.future, False, err)
                else:
                    books.task_done(task, duration, True)
                    settle(task.future, True, value)
            elif status == protocol.RESULT_DECLINED:
                self._declined(task, str(extra))
            else:
                self._raised(task, payload, extra, duration)
        if not handle.over:
            m.fleet.leave_when_drained(handle)

    def _raised(self, task: Task, payload: Any, extra: Any, duration: float) -> None:
        """The task raised: retry it, run its fallback, or fail its future."""
        books = self.m.books
        type_name, message, text = extra
        remote = serialization.loads_exception(payload, type_name, message, text)
        if task.retry_on is not None and isinstance(remote, task.retry_on):
            limit = self.m.recovery.max_retries(task)
            if task.retries_used() < limit:
                logger.warning("task %d (%s) raised %s: %s; retrying it (retry %d of %d)",
                               task.id, serialization.describe_callable(task.fn), type_name,
                               message, task.retries_used() + 1, limit)
                books.retry(task, duration)
                return
        if task.fallback is not None:
            books.retry(task, duration)  # back to the queue, as its fallback
            self.to_fallback(task, remote)
            return
        books.task_done(task, duration, False)
        self.m.settle(task.future, False, remote)

    def _declined(self, task: Task, reason: str) -> None:
        """The worker running ``task`` gave it back (``distexec.decline()``)."""
        worker_id = task.worker_id
        assert worker_id is not None
        record = self.m.books.workers.get(worker_id)
        where = record.describe() if record is not None else f"worker {worker_id}"
        name = serialization.describe_callable(task.fn)
        if self.m.books.decline(task):
            logger.info("task %d (%s) declined %s%s; it goes back to the queue", task.id, name,
                        where, f" ({reason})" if reason else "")
            return
        declined = ", ".join(str(w) for w in sorted(task.declined or ()))
        err = TaskDeclined(
            f"task {task.id} ({name}) was declined by every worker (workers {declined}); the "
            f"last, {where}, said: {reason or 'no reason given'}. Start a worker that can run "
            "it (for example with the resources it needs), or change what the task accepts")
        logger.error("task %d (%s) failed: every worker declined it", task.id, name)
        self.fail(task, err)

    def fail(self, task: Task, err: BaseException) -> None:
        """An assigned task failed for good: run its fallback, or fail its future."""
        if task.fallback is not None:
            self.m.books.requeue(task)
            self.to_fallback(task, err)
            return
        self.m.books.end_task(task, TaskState.FAILED)
        self.m.settle(task.future, False, err)

    def to_fallback(self, task: Task, exc: BaseException) -> None:
        """Turn a queued task that failed for good into its fallback, called as
        ``fallback(exc, *args, **kwargs)`` (per item for a chunk of ``map``) on a worker."""
        fallback = task.fallback
        assert fallback is not None
        logger.warning("task %d (%s) failed (%s: %s); running its fallback %s", task.id,
                       serialization.describe_callable(task.fn), type(exc).__name__,
                       serialization.safe_str(exc), serialization.describe_callable(fallback))
        exc.__traceback__ = None  # tracebacks do not pickle; the exception keeps its notes
        try:
            serialization.dumps(exc)
        except BaseException as err:  # it must travel to the worker: send a stand-in
            import traceback

            exc = RemoteError(type(exc).__name__, serialization.safe_str(exc),
                              "".join(traceback.format_exception_only(type(exc), exc)),
                              f"it could not be pickled for the fallback: {err!r}")
        task.fn = fallback
        if task.kind is TaskKind.CALL:
            task.args = (exc, *task.args)
        else:
            task.args = [(exc, *item) for item in task.args]
        task.fallback = None
        task.retry_on = None
        task.errors = 0
        task.losses = None
        task.declined = None
        if task.time_limit is not None:
            task.time_limit = None
            task.exclusive = task.needs is not None or task.client is not None

    def check_declined(self) -> None:
        """A worker left: fail the queued tasks that every remaining worker has declined."""
        books = self.m.books
        live = [w.id for w in books.live_workers()]
        if not live:
            return  # nobody to run anything: wait for workers, as every task does
        for task in list(books.queue.declined):
            declined = task.declined or set()
            if not all(w in declined for w in live):
                continue
            err = TaskDeclined(
                f"task {task.id} ({serialization.describe_callable(task.fn)}) was declined by "
                f"every worker still running (workers {', '.join(map(str, sorted(declined)))}). "
                "Start a worker that can run it, or change what the task accepts")
            logger.error("task %d failed: every remaining worker declined it", task.id)
            if task.fallback is not None:
                self.to_fallback(task, err)  # stays queued, now for any worker
            else:
                books.end_task(task, TaskState.FAILED)
                self.m.settle(task.future, False, err)
