"""The worker process: ``python -m distexec.worker --connect HOST:PORT``.

A worker connects to the task manager, proves it holds the executor's key, receives its
configuration, runs the initializer, then executes the tasks it is sent and returns results.

Threads:
  * ``MainThread`` reads the manager's messages, runs tasks one at a time and sends their
    results (batched while more tasks are already waiting, so that short tasks cost one message
    per batch, not per task). It reads the socket itself, with no hand-off between threads, which
    keeps the round trip short. When the connection closes, the manager is gone and the worker
    exits.
  * ``distexec-flusher`` sends results that have waited ``FLUSH_MAX_DELAY`` in the outgoing
    batch while a longer task runs (armed only when results are held back, so the round trip of
    a lone task never involves it).
  * ``distexec-control`` owns the second, *control* connection (see :mod:`distexec.protocol`).
    It sends a NUL byte (a heartbeat) every heartbeat interval, receives ``ABORT``, ``DUMP``
    and ``PING`` commands, and sends ``LEAVE`` when the worker is asked to leave (SIGTERM, or
    Ctrl-C for a worker started by hand). When the control connection closes, the task manager
    is gone and the worker exits at once, even in the middle of a task.
  * ``distexec-client`` and ``distexec-client-results`` (only once a task reads shared data or
    submits child tasks, see :mod:`distexec.context`): the first reads the task manager's
    answers on the *client* connection and wakes the requests waiting for them; the second
    completes child tasks' futures (unpickling their results and running their callbacks), so
    that user code there cannot block the reader. A parent waiting for a child that is still
    queued gets it sent here (RUN) and runs it inline, on the main thread, inside the wait.
  * ``distexec-lifeline`` (when the key came on stdin) waits for stdin to close, which happens
    when the process that started the worker dies, even by SIGKILL; the worker then exits.

Heartbeats that need no GIL come from a *pulse* process (see :func:`start_pulse`): a tiny
child interpreter that writes a NUL byte to the control connection every interval while this
process is not stopped, so a task holding the GIL in a C call keeps its worker alive, and a
frozen (SIGSTOP) or unreachable worker falls silent. It exits as soon as this process does.
(Earlier versions used faulthandler's watchdog thread for this; it reads the other threads'
frames without the GIL and can crash the process or deadlock cancelling it, CPython
gh-116008.)

Aborting the running task: a worker the executor started exits (``EXIT_ABORTED``) and the
executor starts a fresh one; a worker started by hand re-executes itself with its original
command line, so it rejoins as a fresh worker and the pool keeps its size.

This module never imports the manager, the executor or paramiko.

Exit codes: 0 normal shutdown or left, 2 bad command line, 3 handshake failed or refused,
4 lost the task manager, 5 the initializer raised, 6 stopped to abort its task.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from functools import partial
from typing import Any

from . import context, protocol, serialization
from .pulse import start_pulse, stack_dump
from .worker_client import TaskClient, client_handshake, connect, worker_info
from .errors import (HandshakeError, ProtocolError, TaskDeclined, TaskPicklingError,
                     TaskUnpicklingError, too_large)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_HANDSHAKE = 3
EXIT_MANAGER_LOST = 4
EXIT_INITIALIZER = 5
EXIT_ABORTED = 6
# Sent by the watchdog to the main thread when unpickling a task's arguments is overdue.
WATCHDOG_SIGNAL = signal.SIGUSR1

# Results are sent in batches while more tasks wait locally; these bound a batch.
FLUSH_MAX_ITEMS = 64
FLUSH_MAX_BYTES = 1024 * 1024
FLUSH_MAX_DELAY = 0.005

# Upper bound on waiting for the control connection before running user code (it normally
# takes one round trip; if it fails, the control thread ends the process anyway).
CONTROL_SETUP_TIMEOUT = 30.0
class _Outbox:
    """Results waiting to be sent (main thread only)."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, ...]] = []
        self.buffers: list[Any] = []
        self.nbytes = 0
        self.since = 0.0

    def add(self, task_id: int, attempt: int, status: int, payload: bytes, oob: list[Any],
            duration: float, extra: Any, nbytes: int) -> None:
        if not self.items:
            self.since = time.monotonic()
        self.items.append(protocol.result_item(task_id, attempt, status, payload, oob,
                                               duration, extra, self.buffers))
        self.nbytes += nbytes

    def due(self) -> bool:
        return (
            len(self.items) >= FLUSH_MAX_ITEMS
            or self.nbytes >= FLUSH_MAX_BYTES
            or time.monotonic() - self.since >= FLUSH_MAX_DELAY
        )


class Worker:
    """One connection to a task manager and the loop that serves it."""

    def __init__(self, sock: socket.socket, worker_id: int, progress: Any = None) -> None:
        self.sock = sock
        # Set by main(): how to reach the manager again for the control connection, and how to
        # restart this process (None for workers the executor started: they just exit).
        self.address: tuple[str, int] | None = None
        self.key = b""
        self.heartbeat_interval: float | None = None
        self.manager_timeout: float | None = None
        self.restart_argv: list[str] | None = None
        self.progress = progress  # shared memory the local manager reads after a crash
        self.worker_id = worker_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.decoder = protocol.FrameDecoder()
        # The executor's max_message_size (from CONFIG): no message we send may carry more.
        self.max_message_size = protocol.DEFAULT_MAX_MESSAGE_SIZE
        # The executor's unpickle_timeout (from CONFIG), and the task whose function and
        # arguments the main thread is unpickling: (task id, attempt, since). Written by the
        # main thread only; the watchdog thread reads it (see watchdog()).
        self.unpickle_timeout: float | None = None
        self.unpickling: tuple[int, int, float] | None = None
        self.overdue: tuple[int, int, float] | None = None  # the watchdog asked to interrupt it
        self.interrupted = False  # the watchdog's signal raised in the main thread
        self.stopped = threading.Event()  # set by close(): the watchdog ends
        self.frames: deque[protocol.Frame] = deque()
        self.send_lock = threading.RLock()  # taken before out_cond when both are needed
        # Guards the outbox; the flusher thread waits on it (see flusher()).
        self.out_cond = threading.Condition(threading.Lock())
        self.flusher_armed = False
        self.closing = False
        self.fns: dict[int, Any] = {}  # fn_id -> callable, or bytes until first use
        # Globals of the functions the caller pickled by value from its __main__.
        self.main = serialization.MainNamespace()
        self.once: set[int] = set()  # fn_ids to forget after their task ran
        self.outbox = _Outbox()
        # The running task and the ones the manager aborted before they started; the control
        # thread reads and writes them under run_lock, the main thread under it too.
        self.run_lock = threading.Lock()
        self.current: tuple[int, int] | None = None
        self.outer: list[tuple[int, int]] = []  # tasks waiting for the child run inline
        self.skip: set[tuple[int, int]] = set()
        self.leaving = False
        self.leave_r, self.leave_w = os.pipe()
        self.control: socket.socket | None = None
        # The pulse process (see start_pulse): its pid and the write end of its lifeline pipe.
        self.pulse: tuple[int, int] | None = None
        self.pulse_lock = threading.Lock()
        # Set once heartbeats flow: user code (even the initializer) runs only after that, so
        # that a first task holding the GIL cannot starve the control thread's handshake.
        self.control_ready = threading.Event()
        self.origin = "joined"
        self.resources: dict[str, Any] = {}  # what its pool offers (from CONFIG)
        self.data: dict[str, Any] = {}  # shared data read by tasks, until FORGET
        # FORGETs seen per name: a copy fetched while one arrived may be stale, so it is used
        # once and not kept (fetch() compares before and after).
        self.forgotten: dict[str, int] = {}
        self.data_lock = threading.Lock()
        self._client: TaskClient | None = None
        self._client_lock = threading.Lock()

    # -- I/O -----------------------------------------------------------------------------
    def send(self, kind: int, meta: tuple[Any, ...], buffers: list[Any] = ()) -> None:  # type: ignore[assignment]
        parts = protocol.encode_frame(kind, meta, buffers)
        with self.send_lock:
            protocol.send_all_blocking(self.sock, parts)

    def _fill(self, block: bool) -> bool:
        """Read what the manager sent into ``self.frames``; False if nothing was available.

        Raises ConnectionError when the manager has closed the connection.
        """
        decoder = self.decoder
        flags = 0 if block else socket.MSG_DONTWAIT
        while True:
            try:
                n = self.sock.recv_into(decoder.recv_buffer(), 0, flags)
            except (BlockingIOError, InterruptedError):
                return bool(self.frames)
            if n == 0:
                raise ConnectionError("the task manager closed the connection")
            self.frames.extend(decoder.feed(n))
            if self.frames:
                return True
            flags = 0 if block else socket.MSG_DONTWAIT

    def next_frame(self) -> protocol.Frame:
        """The next message from the manager; blocks, flushing pending results first."""
        if not self.frames and not self._fill(block=False):
            self.flush()
            _flush_std_streams()
            self._fill(block=True)
        return self.frames.popleft()

    def flush(self) -> None:
        # send_lock first, so that batches leave in the order they were taken.
        with self.send_lock:
            with self.out_cond:
                box = self.outbox
                if not box.items:
                    return
                self.outbox = _Outbox()
                self.flusher_armed = False
            self.send(protocol.RESULTS, (box.items,), box.buffers)

    def add_result(self, task_id: int, attempt: int, status: int, payload: bytes,
                   oob: list[Any], duration: float, extra: Any, nbytes: int = 0) -> None:
        """Queue one finished task for the next RESULTS frame (see protocol.result_item);
        ``nbytes`` is what it adds to the frame (payload, buffers and ``extra``)."""
        box = self.outbox  # only this thread adds; the flusher may swap it for an empty one
        if box.items and (box.nbytes + nbytes > self.max_message_size
                          or len(box.buffers) + len(oob) + 1 > protocol.MAX_BUFFERS - 64):
            self.flush()  # one batch must stay within the limits of one frame
        with self.out_cond:
            self.outbox.add(task_id, attempt, status, payload, oob, duration, extra, nbytes)

    def before_task(self) -> None:
        """Results are about to wait while another task runs: make sure they are not held
        longer than FLUSH_MAX_DELAY, whatever that task's duration (wakes the flusher)."""
        if not self.flusher_armed:
            with self.out_cond:
                self.flusher_armed = True
                self.out_cond.notify()

    def flusher(self) -> None:
        """Flusher thread: send results that have waited FLUSH_MAX_DELAY behind a longer task."""
        cond = self.out_cond
        with cond:
            while not self.closing:
                if not self.flusher_armed or not self.outbox.items:
                    cond.wait()
                    continue
                remaining = self.outbox.since + FLUSH_MAX_DELAY - time.monotonic()
                if remaining > 0:
                    cond.wait(remaining)
                    continue
                cond.release()
                try:
                    self.flush()
                except OSError:
                    return
                finally:
                    cond.acquire()

    # -- main loop ------------------------------------------------------------------------
    def run(self) -> int:
        threading.Thread(target=self.flusher, name="distexec-flusher", daemon=True).start()
        if self.address is not None and self.heartbeat_interval is not None:
            threading.Thread(target=self.control_loop, name="distexec-control",
                             daemon=True).start()
        frame = self.next_frame()
        if self.address is not None and self.heartbeat_interval is not None:
            self.control_ready.wait(CONTROL_SETUP_TIMEOUT)
        if frame.kind != protocol.CONFIG:
            raise ProtocolError(f"expected CONFIG, got {protocol.KIND_NAMES[frame.kind]}")
        config: dict[str, Any] = frame.meta[0]
        limit = config.get("max_message_size")
        if isinstance(limit, int):
            self.max_message_size = limit
            self.decoder.max_message_size = limit + protocol.FRAME_OVERHEAD
        timeout = config.get("unpickle_timeout")
        if isinstance(timeout, (int, float)) and threading.current_thread() is \
                threading.main_thread():
            self.unpickle_timeout = float(timeout)
            signal.signal(WATCHDOG_SIGNAL, self._interrupt_unpickling)
            threading.Thread(target=self.watchdog, name="distexec-watchdog",
                             daemon=True).start()
        self.origin = str(config.get("origin", self.origin))
        self.resources = dict(config.get("resources") or {})
        context._worker = self
        if config.get("sys_path") is not None:
            sys.path[:] = _merge_sys_path(config["sys_path"])
        if config.get("initializer") is not None:
            try:
                initializer, initargs = serialization.loads_into(self.main,
                                                                 config["initializer"])
                initializer(*initargs)
            except BaseException as exc:
                note = f"[distexec] raised by the initializer on {self.where()}"
                data, type_name, message, text = serialization.dumps_exception(exc, note)
                self.send(protocol.INIT_FAILED, ((data, type_name, message, text),))
                self.close()
                return EXIT_INITIALIZER
        self.send(protocol.READY, (self.pid,))
        while True:
            frame = self.next_frame()
            if frame.kind == protocol.TASKS:
                self.run_batch(frame)
            elif frame.kind == protocol.FORGET:
                self.forget(frame.meta[0])
            elif frame.kind == protocol.SHUTDOWN:
                reason = frame.meta[0] if frame.meta else ""
                if reason == "replaced":
                    logger.warning("%s: the task manager declared this worker lost (it missed "
                                   "its heartbeats) and replaced it; exiting. Its late results "
                                   "are dropped", self.where())
                self.flush()
                self.close()
                return EXIT_OK
            else:
                raise ProtocolError(f"unexpected {protocol.KIND_NAMES[frame.kind]} message")
            if self.outbox.items and self.outbox.due():
                self.flush()

    def where(self) -> str:
        return f"worker {self.worker_id} (host {self.host}, pid {self.pid})"

    def close(self) -> None:
        with self.out_cond:
            self.closing = True
            self.out_cond.notify()
        self.stopped.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def run_batch(self, frame: protocol.Frame) -> None:
        defs, forget, items = frame.meta
        self.run_items(defs, forget, items, frame.buffers)

    def run_items(self, defs: list[Any], forget: list[int], items: list[Any],
                  buffers: list[Any]) -> None:
        """Run the tasks of one TASKS frame (or of a RUN answer, inline in a waiting task)."""
        for fn_id, data, once in defs:
            self.fns[fn_id] = data
            if once:
                self.once.add(fn_id)
        for fn_id in forget:
            self.fns.pop(fn_id, None)
        last = len(items) - 1
        for index, (task_id, attempt, fn_id, kind, payload, oob) in enumerate(
                protocol.read_task_items(items, buffers)):
            if self.outbox.items:
                self.before_task()
            self.run_task(task_id, attempt, fn_id, kind, payload, oob)
            if fn_id in self.once:
                self.once.discard(fn_id)
                self.fns.pop(fn_id, None)
            if self.outbox.items and index < last and self.outbox.due():
                self.flush()

    def run_task(
        self, task_id: int, attempt: int, fn_id: int, kind: int, payload: Any, oob: list[Any]
    ) -> None:
        key = (task_id, attempt)
        with self.run_lock:
            if key in self.skip:
                self.skip.discard(key)  # aborted before it started: the manager expects nothing
                return
            outer = self.current  # a parent task waiting for this child (run inline)
            if outer is not None:
                self.outer.append(outer)
            self.current = key
        progress = self.progress
        if progress is not None:
            protocol.PROGRESS.pack_into(progress, 0, task_id, attempt)
        try:
            self._run_task(task_id, attempt, fn_id, kind, payload, oob)
        finally:
            if outer is None:
                self.current = None
                if progress is not None:
                    protocol.PROGRESS.pack_into(progress, 0, 0, 0)
            else:  # back to the parent that ran this child inline
                with self.run_lock:
                    self.current = outer
                    self.outer.pop()
                if progress is not None:
                    protocol.PROGRESS.pack_into(progress, 0, *outer)

    def _run_task(
        self, task_id: int, attempt: int, fn_id: int, kind: int, payload: Any, oob: list[Any]
    ) -> None:
        fn: Any = None
        # (A child task run inline while its parent's arguments are unpickled, by a
        # __setstate__ that waits for it, puts the parent's entry back when it is done.)
        outer = self.unpickling
        if self.unpickle_timeout is not None:
            self.unpickling = (task_id, attempt, time.monotonic())
        try:
            fn = self.fns[fn_id]
            if isinstance(fn, bytes):
                fn = self.fns[fn_id] = serialization.loads_into(self.main, fn)
            args = serialization.loads_into(self.main, payload, oob)
            self.unpickling = outer  # inside the try: the watchdog's signal may come until here
        except BaseException as exc:
            self.unpickling = outer
            self.report_error(task_id, attempt, exc, -1.0,
                              f"[distexec] raised while unpickling task {task_id}'s function or "
                              f"arguments on {self.where()}")
            if self.interrupted:
                self.flush()
                self.end_process(f"unpickling task {task_id}'s arguments was interrupted")
            return
        del payload, oob
        start = time.perf_counter()
        try:
            if kind == 0:
                result = fn(*args[0], **args[1])
            else:
                result = [fn(*a) for a in args]
        except BaseException as exc:
            duration = time.perf_counter() - start
            if type(exc) is TaskDeclined:
                self.add_result(task_id, attempt, protocol.RESULT_DECLINED, b"", [], duration,
                                serialization.safe_str(exc))
                return
            if exc.__traceback__ is not None:
                # Start the remote traceback at the user's function, not at this frame.
                exc.__traceback__ = exc.__traceback__.tb_next
            self.report_error(task_id, attempt, exc, duration,
                              f"[distexec] raised in task {task_id} on {self.where()}")
            return
        duration = time.perf_counter() - start
        del args
        try:
            data, bufs = serialization.dumps(result)
        except BaseException as exc:
            err = TaskPicklingError(
                f"the result of task {task_id} ({serialization.describe_callable(fn)}) could not "
                f"be pickled: {type(exc).__name__}: {serialization.safe_str(exc)}. Return plain "
                "data (numbers, strings, lists, dicts, arrays) or make the type picklable"
            )
            err.__cause__ = exc
            self.report_error(task_id, attempt, err, duration, None)
            return
        size = serialization.nbytes(data, bufs)
        if size > self.max_message_size:
            del data, bufs
            self.report_error(task_id, attempt, too_large(
                f"the result of task {task_id} ({serialization.describe_callable(fn)})", size,
                self.max_message_size), duration, None)
            return
        self.add_result(task_id, attempt, protocol.RESULT_OK, data, bufs, duration, None, size)

    # -- what tasks ask for (distexec.context), on the client connection ---------------------
    def client(self) -> TaskClient:
        """The client connection, opened on first use (any thread running task code)."""
        with self._client_lock:
            if self._client is None or self._client.broken is not None:
                if self.address is None:
                    raise RuntimeError("this worker does not know its task manager's address, "
                                       "so its tasks cannot read shared data or submit tasks")
                self._client = TaskClient(self)
            return self._client

    def fetch(self, name: str) -> Any:
        """Shared data ``name``: from this worker's copy, else from the task manager."""
        with self.data_lock:
            try:
                return self.data[name]
            except KeyError:
                epoch = self.forgotten.get(name, 0)
        ok, extra, buffers = self.client().request(protocol.FETCH, (name,)).result()
        if not ok:
            raise KeyError(extra)
        value = serialization.loads_into(self.main, buffers[0], buffers[1:])
        with self.data_lock:
            if self.forgotten.get(name, 0) == epoch:
                self.data[name] = value
        return value

    def forget(self, names: list[str]) -> None:
        """FORGET (main or client connection): drop the copies of shared data that changed."""
        with self.data_lock:
            for name in names:
                self.data.pop(name, None)
                self.forgotten[name] = self.forgotten.get(name, 0) + 1

    def run_claimed(self, frame: protocol.Frame) -> None:
        """Run a child task the manager sent in answer to CLAIM, here and now (main thread,
        inside the waiting parent), and send its result at once."""
        _, defs, items = frame.meta
        self.run_items(defs, [], items, frame.buffers)
        self.flush()

    # -- control channel (distexec-control thread) -----------------------------------------
    def control_loop(self) -> None:
        """Control thread: heartbeats, ABORT commands, LEAVE requests, manager loss."""
        assert self.address is not None and self.heartbeat_interval is not None
        interval = self.heartbeat_interval
        try:
            sock = socket.create_connection(self.address, timeout=30)
            info = worker_info(self.worker_id)
            info.update(channel="control", main_thread=threading.main_thread().ident)
            client_handshake(sock, self.key, info)
        except (OSError, HandshakeError, ProtocolError) as exc:
            if not self.closing:
                logger.error("%s: could not open the control connection (%s); exiting",
                             self.where(), exc)
                _flush_std_streams()
                os._exit(EXIT_MANAGER_LOST)
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Bound how long the pulse process can block writing to a peer that stopped reading.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
        protocol.set_keepalive(sock)
        with self.out_cond:
            if self.closing:
                sock.close()
                return
            self.control = sock
        self.pulse = start_pulse(sock.fileno(), interval, self.where())
        self.control_ready.set()
        buf = b""
        size = protocol.CONTROL_COMMAND.size
        heard = time.monotonic()
        while True:
            if self.manager_timeout and time.monotonic() - heard > self.manager_timeout:
                logger.error("%s: no word from the task manager for %.0f s (the network to it "
                             "may be cut); exiting", self.where(), time.monotonic() - heard)
                _flush_std_streams()
                os._exit(EXIT_MANAGER_LOST)
            try:
                ready, _, _ = select.select([sock.fileno(), self.leave_r], [], [], interval)
                if self.leave_r in ready:
                    os.read(self.leave_r, 64)
                    self.send(protocol.LEAVE, ())
                if sock.fileno() in ready:
                    data = sock.recv(4096)
                    if not data:
                        break
                    heard = time.monotonic()
                    buf += data
                    while len(buf) >= size:
                        command, task_id, attempt = protocol.CONTROL_COMMAND.unpack(buf[:size])
                        buf = buf[size:]
                        if command == protocol.PING:
                            continue
                        if command == protocol.ABORT:
                            if not self.abort(task_id, attempt):
                                sock.sendall(protocol.ACK_MARK + protocol.CONTROL_COMMAND.pack(
                                    protocol.SKIPPED, task_id, attempt))
                        elif command == protocol.DUMP:
                            sock.sendall(protocol.DUMP_BEGIN + stack_dump()
                                         + protocol.DUMP_END)
                elif not ready:
                    sock.send(protocol.BEAT)
                    self.reap_pulse(block=False)
            except OSError:
                break
        if not self.closing:
            # The task manager is gone; whatever runs here is of no use to anyone.
            _flush_std_streams()
            os._exit(EXIT_MANAGER_LOST)

    def reap_pulse(self, block: bool) -> None:
        """Control thread: collect the pulse process if it has ended (so that it does not stay
        a zombie); with ``block``, end it first (before this process execs itself anew)."""
        with self.pulse_lock:  # the watchdog thread may end the process too (end_process)
            self._reap_pulse(block)

    def _reap_pulse(self, block: bool) -> None:
        if self.pulse is None:
            return
        pid, lifeline = self.pulse
        if block:
            os.close(lifeline)  # EOF: the pulse process exits at once
        deadline = time.monotonic() + (1.0 if block else 0.0)
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if done:
            if not block:
                os.close(lifeline)
            self.pulse = None
            if not block and not self.closing:
                logger.warning("%s: its heartbeat process ended; a task that holds the GIL "
                               "longer than heartbeat_timeout will be taken for a lost worker",
                               self.where())

    def watchdog(self) -> None:
        """Watchdog thread: a task whose function and arguments take longer than
        ``unpickle_timeout`` to unpickle (something in them blocks when it is rebuilt, such as
        a Manager proxy whose manager does not answer) fails instead of hanging its future.

        First the main thread is interrupted with WATCHDOG_SIGNAL, whose handler raises
        TaskUnpicklingError where it is stuck (a blocking system call returns EINTR): the task
        fails, and the worker is replaced all the same (see _run_task), because code
        interrupted at an arbitrary point (an import half done, a lock half taken) may have left
        the process unfit for the next task. If the signal does not free it (C code that
        retries, a handler of the user's for the signal), the task is failed from here and the
        worker ends, as for an abort, since its main thread is lost.
        """
        assert self.unpickle_timeout is not None
        timeout = self.unpickle_timeout
        poll = min(max(timeout / 4, 0.05), 5.0)
        while not self.stopped.wait(poll):
            current = self.unpickling
            if current is None or time.monotonic() - current[2] < timeout:
                continue
            self.overdue = current
            if signal.getsignal(WATCHDOG_SIGNAL) == self._interrupt_unpickling:
                signal.pthread_kill(threading.main_thread().ident or 0, WATCHDOG_SIGNAL)
                deadline = time.monotonic() + max(2 * poll, 2.0)
                while self.unpickling is current and time.monotonic() < deadline:
                    if self.stopped.wait(0.01):
                        return
            if self.unpickling is not current:
                continue
            task_id, attempt, _ = current
            err = TaskUnpicklingError(self._overdue_message(task_id) + " It could not be "
                                      "interrupted there, so the worker was restarted.")
            self.report_error(task_id, attempt, err, -1.0, None)
            self.flush()
            self.end_process(f"task {task_id}'s arguments could not be unpickled")

    def _overdue_message(self, task_id: int) -> str:
        return (f"unpickling task {task_id}'s function and arguments on {self.where()} did not "
                f"finish within unpickle_timeout={self.unpickle_timeout:g} s: something in them "
                "blocks or runs long while it is rebuilt (for instance a multiprocessing.Manager "
                "proxy whose manager process does not answer, or a __setstate__ that waits). "
                "Pass such objects in a form the worker can rebuild at once, or raise "
                "unpickle_timeout if it is only slow.")

    def _interrupt_unpickling(self, signum: int, frame: Any) -> None:
        """WATCHDOG_SIGNAL handler (main thread): raise where unpickling is stuck."""
        overdue = self.overdue
        if overdue is not None and self.unpickling is overdue:
            self.overdue = None
            self.interrupted = True
            raise TaskUnpicklingError(self._overdue_message(overdue[0]) + " The worker is "
                                      "replaced: it was interrupted at an arbitrary point.")

    def end_process(self, why: str) -> None:
        """End this worker (never returns): a worker started by hand re-executes itself with
        its original command line, so it rejoins as a fresh worker; others exit."""
        restart = self.restart_argv is not None and not self.leaving
        logger.warning("%s: %s; %s", self.where(), why,
                       "restarting this worker" if restart else "exiting")
        _flush_std_streams()
        if restart:
            assert self.restart_argv is not None
            self.reap_pulse(block=True)
            try:
                os.execv(sys.executable, [sys.executable, "-m", "distexec.worker",
                                          *self.restart_argv])
            except OSError as exc:
                logger.error("could not restart the worker: %s", exc)
        os._exit(EXIT_ABORTED)

    def abort(self, task_id: int, attempt: int) -> bool:
        """Control thread: stop the task if it runs (the process ends: this never returns);
        else make sure it never starts and return False."""
        with self.run_lock:
            key = (task_id, attempt)
            if self.current != key and key not in self.outer:
                self.skip.add(key)
                return False
        self.end_process(f"task {task_id} was aborted by the task manager")
        return True  # not reached

    def request_leave(self) -> None:
        """Signal handler (main thread): finish the tasks held, take no new one, exit.

        A second request exits at once.
        """
        if self.leaving:
            _flush_std_streams()
            os._exit(EXIT_OK)
        self.leaving = True
        logger.warning("%s: leaving after the tasks it holds (signal again to exit now)",
                       self.where())
        os.write(self.leave_w, b"L")

    def report_error(
        self, task_id: int, attempt: int, exc: BaseException, duration: float, note: str | None
    ) -> None:
        data, type_name, message, text = serialization.dumps_exception(exc, note)
        if len(data) + len(text) > self.max_message_size:
            # An exception that carries too much data: send what it says, not what it holds.
            summary = too_large(f"the {type_name} raised by task {task_id} "
                                f"({message[:80]!r})", len(data) + len(text),
                                self.max_message_size)
            data, type_name, message, text = serialization.dumps_exception(summary, note)
        self.add_result(task_id, attempt, protocol.RESULT_RAISED, data, [], duration,
                        (type_name, message, text), len(data) + len(text))


def _merge_sys_path(client_path: list[str]) -> list[str]:
    """The client's import path, followed by anything of ours it lacks (distexec's own root)."""
    merged = list(client_path)
    for entry in sys.path:
        if entry not in merged:
            merged.append(entry)
    return merged


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _lifeline(stream: Any) -> None:
    """Lifeline thread: exit as soon as the launching process closes our stdin."""
    try:
        while os.read(stream.fileno(), 65536):
            pass
    except OSError:
        pass
    _flush_std_streams()
    os._exit(EXIT_MANAGER_LOST)


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _read_key(args: argparse.Namespace) -> bytes:
    if args.key_stdin:
        line = sys.stdin.buffer.readline().strip()
    elif args.key_file:
        with open(args.key_file, "rb") as fh:
            line = fh.read().strip()
    elif os.environ.get(protocol.KEY_ENV):
        line = os.environ[protocol.KEY_ENV].strip().encode()
    else:
        raise ValueError(f"no key: pass --key-file or set {protocol.KEY_ENV}")
    try:
        text = line.decode()
    except UnicodeDecodeError:
        raise ValueError("the key must be hexadecimal") from None
    return protocol.parse_key(text, "the key")


def _adopt_mp_authkey(key: bytes) -> None:
    """Take the caller's multiprocessing authkey as ours, as a multiprocessing child inherits
    it, so that proxies of the caller's managers are admitted by their servers. Called before
    the first pickle that mentions multiprocessing is loaded: a worker whose tasks use none
    never imports multiprocessing."""
    from multiprocessing import current_process

    current_process().authkey = key


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distexec.worker",
                                     description="Run a distexec worker.")
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    parser.add_argument("--worker-id", type=int, default=None)
    parser.add_argument("--key-stdin", action="store_true",
                        help="read the key from the first line of stdin; exit when stdin closes")
    parser.add_argument("--key-file", default=None)
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="keep trying to reach the task manager this long (seconds)")
    parser.add_argument("--resources", default=None, metavar="SPEC",
                        help="named resources this worker offers, e.g. gpu=1,mem=16,zone=a")
    parser.add_argument("--progress-fd", type=int, default=None, help=argparse.SUPPRESS)
    # Local workers only: the caller's multiprocessing authkey, as the line after the key.
    parser.add_argument("--mp-authkey-stdin", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    started_by_executor = args.worker_id is not None
    # Our messages only: the root logger stays as it is in a fresh interpreter, so that what
    # tasks log goes where their own configuration (an initializer's handler) sends it.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("distexec worker: %(message)s"))
    package_logger = logging.getLogger("distexec")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING if started_by_executor else logging.INFO)
    package_logger.propagate = False
    if started_by_executor:
        # Ctrl-C in a terminal reaches the whole process group; it is meant for the user's
        # program, whose executor decides what happens to running tasks.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        key = _read_key(args)
        mp_authkey = None
        if args.key_stdin and args.mp_authkey_stdin:
            mp_authkey = bytes.fromhex(sys.stdin.buffer.readline().strip().decode())
        host, port = _parse_address(args.connect)
        resources = None
        if args.resources:
            from .options import parse_resources

            resources = parse_resources(args.resources)
    except (OSError, ValueError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    if args.key_stdin:
        threading.Thread(target=_lifeline, args=(sys.stdin,), name="distexec-lifeline",
                         daemon=True).start()
    try:
        sock = connect(host, port, args.connect_timeout)
    except OSError as exc:
        logger.error("cannot connect to the task manager at %s:%d (kept trying for %g s): %s. "
                     "Check the address, that the executor is running and listens on an "
                     "address this host can reach (listen=...), and firewalls", host, port,
                     args.connect_timeout, exc)
        return EXIT_MANAGER_LOST
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    protocol.set_keepalive(sock)
    try:
        info = worker_info(args.worker_id)
        if resources:
            info["resources"] = resources
        welcome = client_handshake(sock, key, info)
    except (HandshakeError, ProtocolError, OSError) as exc:
        logger.error("handshake with the task manager at %s:%d failed: %s", host, port, exc)
        return EXIT_HANDSHAKE
    sock.settimeout(None)
    progress = None
    if args.progress_fd is not None:
        import mmap

        try:
            progress = mmap.mmap(args.progress_fd, protocol.PROGRESS.size)
        except (OSError, ValueError):
            progress = None
    worker = Worker(sock, int(welcome["worker_id"]), progress)
    worker.address = (host, port)
    worker.key = key
    if mp_authkey is not None:
        worker.main.before_multiprocessing = partial(_adopt_mp_authkey, mp_authkey)
    interval = welcome.get("heartbeat_interval")
    worker.heartbeat_interval = float(interval) if interval else None
    silence = welcome.get("manager_timeout")
    worker.manager_timeout = float(silence) if silence else None
    if not started_by_executor:
        worker.restart_argv = argv
        logger.info("joined the executor at %s:%d as worker %d", host, port, worker.worker_id)
    # SIGTERM asks any worker to leave gracefully; so does Ctrl-C one started by hand.
    signal.signal(signal.SIGTERM, lambda signum, frame: worker.request_leave())
    if not started_by_executor:
        signal.signal(signal.SIGINT, lambda signum, frame: worker.request_leave())
    try:
        code = worker.run()
    except (OSError, ProtocolError, pickle.UnpicklingError) as exc:
        if worker.closing:
            return EXIT_OK
        if not isinstance(exc, ConnectionError):
            logger.error("worker %d: %s", worker.worker_id, exc)
        return EXIT_MANAGER_LOST
    if not started_by_executor and code == EXIT_OK:
        logger.info("worker %d left the executor", worker.worker_id)
    return code


if __name__ == "__main__":
    sys.exit(main())
