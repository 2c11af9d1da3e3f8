"""The watchdog: is each worker alive, and what does its control connection say.

Owns the heartbeat checks and pings (one deadline each per worker), the control connection's
bytes (heartbeats, stack dumps, answers to ABORT), and the *zombies*: workers declared lost for
silence that cannot be killed (started by hand), whose connections are kept so that what they
still send is dropped and they can be told to leave once they show life. Manager thread only;
talks to the fleet (:meth:`Fleet.declare_lost`) and the stopper (answers to ABORT).

A worker is silent when no byte has arrived on either of its connections for
``heartbeat_timeout`` seconds (it beats five times per timeout). Before declaring it lost the
watchdog reads what is waiting, since this thread may itself have been starved.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import protocol
from .lifecycle import Life, WorkerHandle

if TYPE_CHECKING:
    from .connections import Conn
    from .loop import Manager

logger = logging.getLogger(__name__)

# Newest control-channel bytes kept per worker (the last stack dump, for time-limit errors).
DUMP_KEEP = 32 * 1024
# A worker that hears nothing from the task manager for max(this, 4 x heartbeat_timeout)
# seconds exits. Generous: this process may hold the GIL for a while (no pings meanwhile), and
# it only matters for cleanup after a partition that the worker's sockets cannot see.
MANAGER_TIMEOUT_MIN = 120.0


class Watchdog:
    def __init__(self, m: Manager) -> None:
        self.m = m
        self.zombies: dict[int, WorkerHandle] = {}
        self._told: set[int] = set()  # zombies asked to leave

    def manager_timeout(self) -> float | None:
        """How long a worker waits for a ping before it gives the manager up."""
        timeout = self.m.config.heartbeat_timeout
        return None if timeout is None else max(MANAGER_TIMEOUT_MIN, 4 * timeout)

    def watch(self, handle: WorkerHandle, now: float) -> None:
        """A worker connected: expect its heartbeats and send it pings."""
        handle.last_seen = now
        timeout = self.m.config.heartbeat_timeout
        if timeout is not None:
            self.m.at(now + timeout, partial(self._check_heartbeat, handle))
            self.m.at(now + self.m.config.heartbeat_interval, partial(self._ping, handle))

    # ---------------------------------------------------------------- control connection
    def control_connected(self, conn: Conn, info: dict[str, Any], nonce_w: bytes) -> None:
        token = info.get("worker_id")
        handle = self.m.fleet.workers.get(token) if isinstance(token, int) else None
        if (handle is None or handle.conn is None or handle.ctrl is not None
                or handle.record.pid != info.get("pid")):
            self.m.door.refuse(conn, protocol.STATUS_REFUSED,
                               f"no worker {token} (pid {info.get('pid')}) is waiting for its "
                               "control connection", nonce_w)
            return
        handle.ctrl = conn
        self.m.door.opened(conn, handle, "control")
        main_thread = info.get("main_thread")
        handle.main_thread = main_thread if isinstance(main_thread, int) else None
        self.m.door.welcome(conn, nonce_w)
        logger.debug("worker %d opened its control connection", handle.worker_id)

    def control_bytes(self, handle: WorkerHandle, data: bytes) -> None:
        handle.last_seen = time.monotonic()
        if protocol.ACK_MARK in data:  # answers first: they contain NUL bytes themselves
            data = self._answers(handle, data)
        data = data.replace(protocol.BEAT, b"")
        if data:
            dump = handle.dump + data
            if len(dump) > DUMP_KEEP:
                dump = dump[-DUMP_KEEP:]
            handle.dump = dump
            if handle.on_dump is not None and protocol.DUMP_END in data:
                callback, handle.on_dump = handle.on_dump, None
                callback()
        if handle.life is Life.ZOMBIE:
            self.zombie_alive(handle)

    def _answers(self, handle: WorkerHandle, data: bytes) -> bytes:
        """Take the workers' answers out of the control stream; return the rest (dump text)."""
        size = protocol.CONTROL_COMMAND.size
        rest = []
        while True:
            at = data.find(protocol.ACK_MARK)
            if at < 0 or len(data) < at + 1 + size:
                rest.append(data)  # an answer split across reads is lost: it only delays
                break              # dispatch to that worker until it dies or answers again
            rest.append(data[:at])
            command, task_id, attempt = protocol.CONTROL_COMMAND.unpack_from(data, at + 1)
            data = data[at + 1 + size:]
            if command == protocol.SKIPPED:
                self.m.stopper.skipped(handle, task_id, attempt)
        return b"".join(rest)

    def control_closed(self, conn: Conn, why: str) -> None:
        handle = conn.handle
        if handle is not None and handle.ctrl is conn:
            handle.ctrl = None
            # Not a loss by itself: the main connection or the process exit says so; should
            # the worker live on without it, its heartbeats stop and the heartbeat check decides.
            logger.debug("worker %d closed its control connection (%s)", handle.worker_id, why)
            if handle.life is Life.ZOMBIE:
                self.bury(handle)

    def send_control(self, handle: WorkerHandle, command: int, task_id: int,
                     attempt: int) -> bool:
        return self.m.door.send_open(handle.ctrl,
                                     [protocol.CONTROL_COMMAND.pack(command, task_id, attempt)])

    # ---------------------------------------------------------------- heartbeats
    def _check_heartbeat(self, handle: WorkerHandle) -> None:
        """Deadline: declare the worker lost if it has been silent for heartbeat_timeout."""
        if handle.over or handle.life is Life.SILENT:
            return
        timeout = self.m.config.heartbeat_timeout
        assert timeout is not None
        if time.monotonic() - handle.last_seen >= timeout:
            self.m.door.read_now(handle)
            if handle.over:
                return
        silent = time.monotonic() - handle.last_seen
        if silent < timeout:
            self.m.at(handle.last_seen + timeout, partial(self._check_heartbeat, handle))
            return
        self.m.fleet.declare_lost(handle, (
            f"no heartbeat for {silent:.1f} s (heartbeat_timeout={timeout:g} s): the worker is "
            "frozen (for example stopped with SIGSTOP), or its host is overloaded or "
            "unreachable"))

    def _ping(self, handle: WorkerHandle) -> None:
        """Deadline: tell the worker we are alive (it exits after manager_timeout without)."""
        if handle.over:
            return
        self.send_control(handle, protocol.PING, 0, 0)
        self.m.at(time.monotonic() + self.m.config.heartbeat_interval,
                  partial(self._ping, handle))

    # ---------------------------------------------------------------- zombies
    def haunt(self, handle: WorkerHandle, told: bool = False) -> None:
        """A worker declared lost that cannot be killed: keep its connections, drop what it
        sends, tell it to leave when it shows life, unless it was ``told`` already (its books
        are settled already)."""
        handle.to(Life.ZOMBIE)
        handle.lost_at = time.monotonic()
        self.zombies[handle.worker_id] = handle
        if told:
            self._told.add(handle.worker_id)

    def zombie_alive(self, handle: WorkerHandle) -> None:
        """A worker declared lost is sending again: it was replaced, so ask it to leave."""
        if handle.worker_id in self._told:
            return
        logger.warning("worker %d, declared lost %.1f s ago, is responding again; it has been "
                       "replaced and is asked to leave (what it still sends is dropped)",
                       handle.worker_id, time.monotonic() - handle.lost_at)
        self._told.add(handle.worker_id)
        self.m.door.send_open(handle.conn, protocol.encode_frame(protocol.SHUTDOWN,
                                                                 ("replaced",)))

    def zombie_frame(self, handle: WorkerHandle, frame: protocol.Frame) -> None:
        if frame.kind == protocol.RESULTS:
            for item in frame.meta[0]:
                logger.warning("dropped a late result for task %d (attempt %d) from worker %d, "
                               "which had been declared lost; the task was re-scheduled",
                               item[0], item[1], handle.worker_id)
        self.zombie_alive(handle)

    def bury(self, handle: WorkerHandle) -> None:
        """Forget a zombie for good: close whatever is left of it."""
        if handle.life is not Life.ZOMBIE:
            return
        handle.to(Life.BURIED)
        for conn in (handle.conn, handle.ctrl, handle.client):
            if conn is not None:
                self.m.door.close(conn)
        self.zombies.pop(handle.worker_id, None)
        self._told.discard(handle.worker_id)
