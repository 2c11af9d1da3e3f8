"""Requests from running tasks: child tasks and shared data, on each worker's client connection.

Owns the client connections' requests: FETCH (shared data from :mod:`.store`), SUBMIT (a child
task: a :class:`~distexec.scheduler.Task` whose function and arguments stay pickled, marked
exclusive so that it is only ever queued or running; its result is passed on to the parent as
it came, unpickled), and CLAIM (a parent waiting for a child that is still queued gets it sent
back, RUN, to run inline on the parent's worker, so that waiting never starves the pool). When
a client connection ends, its children that have not started are cancelled. Manager thread
only; no sockets: replies go out through the door.
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError, Future
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import protocol, serialization
from ..options import check_child_options
from ..scheduler import Task, TaskKind, TaskState, WorkerState, task_ids

if TYPE_CHECKING:
    from .connections import Conn
    from .loop import Manager

logger = logging.getLogger(__name__)


class Children:
    def __init__(self, m: Manager) -> None:
        self.m = m

    def client_connected(self, conn: Conn, info: dict[str, Any], nonce_w: bytes) -> None:
        """A worker's client connection: requests from the tasks it runs."""
        m = self.m
        token = info.get("worker_id")
        handle = m.fleet.workers.get(token) if isinstance(token, int) else None
        if handle is None or handle.conn is None or handle.record.pid != info.get("pid"):
            m.door.refuse(conn, protocol.STATUS_REFUSED,
                          f"no worker {token} (pid {info.get('pid')}) is connected", nonce_w)
            return
        conn.children = {}
        m.door.opened(conn, handle, "client")
        if handle.client is not None and handle.client is not conn:
            old = handle.client
            m.door.close(old)
            self.client_closed(old, "replaced by a new client connection")
        handle.client = conn
        m.door.welcome(conn, nonce_w)
        logger.debug("worker %d opened a client connection", handle.worker_id)

    def on_frame(self, conn: Conn, frame: protocol.Frame) -> None:
        """A request from the tasks of a worker: read shared data, submit or claim a child."""
        kind = frame.kind
        if kind == protocol.FETCH:
            req_id, name = frame.meta
            entry = self.m.store.fetch(name, conn.worker_id)
            if entry is None:
                self.reply(conn, req_id, False, f"no shared data named {name!r}")
                return
            self.reply(conn, req_id, True, entry.version, [entry.payload, *entry.buffers])
        elif kind == protocol.SUBMIT:
            self._submitted(conn, frame)
        elif kind == protocol.CLAIM:
            self._claimed(conn, *frame.meta)
        else:
            self.m.door.disconnected(conn, f"protocol error: unexpected "
                                           f"{protocol.KIND_NAMES[kind]} on a client connection")

    def reply(self, conn: Conn, req_id: int, ok: Any, extra: Any,
              buffers: list[Any] | tuple[()] = ()) -> None:
        self.m.door.send_open(conn, protocol.encode_frame(protocol.REPLY, (req_id, ok, extra),
                                                          buffers))

    def client_closed(self, conn: Conn, why: str) -> None:
        """A client connection ended (the door closed it): its children that have not started
        are cancelled (their parent is gone, or will run again and submit them again);
        running ones finish."""
        handle = conn.handle
        if handle is not None and handle.client is conn:
            handle.client = None
        children, conn.children = conn.children or {}, {}
        dropped = 0
        for task in children.values():
            if task.state in (TaskState.QUEUED, TaskState.BLOCKED) and not task.attempt:
                self.m.books.end_task(task, TaskState.CANCELLED)
                self.m.cancel_task(task)
                dropped += 1
        if dropped:
            logger.info("cancelled %d child task(s) of worker %s: %s", dropped, conn.worker_id,
                        why)

    def _submitted(self, conn: Conn, frame: protocol.Frame) -> None:
        m = self.m
        req_id, fn_data, name, options = frame.meta
        buffers = frame.buffers  # each its own bytearray (FrameDecoder): kept as they are
        try:
            opts = check_child_options(options)
        except (TypeError, ValueError) as exc:
            data, type_name, message, text = serialization.dumps_exception(exc)
            self.reply(conn, req_id, False, (type_name, message, text), [data])
            return
        future: Future[Any] = Future()
        fn: Any = serialization.Pickled(fn_data, [], str(name))
        task = Task(next(task_ids), future, fn,
                    serialization.Pickled(buffers[0], buffers[1:]), None, TaskKind.CALL,
                    opts.time_limit, opts.max_retries, opts.tag, opts.priority, opts.needs)
        # Queued (where its parent can claim it) or running: never held in a prefetch window.
        task.exclusive = True
        task.client = (conn, req_id)
        future._distexec_task_id = task.id  # type: ignore[attr-defined]
        assert conn.children is not None
        conn.children[req_id] = task
        future.add_done_callback(partial(self._done, conn, req_id))
        if m.terminating:
            m.complete(future.cancel)
            return
        logger.debug("worker %s submitted child task %d (%s)", conn.worker_id, task.id, name)
        if task.needs is not None:
            m.fleet.warn_if_unplaceable(task)
        m.books.add_task(task)

    def _claimed(self, conn: Conn, claim_id: int, req_id: int,
                 parent_id: int | None = None) -> None:
        """The parent waits for this child: if it is still queued, it runs inside the parent,
        on the parent's worker (so waiting never starves the pool)."""
        m = self.m
        assert conn.children is not None
        task = conn.children.get(req_id)
        handle = conn.handle
        record = handle.record if handle is not None else None
        if (task is None or task.state is not TaskState.QUEUED or handle is None
                or record is None or handle.over
                or record.state not in (WorkerState.BUSY, WorkerState.IDLE, WorkerState.DRAINING)
                or record.paused or handle.conn is None):
            self.reply(conn, claim_id, False, "not queued")
            return
        if task.needs is not None and (record.pool is None
                                       or not record.pool.fits(task.needs, False)):
            # It needs what this worker's pool cannot lend now: it waits for a worker that can.
            self.reply(conn, claim_id, False, "its needs do not fit here")
            return
        m.books.queue.remove(task)
        if not task.attempt and not m.dispatch.claim(task):
            m.books.end_task(task, TaskState.CANCELLED)
            self.reply(conn, claim_id, False, "cancelled")
            return
        m.books.assign(task, record)
        task.parent = parent_id if isinstance(parent_id, int) else None
        logger.debug("child task %d runs inside its parent on worker %d", task.id, record.id)
        m.dispatch.send_tasks(handle, conn, [task], claim_id=claim_id)
        if task.time_limit is not None and task.id in record.assigned and (
                handle.limit is None or handle.limit[0] not in record.assigned):
            # (A parent's own time limit, if it has one, keeps running and bounds the child.)
            m.stopper.arm_limit(handle, task)

    def finished(self, task: Task, ok: bool, payload: Any, oob: list[Any], extra: Any,
                 duration: float) -> None:
        """A child task's result or exception goes to its parent as it came, unpickled."""
        assert task.client is not None
        conn, req_id = task.client
        self.m.books.task_done(task, duration, ok)
        future = task.future
        future._distexec_forwarded = True  # type: ignore[attr-defined]
        self.m.settle(future, True, None)
        self.reply(conn, req_id, ok, extra, [payload, *oob])

    def _done(self, conn: Conn, req_id: int, future: Future[Any]) -> None:
        """Done-callback of a child's future: tell the parent how it ended, unless its result
        was passed on already (failed here: lost workers, time limit, cancelled...)."""
        if conn.children is not None:
            conn.children.pop(req_id, None)
        if getattr(future, "_distexec_forwarded", False) or conn not in self.m.door.conns:
            return
        exc: BaseException | None
        if future.cancelled():
            exc = CancelledError(
                f"child task {getattr(future, '_distexec_task_id', '?')} was cancelled (aborted, "
                "or the executor shut down with cancel_futures or cancel_running)")
        else:
            exc = future.exception()
        if exc is None:  # pragma: no cover - results are always passed on
            return
        data, type_name, message, text = serialization.dumps_exception(exc)
        self.reply(conn, req_id, False, (type_name, message, text), [data])
