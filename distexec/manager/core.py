"""The task manager: one thread per executor that owns every table, socket and process.

Data flow::

    caller threads                     distexec-manager thread                   worker processes
    ──────────────                     ───────────────────────                   ────────────────
    submit() ─► inbox (deque) ─wake─►  drain inbox ─► Scheduler.queue
                                       Scheduler.plan() ─► pickle ─► TASKS ────► reader ─► run
                                                                                   │
    future.result() ◄─ set_result ◄─── RESULTS ◄────────────────────────────── send results
                                       selector: listener, wakeup socket,
                                       worker sockets, worker pidfds;
                                       timeout = next deadline (no polling)

Ownership: callers only append to the inbox and flip flags under :attr:`SharedState.lock`. The
manager thread alone reads and writes the scheduler's tables, the connections, the processes and
the deadlines, and it alone completes futures. User code that can run here (``__reduce__`` while
pickling an argument, ``__setstate__`` while unpickling a result) runs behind
``except BaseException``, so one bad task fails its own future and never the manager.

Worker loss: a worker is lost when its connection closes, its process exits, or it sends no
heartbeat (any byte on its control connection, see :mod:`distexec.protocol`) for
``heartbeat_timeout`` seconds. For an exit, the manager waits briefly for the other half of the
news (the exit status, or the socket's end) so that the error names the exit code or signal. A
silent local worker is killed; a silent remote one is kept as a *zombie*: its connections stay
open, anything it sends later is dropped, and once it shows life it is told to leave.

Every task the lost worker held goes back to the front of the queue. The one it was running (a
local worker publishes its id in shared memory; otherwise the oldest task it held) is charged
with the loss; once a task has been charged more than ``max_retries`` times it fails with
:class:`~distexec.errors.WorkerLostError` listing every attempt. Lost local workers are
replaced, after a backoff when they keep dying with no task finishing in between. A worker that
dies before it is ready (during start-up or in the initializer) counts as a failed start;
``START_FAILURE_LIMIT`` of those in a row break the executor rather than relaunching forever.

Dependencies: a task whose arguments include futures waits as BLOCKED; each dependency's
done-callback (whatever thread runs it) posts a :class:`~distexec.manager.events.DependencyDone`
to the inbox, and the manager queues the task with the results in place of the futures, or
fails it with DependencyError.

Requests from tasks arrive on each worker's *client* connection (see :mod:`distexec.protocol`):
shared data (FETCH; FORGET goes to the holders when it changes), child tasks (SUBMIT: a Task
whose function and arguments stay pickled, marked exclusive so that it is only ever queued or
running; its result is passed on to the parent unpickled), and CLAIM: a parent waiting for a
child that is still queued gets it sent back (RUN) to run inline, assigned to the parent's worker.
When a worker is lost, the tasks it ran inline are all charged, and its children that had not
started are cancelled.

Stopping a task (``abort``, a time limit, ``shutdown(cancel_running=True)``): its future is
settled first; then a local worker running it is killed, and any other worker is sent ``ABORT``
on its control connection. Tasks the worker held besides go back to the queue, uncharged.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import protocol, serialization
from . import events
from .handshakes import PendingHandshakes, RefusalLog
from .store import SharedStore
from .._version import __version__, installed_version
from ..errors import (
    BrokenDistributedExecutor,
    DependencyError,
    HandshakeError,
    LostAttempt,
    ProtocolError,
    RemoteError,
    TaskDeclined,
    TaskPicklingError,
    TaskTimeoutError,
    TaskUnpicklingError,
    WorkerLostError,
    too_large,
)
from ..launchers.local import LocalLauncher, LocalProcess
from ..scheduler import (
    Needs,
    Pool,
    Scheduler,
    Task,
    TaskKind,
    TaskState,
    WorkerRecord,
    WorkerState,
    task_ids,
)

if TYPE_CHECKING:  # the SSH launcher is imported only for an executor with hosts
    from ..launchers.hosts import HostSpec
    from ..launchers.ssh import SSHHost, SSHOptions, SSHProcess

logger = logging.getLogger("distexec.manager")

# A connection must complete the handshake within this many seconds or it is dropped.
HANDSHAKE_TIMEOUT = 10.0
# Connections still in their handshake (not yet proven to hold the key). When a new one would
# exceed this, the oldest is dropped: a real worker completes its handshake in one round trip,
# so only a peer that stalls loses its place. Each costs about 1 KiB here until it completes,
# closes or times out.
MAX_PENDING_HANDSHAKES = 256
# Refused connections are logged individually up to this many per REFUSAL_LOG_WINDOW seconds,
# then counted and summarised, so that a flood of junk cannot flood the log.
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_WINDOW = 10.0
# Accepting failed for lack of file descriptors or memory: stop accepting for this long.
ACCEPT_PAUSE = 0.1
# After a worker's connection drops, how long to wait for its exit status before killing it.
EXIT_GRACE = 2.0
# After SHUTDOWN, how long a worker may take to exit before it is killed.
SHUTDOWN_GRACE = 5.0
# Consecutive workers that fail to start (no READY in between) before the executor breaks.
# Only deterministic failures count: the worker reported its own start-up error, exited by
# itself, crashed (SIGSEGV and the like) or timed out. A worker killed from outside while it
# started (SIGKILL from the OOM killer or an operator, SIGTERM, ...) is replaced after a
# growing pause instead (see _killed_from_outside).
START_FAILURE_LIMIT = 3
# Signals a process raises against itself when it fails: a death by one of these during start-up
# is the worker's own failure. Any other signal came from outside.
_SELF_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT",
                                       "SIGSYS", "SIGTRAP", "SIGXCPU", "SIGXFSZ")
    if hasattr(signal, name))
# Replacing workers that keep dying: losses in a row (no task finished in between) that are
# replaced at once; after that the delay doubles from RESTART_BACKOFF up to RESTART_BACKOFF_MAX.
RESTART_FREE = 2
RESTART_BACKOFF = 0.1
RESTART_BACKOFF_MAX = 10.0


def _backoff(n: int) -> float:
    """The pause before the n-th retry in a row (n >= 1): 0.1 s, 0.2 s, ... up to 10 s."""
    return min(RESTART_BACKOFF * 2.0 ** (n - 1), RESTART_BACKOFF_MAX)

# Newest control-channel bytes kept per worker (the last stack dump, for time-limit errors).
DUMP_KEEP = 32 * 1024
# How long a task past its time limit may take to report its stack before it is stopped.
DUMP_WAIT = 0.5
# A worker that hears nothing from the task manager for max(this, 4 x heartbeat_timeout)
# seconds exits. Generous: this process may hold the GIL for a while (no pings meanwhile), and
# it only matters for cleanup after a partition that the worker's sockets cannot see.
MANAGER_TIMEOUT_MIN = 120.0
# How many function definitions each worker keeps; older ones are told to be forgotten.
WORKER_FN_CAPACITY = 256
# Upper bound on bytes read from one connection per loop turn, for fairness between workers.
READ_BUDGET = 8 * 1024 * 1024


class SharedState:
    """The only state shared between caller threads and the manager thread.

    ``lock`` guards ``shutdown``, ``broken`` and appends to ``inbox`` that must be ordered with
    them; reading the deque and waking the manager need no lock.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shutdown = False
        self.broken: BaseException | None = None  # the cause, once broken
        self.inbox: deque[Any] = deque()
        # Number of workers ready for tasks, published by the manager; callers wait on changes.
        self.ready_workers = 0
        self.stopped = False  # the manager thread has finished
        self.changed = threading.Condition(self.lock)


@dataclass(frozen=True)
class ManagerConfig:
    max_workers: int
    initializer: bytes | None
    max_tasks_per_child: int | None
    python: str | None
    worker_start_timeout: float
    max_message_size: int
    unpickle_timeout: float | None = 60.0
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    key: bytes | None = None
    heartbeat_timeout: float | None = 30.0
    max_retries: int = 3
    hosts: tuple[HostSpec, ...] = ()
    ssh: SSHOptions | None = None
    name: str | None = None  # registered for `distexec status NAME`
    resources: dict[str, float | str] | None = None  # what the local workers' pool offers
    # Descriptors local workers inherit for the initargs (distexec.mpobjects.Inheritance).
    inheritance: Any = None
    # Versions of the __main__ globals that functions carry (serialization.MainVersions).
    main_versions: Any = None

    @property
    def heartbeat_interval(self) -> float:
        # Five beats per timeout: one late beat is never mistaken for a frozen worker.
        if self.heartbeat_timeout is None:
            return 5.0
        return max(0.05, self.heartbeat_timeout / 5)


# In every pickle that holds a multiprocessing object (see distexec.mpobjects).
_MP_MARKER = b"multiprocessing"


class _CannotTravel(Exception):
    """A task's function or arguments hold objects its worker cannot use (the message says)."""


def force_cancel(future: Future[Any]) -> bool:
    """Cancel a future even if it is running (its task was stopped). Any thread.

    ``Future.cancel()`` refuses running futures by design; when distexec itself stops a running
    task the future must still end cancelled, with waiters and callbacks notified exactly as
    ``cancel()`` followed by ``set_running_or_notify_cancel()`` would.
    """
    with future._condition:
        if future._state in (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED):
            return False
        future._state = CANCELLED_AND_NOTIFIED
        for waiter in future._waiters:
            waiter.add_cancelled(future)
        future._condition.notify_all()
    future._invoke_callbacks()  # type: ignore[attr-defined]
    return True


def _cancel(task: Task) -> None:
    """Cancel a queued task's future; one re-queued after a lost worker is already running."""
    if task.attempt:
        force_cancel(task.future)
    elif task.future.cancel():
        # The task will never be claimed: notify concurrent.futures.wait() and as_completed()
        # now, as claiming it would have.
        task.future.set_running_or_notify_cancel()


def _settle(future: Future[Any], ok: bool, value: Any) -> None:
    """Complete a future, tolerating one that was cancelled meanwhile."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except InvalidStateError:
        pass


class _Conn:
    """One socket to a worker (or to something pretending to be one)."""

    __slots__ = ("sock", "peer", "open", "hs_buf", "nonce_m", "decoder", "out", "worker_id",
                 "want_write", "close_after_flush", "slot", "control", "client", "children")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.open = False  # handshake completed
        self.hs_buf = bytearray()
        self.nonce_m = protocol.new_nonce()
        # The frame decoder (and its buffer) exists only once the peer has proven it holds the
        # key: before that a connection costs a few hundred bytes (see _opened).
        self.decoder: protocol.FrameDecoder | None = None
        self.out = protocol.OutQueue()
        self.worker_id: int | None = None
        self.want_write = False
        self.close_after_flush = False
        self.slot: _Slot | None = None  # set once the handshake names the worker
        self.control = False  # the worker's control connection (heartbeats, ABORT)
        self.client = False  # a worker's client connection (its tasks' requests)
        self.children: dict[int, Task] | None = None  # client: request id -> child task


class _Slot:
    """The manager's handles on one worker: its connection, process and per-worker caches."""

    __slots__ = ("worker_id", "conn", "proc", "shutdown_sent", "known_fns", "exited",
                 "fail_reason", "disconnect_reason", "ctrl", "last_seen", "lost_reason",
                 "stopping", "retiring", "dump", "main_thread", "zombie", "lost_at",
                 "on_dump", "abort_pending", "limit", "limit_timer", "client", "bad_frame")

    def __init__(self, worker_id: int, proc: LocalProcess | SSHProcess | None) -> None:
        self.worker_id = worker_id
        self.conn: _Conn | None = None
        self.proc = proc
        self.shutdown_sent = False
        self.known_fns: OrderedDict[int, None] = OrderedDict()
        self.exited = proc is None  # a worker we did not start has no process to wait for
        self.fail_reason: str | None = None  # why we refused or killed it, for start failures
        self.disconnect_reason: str | None = None
        self.ctrl: _Conn | None = None  # the control connection
        self.last_seen = 0.0  # monotonic time of the last byte from either connection
        self.lost_reason: str | None = None  # declared lost for missing heartbeats
        self.stopping = False  # we stopped it to abort a task: its loss charges no one
        self.retiring = False  # the pool shrank: it is on its way out
        self.dump = b""  # newest control-channel text (stack dumps it was asked for)
        self.main_thread: int | None = None  # the worker's main thread id, as in the dumps
        self.zombie = False  # declared lost, connections kept to drop what it still sends
        self.lost_at = 0.0
        self.on_dump: Callable[[], None] | None = None  # waiting for a requested stack dump
        self.abort_pending: set[tuple[int, int]] = set()  # ABORTs sent, not yet answered
        self.limit: tuple[int, int, float] | None = None  # time-limited task, its deadline
        self.limit_timer = False  # a deadline entry for `limit` is in the heap
        self.client: _Conn | None = None  # the client connection, if its tasks opened one
        self.bad_frame = False  # dropped for a frame we could not take: charge a task

    def main_stack(self) -> str | None:
        """The worker's main-thread stack from its newest complete dump, or None."""
        text = self.dump.decode("ascii", "replace")
        dumps = text.split("Timeout (")
        if len(dumps) < 2 or self.main_thread is None:
            return None
        marker = f"hread 0x{self.main_thread:016x} "
        for dump in reversed(dumps[1:]):
            at = dump.find(marker)
            if at < 0:
                continue
            end = dump.find("\n\n", at)
            lines = []
            for line in dump[at:end if end >= 0 else len(dump)].splitlines()[1:]:
                if _WORKER_FRAME in line or line.startswith("End of requested dump"):
                    break  # distexec's own frames below the task's: not of interest
                lines.append(line)
            return "\n".join(lines) if lines else None
        return None


_WORKER_FRAME = os.path.join("distexec", "worker.py") + '"'


class Manager:
    """The task manager of one :class:`~distexec.DistributedExecutor`.

    Created in the caller's thread; :meth:`start` launches the ``distexec-manager`` thread that
    runs everything else. Callers use only :meth:`post`, :meth:`wake` and :meth:`join`.
    """

    def __init__(self, config: ManagerConfig, shared: SharedState) -> None:
        self.config = config
        self.shared = shared
        self.key = config.key or protocol.new_key()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
        self.listener = socket.create_server((config.listen_host, config.listen_port),
                                             family=family, backlog=128)
        self.listener.setblocking(False)
        host, port = self.listener.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.thread = threading.Thread(target=self._run, name="distexec-manager", daemon=False)
        # Manager-thread state below.
        self._sched = Scheduler()
        self._selector = selectors.DefaultSelector()
        self._slots: dict[int, _Slot] = {}
        self._conns: set[_Conn] = set()
        self._deadlines: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._worker_ids = itertools.count(1)
        self._fn_cache = serialization.FunctionCache()
        self._launcher = LocalLauncher(
            config.python,
            pass_fds=config.inheritance.fds if config.inheritance is not None else ())
        self._closing = False  # shutdown requested: finish the work, then stop
        self._terminating = False  # stop now
        self._start_failures = 0
        self._interrupted_starts = 0  # starting workers killed from outside, in a row
        self._last_start_failure = ""
        self._target = config.max_workers  # local workers wanted (resize() changes it)
        self._zombies: dict[int, _Slot] = {}
        # Connections in their handshake -> deadline (accept order is deadline order).
        self._pending = PendingHandshakes(MAX_PENDING_HANDSHAKES, HANDSHAKE_TIMEOUT)
        self._handshake_timer = False  # a deadline is armed for the oldest pending handshake
        self._refusals = RefusalLog(logger, REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW)
        self._crash_streak = 0  # workers lost in a row with no task finishing in between
        self._launch_not_before = 0.0  # restart backoff
        self._launch_timer = False  # a deadline to call _ensure_workers is pending
        self._barriers: list[tuple[int, Future[Any]]] = []  # (task id, reply) of wait_for_all
        self._on_event = self._handlers()
        self._hosts: list[SSHHost] = []
        self._host_failures: dict[str, int] = {}  # failed worker starts in a row, per host
        self.executor_ref: Any = None  # weakref to the executor, set by it
        self._started_at = time.monotonic()
        # Resource pools by origin: the local workers', each SSH host's, each joined worker's.
        self._pools: dict[str, Pool] = {
            "local": Pool("local", config.resources, slots=config.max_workers)}
        self._warned_needs: set[Any] = set()  # needs no pool has, warned about once
        self._store = SharedStore()  # shared data, and which workers hold a copy
        self._registration: Any = None  # the name's registry file, removed at teardown
        if config.name is not None:
            from .. import monitor

            try:
                self._registration = monitor.register(config.name, self.address, self.key)
            except BaseException:
                self.listener.close()
                raise

    # ---------------------------------------------------------------- caller side (any thread)
    def start(self) -> None:
        _live_managers.add(self)
        self.thread.start()

    def wake(self) -> None:
        """Make the manager look at its inbox soon. Cheap when a wakeup is already pending."""
        if not self._wake_pending:
            # A KeyboardInterrupt between setting the flag and sending would leave the flag set
            # with no byte sent, and every later wake() would skip the send: the manager would
            # never look at its inbox again. Undo the flag on any exception.
            try:
                self._wake_pending = True
                self._wake_w.send(b"\0")
            except OSError:
                pass
            except BaseException:
                self._wake_pending = False
                raise

    def handle_now(self, event: Any) -> None:
        """Manager thread only (an executor method called from a done-callback that runs
        there): handle ``event`` at once, since waiting for the next turn would deadlock."""
        self._on_event[type(event)](event)

    def post(self, event: Any) -> None:
        """Any thread: hand the manager a Task or an event (see :mod:`.events`)."""
        self.shared.inbox.append(event)
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self.thread and self.thread.is_alive():
            self.thread.join(timeout)

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
            self._selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
            self._start_hosts()
            self._ensure_workers()
            while not self._finished():
                self._turn()
        except BaseException as exc:  # a bug in distexec: say so, fail everything, clean up
            logger.exception("distexec task manager crashed")
            self._break(BrokenDistributedExecutor(
                f"the distexec task manager failed with an internal error ({exc!r}); "
                "please report this with the log above"), exc)
        finally:
            self._teardown()

    def _turn(self) -> None:
        timeout = None
        if self._deadlines:
            timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
        for key, mask in self._selector.select(timeout):
            key.data(key.fileobj, mask)
        self._drain_inbox()
        self._run_deadlines()
        self._dispatch()
        if self._barriers:
            self._check_barriers()
        if self._closing:
            self._progress_shutdown()

    def _finished(self) -> bool:
        return (self._closing or self._terminating) and not self._slots and not self._sched.tasks

    def _on_wakeup(self, sock: Any, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _drain_inbox(self) -> None:
        self._wake_pending = False
        inbox = self.shared.inbox
        sched = self._sched
        while inbox:
            item = inbox.popleft()
            if type(item) is Task:
                if self._terminating:
                    item.future.cancel()
                    continue
                x = item.x
                if x is not None:
                    if x.deps is not None:
                        self._add_with_deps(item)
                        continue
                    if x.needs is not None:
                        self._check_needs(item)
                sched.add_task(item)
            else:
                self._on_event[type(item)](item)

    def _handlers(self) -> dict[type, Callable[[Any], None]]:
        """What the manager does with each kind of event (see :mod:`.events`)."""
        return {
            events.Shutdown: self._on_shutdown,
            events.Terminate: lambda e: self._terminate(e.reason, e.sig),
            events.Abort: lambda e: _settle(e.reply, True, self.abort(e.task_id)),
            events.Resize: lambda e: self._resize(e.n),
            events.Query: lambda e: _settle(e.reply, True, self.snapshot()),
            events.Status: lambda e: _settle(e.reply, True, (self._sched.tag_counts(),
                                                             self.snapshot())),
            events.Barrier: self._on_barrier,
            events.DependencyDone: lambda e: self._dependency_done(e.task_id),
            events.Store: self._on_store,
            events.Retrieve: self._on_retrieve,
            events.Delete: self._on_delete,
            events.ProcessExited: lambda e: self._on_process_exit(e.proc),
            events.HostChanged: lambda e: self._on_host_event(e.kind, e.host, e.detail),
        }

    def _on_shutdown(self, event: events.Shutdown) -> None:
        self._closing = True
        if event.cancel_futures:
            for task in self._sched.cancel_queued():
                _cancel(task)

    def _on_barrier(self, event: events.Barrier) -> None:
        self._barriers.append((event.task_id, event.reply))
        self._check_barriers()

    def _on_store(self, event: events.Store) -> None:
        self._store_data(event.name, event.payload, event.buffers)
        _settle(event.reply, True, None)

    def _on_retrieve(self, event: events.Retrieve) -> None:
        entry = self._store.get(event.name)
        _settle(event.reply, entry is not None, (entry.payload, entry.buffers)
                if entry is not None else KeyError(f"no shared data named {event.name!r}"))

    def _on_delete(self, event: events.Delete) -> None:
        found = event.name in self._store
        if found:
            self._store_data(event.name, None, None)
        _settle(event.reply, found, None if found
                else KeyError(f"no shared data named {event.name!r}"))

    # ---------------------------------------------------------------- deadlines
    def _at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._deadlines, (when, next(self._seq), callback))

    def _run_deadlines(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, callback = heapq.heappop(self._deadlines)
            callback()

    # ---------------------------------------------------------------- workers: launching
    def _active(self) -> dict[str, int]:
        """Live workers we launched that are not on their way out, per origin."""
        counts: dict[str, int] = {}
        for w in self._sched.live_workers():
            slot = self._slots.get(w.id)
            if (w.origin != "joined" and w.state is not WorkerState.DRAINING
                    and slot is not None and not slot.retiring):
                counts[w.origin] = counts.get(w.origin, 0) + 1
        return counts

    def _ensure_workers(self) -> None:
        """Launch workers up to the targets: ``_target`` local ones, and each ready host's
        slots (respecting the restart backoff)."""
        self._launch_timer = False
        if (self._terminating or self.shared.broken is not None
                or (self._closing and not self._sched.tasks)):
            return  # stopping: workers are needed only to finish submitted work
        active = self._active()
        missing = max(0, self._target - active.get("local", 0))
        host_missing = [(h, h.slots - active.get(h.spec.label, 0)) for h in self._hosts
                        if h.state == "ready" and h.not_before <= time.monotonic()]
        if not missing and not any(n > 0 for _, n in host_missing):
            return
        now = time.monotonic()
        if now < self._launch_not_before:
            if not self._launch_timer:
                self._launch_timer = True
                self._at(self._launch_not_before, self._ensure_workers)
            return
        for _ in range(missing):
            self._launch()
        for host, n in host_missing:
            for _ in range(n):
                self._launch(host)

    def _resize(self, n: int) -> None:
        """Change the number of local workers; surplus ones leave after the tasks they hold."""
        logger.info("resizing the pool of local workers from %d to %d", self._target, n)
        self._target = n
        self._pools["local"].amounts["slots"] = float(n)
        self._ensure_workers()
        records = [w for w in self._sched.live_workers()
                   if w.origin == "local" and w.state is not WorkerState.DRAINING
                   and not self._slots[w.id].retiring]
        surplus = len(records) - n
        if surplus <= 0:
            return
        # Cheapest to retire first: not yet started, then idle, then those holding the fewest.
        order = {WorkerState.LAUNCHING: 0, WorkerState.CONNECTED: 1, WorkerState.IDLE: 2}
        records.sort(key=lambda w: (order.get(w.state, 3), len(w.assigned), -w.id))
        for record in records[:surplus]:
            slot = self._slots[record.id]
            slot.retiring = True
            if record.state is WorkerState.LAUNCHING or slot.conn is None:
                if slot.proc is not None:
                    slot.proc.kill()
                continue
            self._sched.drain(record.id)
            if not record.assigned and not slot.shutdown_sent:
                self._send_shutdown(slot)
        self._publish()

    def _launch(self, host: SSHHost | None = None) -> None:
        worker_id = next(self._worker_ids)
        now = time.monotonic()
        record = self._sched.add_worker(worker_id, socket.gethostname() if host is None
                                        else host.spec.label,
                                        self.config.max_tasks_per_child, now,
                                        self._pools["local"] if host is None
                                        else self._host_pool(host))
        proc: LocalProcess | SSHProcess
        if host is not None:
            record.local = False
            record.origin = host.spec.label
            proc = host.launch(worker_id, self.key)  # starts in the background
        else:
            try:
                proc = self._launcher.start(worker_id, self.address, self.key)
            except OSError as exc:
                record.transition(WorkerState.LOST)
                self._sched.forget_worker(worker_id)
                self._start_failed(f"worker {worker_id} could not be started with "
                                   f"{self._launcher.python}: {exc}")
                # Try again shortly (nothing else would): the failure limit breaks it.
                self._at(now + 0.05 * 2 ** self._start_failures, self._ensure_workers)
                return
            record.pid = proc.pid
        self._slots[worker_id] = _Slot(worker_id, proc)
        if isinstance(proc, LocalProcess) and proc.pidfd is not None:
            self._selector.register(proc.pidfd, selectors.EVENT_READ,
                                    self._exit_handler(proc))
        else:
            proc.watch(self._exit_from_thread)
        self._at(now + self.config.worker_start_timeout, partial(self._check_started, worker_id))

    def _host_pool(self, host: SSHHost) -> Pool:
        """The resource pool of one SSH host: its slots and its numeric or text settings."""
        label = host.spec.label
        pool = self._pools.get(label)
        if pool is None:
            pool = self._pools[label] = Pool(label, resources_from_settings(host.spec.settings),
                                             slots=host.slots or None)
        return pool

    def _exit_handler(self, proc: LocalProcess) -> Callable[[Any, int], None]:
        def handler(fd: Any, mask: int) -> None:
            self._on_process_exit(proc)
        return handler

    def _exit_from_thread(self, proc: Any) -> None:
        # Reaper thread: hand the news to the manager thread.
        self.post(events.ProcessExited(proc))

    def _check_started(self, worker_id: int) -> None:
        record = self._sched.workers.get(worker_id)
        slot = self._slots.get(worker_id)
        if record is None or slot is None or record.state is not WorkerState.LAUNCHING:
            return
        slot.fail_reason = (f"worker {worker_id} (pid {record.pid}) did not connect within "
                            f"{self.config.worker_start_timeout:g} s")
        logger.warning("%s; killing it", slot.fail_reason)
        if slot.proc is not None:
            slot.proc.kill()

    @staticmethod
    def _killed_from_outside(slot: _Slot, exitcode: int | None) -> bool:
        """A worker that died starting up by a signal it did not raise itself, and that we did
        not kill (timeouts and refusals set fail_reason): no evidence of a broken setup."""
        return (slot.fail_reason is None and slot.lost_reason is None and exitcode is not None
                and exitcode < 0 and -exitcode not in _SELF_SIGNALS)

    def _start_interrupted(self, reason: str) -> None:
        """A starting worker was killed from outside: start another, after a growing pause
        (0.1 s, 0.2 s, ... up to RESTART_BACKOFF_MAX) while it keeps happening."""
        self._interrupted_starts += 1
        delay = _backoff(self._interrupted_starts)
        self._launch_not_before = max(self._launch_not_before, time.monotonic() + delay)
        logger.warning("%s; killed from outside, so not counted as a failed start: starting "
                       "another in %.1f s", reason, delay)

    def _start_failed(self, reason: str, origin: str = "local") -> None:
        logger.warning("%s", reason)
        if origin != "local":
            count = self._host_failures[origin] = self._host_failures.get(origin, 0) + 1
            host = next((h for h in self._hosts if h.spec.label == origin), None)
            if host is None or host.state != "ready":
                return
            if count < START_FAILURE_LIMIT:
                # Try again on that host after a pause (0.1 s, 0.2 s, ...), not at once.
                host.not_before = time.monotonic() + _backoff(count)
                self._at(host.not_before, self._ensure_workers)
                return
            live = self._active().get(origin, 0)
            if live:
                # Keep the workers that run; stop adding more (e.g. sshd's MaxSessions).
                logger.error("host %s: %d workers in a row failed to start (the last one: %s); "
                             "keeping its %d running worker(s) and starting no more there",
                             origin, count, reason, live)
                host.slots = live
                return
            host.state = "failed"
            host.error = (f"{origin}: {count} workers in a row failed to start; the last "
                          f"one: {reason}")
            logger.error("giving up on host %s; its work goes to the other workers",
                         host.error)
            host.close()
            self._check_capacity()
            return
        self._start_failures += 1
        self._last_start_failure = reason
        if self._start_failures >= START_FAILURE_LIMIT:
            self._break(BrokenDistributedExecutor(
                f"could not start workers: {self._start_failures} attempts in a row failed; "
                f"the last one: {reason}. Check that {self._launcher.python} can run "
                "'python -m distexec.worker' (see the worker's stderr above)"), None)

    # ---------------------------------------------------------------- SSH hosts
    def _start_hosts(self) -> None:
        if not self.config.hosts:
            return
        from ..launchers.ssh import SSHHost, SSHOptions

        options = self.config.ssh or SSHOptions()
        for spec in self.config.hosts:
            host = SSHHost(spec, options, self.address,
                           on_ready=lambda h: self._host_event("ready", h, ""),
                           on_failed=lambda h, why: self._host_event("failed", h, why))
            self._hosts.append(host)
            host.start()

    def _host_event(self, kind: str, host: SSHHost, detail: str) -> None:
        # A host's thread: hand the news to the manager thread.
        self.post(events.HostChanged(kind, host, detail))

    def _on_host_event(self, kind: str, host: SSHHost, detail: str) -> None:
        if kind == "ready":
            self._ensure_workers()
        else:
            logger.error("host %s cannot be used: %s", host.spec.label, detail)
            self._check_capacity()
        if all(h.state != "connecting" for h in self._hosts) and \
                any(h.state == "failed" for h in self._hosts):
            logger.warning("hosts:\n%s", self._hosts_table())

    def _hosts_table(self) -> str:
        """One row per host: state, what its interpreter runs, slots, and what is wrong."""
        rows = [("host", "state", "python", "cloudpickle", "tblib", "distexec", "slots",
                 "problem")]
        for h in self._hosts:
            info = h.info
            rows.append((h.spec.label, h.state, str(info.get("python", "-")),
                         str(info.get("cloudpickle", "-")), str(info.get("tblib", "-")),
                         str(info.get("distexec", "-")), str(h.slots or "-"),
                         (h.error or "").removeprefix(f"{h.spec.label}: ")))
        widths = [max(len(r[i]) for r in rows) for i in range(7)]
        return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r[:7], widths, strict=True))
                         + "  " + r[7] for r in rows)

    def _check_capacity(self) -> None:
        """Break the executor when nothing can ever run its tasks: no local workers wanted,
        no usable host, no worker that joined by hand, and no way for one to join."""
        if self._terminating or self.shared.broken is not None:
            return
        if self._target > 0 or any(h.state in ("connecting", "ready") for h in self._hosts):
            return
        if any(w.origin == "joined" for w in self._sched.live_workers()):
            return
        if not self.config.hosts:
            return  # an executor that waits for workers started by hand
        self._break(BrokenDistributedExecutor(
            f"no host is usable, so no worker can run the tasks:\n{self._hosts_table()}\nRun "
            "'distexec hosts check FILE' to check the hosts again"), None)

    # ---------------------------------------------------------------- connections
    def _on_accept(self, sock: Any, mask: int) -> None:
        for _ in range(64):
            try:
                conn_sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors or memory: the listener stays readable, so pause
                # instead of spinning, and make room by dropping the oldest handshake.
                self._log_refusal("accepting a connection failed: %s; not accepting for "
                                  "%g s", exc, ACCEPT_PAUSE)
                self._drop_oldest_handshake("dropped to make room for new connections")
                try:
                    self._selector.unregister(self.listener)
                except (KeyError, ValueError):
                    return
                self._at(time.monotonic() + ACCEPT_PAUSE, self._resume_accepting)
                return
            conn_sock.setblocking(False)
            conn_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol.set_keepalive(conn_sock)
            conn = _Conn(conn_sock, f"{addr[0]}:{addr[1]}")
            if self._pending.full():
                self._drop_oldest_handshake(f"{MAX_PENDING_HANDSHAKES} connections were waiting "
                                            "to complete their handshake; dropped the oldest")
            self._conns.add(conn)
            self._selector.register(conn_sock, selectors.EVENT_READ, self._io_handler(conn))
            self._pending.add(conn, time.monotonic())
            self._arm_handshake_timer()
            self._send_raw(conn, [protocol.make_hello(conn.nonce_m)])

    def _io_handler(self, conn: _Conn) -> Callable[[Any, int], None]:
        def handler(sock: Any, mask: int) -> None:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and conn in self._conns:
                if not conn.open:
                    self._read_handshake(conn)
                elif conn.control:
                    self._read_control(conn)
                else:
                    self._read_frames(conn)
        return handler

    def _resume_accepting(self) -> None:
        if self._terminating or self.listener.fileno() < 0:
            return
        try:
            self._selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        except KeyError:
            pass  # registered already

    def _drop_oldest_handshake(self, reason: str) -> None:
        oldest = self._pending.oldest()
        if oldest is not None:
            self._reject(oldest, reason)

    def _arm_handshake_timer(self) -> None:
        if not self._handshake_timer:
            deadline = self._pending.next_deadline()
            if deadline is not None:
                self._handshake_timer = True
                self._at(deadline, self._expire_handshakes)

    def _expire_handshakes(self) -> None:
        """Drop the connections whose handshake is overdue."""
        self._handshake_timer = False
        for conn in self._pending.overdue(time.monotonic()):
            self._reject(conn, f"no complete handshake within {HANDSHAKE_TIMEOUT:g} s")
        self._arm_handshake_timer()

    def _opened(self, conn: _Conn) -> None:
        """The peer proved it holds the key: from now on it speaks frames."""
        conn.open = True
        conn.hs_buf = bytearray()
        if not conn.control:
            conn.decoder = protocol.FrameDecoder(self.config.max_message_size
                                                 + protocol.FRAME_OVERHEAD)

    def _log_refusal(self, msg: str, *args: Any) -> None:
        """Log a refused connection, at most REFUSAL_LOG_BURST times per window."""
        self._refusals.log(time.monotonic(), msg, *args)

    def _reject(self, conn: _Conn, reason: str) -> None:
        self._log_refusal("refused connection from %s: %s", conn.peer, reason)
        self._close(conn)

    def _read_handshake(self, conn: _Conn) -> None:
        try:
            # Never more than the handshake can hold: header plus the largest info.
            data = conn.sock.recv(protocol.AUTH.size + protocol.MAX_HANDSHAKE_JSON + 1
                                  - len(conn.hs_buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._reject(conn, f"connection error during the handshake: {exc}")
            return
        if not data:
            self._reject(conn, "closed during the handshake"
                         + (f" after sending {len(conn.hs_buf)} bytes" if conn.hs_buf else ""))
            return
        buf = conn.hs_buf
        buf += data
        try:
            if len(buf) >= 4 and bytes(buf[:4]) != protocol.MAGIC_AUTH:
                raise ProtocolError(f"not a distexec worker (it sent {bytes(buf[:16])!r})")
            if len(buf) < protocol.AUTH.size:
                return
            header = protocol.parse_auth_header(bytes(buf[:protocol.AUTH.size]))
            need = protocol.AUTH.size + header.info_len
            if len(buf) < need:
                return
            if len(buf) > need:
                raise ProtocolError("it sent data before the handshake completed")
            # Its handshake is complete, whatever the verdict: no longer pending.
            self._pending.done(conn)
            info = protocol.verify_auth(self.key, conn.nonce_m, header,
                                        bytes(buf[protocol.AUTH.size:need]))
        except HandshakeError as exc:
            status = (protocol.STATUS_BAD_KEY if "authentication" in str(exc)
                      else protocol.STATUS_VERSION_MISMATCH)
            self._refuse(conn, status, str(exc), b"")
            return
        except ProtocolError as exc:
            self._reject(conn, str(exc))
            return
        self._accept_worker(conn, info, header.nonce_w)

    def _refuse(self, conn: _Conn, status: int, reason: str, nonce_w: bytes) -> None:
        self._log_refusal("refused connection from %s: %s", conn.peer, reason)
        self._send_raw(conn, [protocol.make_welcome(self.key, conn.nonce_m, nonce_w, status,
                                                    {"error": reason})])
        conn.close_after_flush = True
        if not conn.out:
            self._close(conn)

    def _version_problem(self, info: dict[str, Any]) -> str | None:
        import sys

        here = {
            "python": "{}.{}".format(*sys.version_info[:2]),
            "cloudpickle": installed_version("cloudpickle"),
            "distexec": __version__,
        }
        there = {
            "python": ".".join(str(info.get("python", "?")).split(".")[:2]),
            "cloudpickle": str(info.get("cloudpickle", "?")),
            "distexec": str(info.get("distexec", "?")),
        }
        if here == there:
            return None
        differ = ", ".join(f"{k} {there[k]} there vs {here[k]} here"
                           for k in here if here[k] != there[k])
        return (
            f"version mismatch with the worker on host {info.get('host', '?')} "
            f"(pid {info.get('pid', '?')}): {differ}. The worker runs Python {there['python']}, "
            f"cloudpickle {there['cloudpickle']}, distexec {there['distexec']}; this executor "
            f"runs Python {here['python']}, cloudpickle {here['cloudpickle']}, distexec "
            f"{here['distexec']}. Install matching versions on both sides"
        )

    def _accept_worker(self, conn: _Conn, info: dict[str, Any], nonce_w: bytes) -> None:
        channel = info.get("channel")
        if channel == "control":
            self._accept_control(conn, info, nonce_w)
            return
        if channel == "status":
            self._answer_status(conn, nonce_w)
            return
        if channel == "client":
            self._accept_client(conn, info, nonce_w)
            return
        problem = self._version_problem(info)
        token = info.get("worker_id")
        slot = self._slots.get(token) if isinstance(token, int) else None
        if problem is not None:
            if slot is not None:
                slot.fail_reason = problem
            self._refuse(conn, protocol.STATUS_VERSION_MISMATCH, problem, nonce_w)
            return
        if self._terminating or (self._closing and not self._sched.tasks):
            self._refuse(conn, protocol.STATUS_REFUSED, "the executor is shutting down", nonce_w)
            return
        now = time.monotonic()
        if slot is not None:
            record = self._sched.workers[slot.worker_id]
            if record.state is not WorkerState.LAUNCHING or slot.conn is not None:
                self._refuse(conn, protocol.STATUS_REFUSED,
                             f"worker id {token} is already connected", nonce_w)
                return
        elif token is not None:
            self._refuse(conn, protocol.STATUS_REFUSED,
                         f"unknown worker id {token}: start workers without --worker-id to "
                         "join a running executor", nonce_w)
            return
        else:
            worker_id = next(self._worker_ids)
            pool = Pool(f"worker {worker_id}", _offered(info.get("resources")), slots=1)
            record = self._sched.add_worker(worker_id, str(info.get("host", "?")),
                                            self.config.max_tasks_per_child, now, pool)
            record.local = False
            record.origin = "joined"
            slot = _Slot(worker_id, None)
            self._slots[worker_id] = slot
            logger.info("worker %d joined from %s (pid %s on %s)", worker_id, conn.peer,
                        info.get("pid"), info.get("host"))
        record.pid = info.get("pid") if isinstance(info.get("pid"), int) else record.pid
        if slot.proc is not None and type(slot.proc) is not LocalProcess \
                and slot.proc.pid is None:
            slot.proc.pid = record.pid  # lets the host thread kill it by pid
        record.host = str(info.get("host", record.host))
        record.info = info
        record.connected_at = now
        record.transition(WorkerState.CONNECTED)
        slot.conn = conn
        conn.worker_id = slot.worker_id
        conn.slot = slot
        self._opened(conn)
        slot.last_seen = now
        timeout = self.config.heartbeat_timeout
        if timeout is not None:
            self._at(now + timeout, partial(self._check_heartbeat, slot))
            self._at(now + self.config.heartbeat_interval, partial(self._ping, slot))
        self._send_raw(conn, [protocol.make_welcome(
            self.key, conn.nonce_m, nonce_w, protocol.STATUS_OK,
            {"worker_id": slot.worker_id, "heartbeat_interval": self.config.heartbeat_interval,
             "manager_timeout": None if timeout is None else max(MANAGER_TIMEOUT_MIN,
                                                                   4 * timeout)})])
        config = {
            "worker_id": slot.worker_id,
            "sys_path": _client_sys_path() if isinstance(slot.proc, LocalProcess) else None,
            "initializer": self.config.initializer,
            "resources": record.pool.describe() if record.pool is not None else {},
            "origin": record.origin,
            "max_message_size": self.config.max_message_size,
            "unpickle_timeout": self.config.unpickle_timeout,
        }
        self._send_raw(conn, protocol.encode_frame(protocol.CONFIG, (config,)))
        logger.debug("worker %d connected from %s (pid %s)", slot.worker_id, conn.peer,
                     record.pid)

    def _accept_client(self, conn: _Conn, info: dict[str, Any], nonce_w: bytes) -> None:
        """A worker's client connection: requests from the tasks it runs."""
        token = info.get("worker_id")
        slot = self._slots.get(token) if isinstance(token, int) else None
        record = self._sched.workers.get(token) if isinstance(token, int) else None
        if slot is None or record is None or slot.conn is None or record.pid != info.get("pid"):
            self._refuse(conn, protocol.STATUS_REFUSED,
                         f"no worker {token} (pid {info.get('pid')}) is connected", nonce_w)
            return
        conn.worker_id = slot.worker_id
        conn.slot = slot
        conn.client = True
        conn.children = {}
        self._opened(conn)
        if slot.client is not None and slot.client is not conn:
            self._close(slot.client)
            self._client_closed(slot.client, "replaced by a new client connection")
        slot.client = conn
        self._send_raw(conn, [protocol.make_welcome(self.key, conn.nonce_m, nonce_w,
                                                    protocol.STATUS_OK, {})])
        logger.debug("worker %d opened a client connection", slot.worker_id)

    def _answer_status(self, conn: _Conn, nonce_w: bytes) -> None:
        """A ``distexec status`` client proved it holds the key: one STATUS frame, then close."""
        self._send_raw(conn, [protocol.make_welcome(self.key, conn.nonce_m, nonce_w,
                                                    protocol.STATUS_OK, {})])
        if conn in self._conns:
            conn.close_after_flush = True
            self._send_raw(conn, protocol.encode_frame(protocol.STATUS, (self.status_report(),)))

    def status_report(self) -> dict[str, Any]:
        """The executor's live statistics as plain data (strings, numbers, lists, dicts):
        what ``distexec status`` prints. Tags are given by their ``repr``. Manager thread."""
        tags = [[None if tag is None else _safe_repr(tag), *counts]
                for tag, counts in self._sched.tag_counts().items()]
        tags.sort(key=lambda row: (row[0] is not None, str(row[0])))
        workers = []
        for item in self.snapshot():
            item = dict(item)
            item["held"] = list(item["held"])
            workers.append(item)
        return {
            "name": self.config.name,
            "address": self.address,
            "pid": os.getpid(),
            "uptime": time.monotonic() - self._started_at,
            "state": ("terminating" if self._terminating else "shutting down" if self._closing
                      else "running"),
            "max_workers": self._target,
            "tags": tags,
            "workers": workers,
        }

    def _accept_control(self, conn: _Conn, info: dict[str, Any], nonce_w: bytes) -> None:
        token = info.get("worker_id")
        slot = self._slots.get(token) if isinstance(token, int) else None
        record = self._sched.workers.get(token) if isinstance(token, int) else None
        if (slot is None or record is None or slot.conn is None or slot.ctrl is not None
                or record.pid != info.get("pid")):
            self._refuse(conn, protocol.STATUS_REFUSED,
                         f"no worker {token} (pid {info.get('pid')}) is waiting for its "
                         "control connection", nonce_w)
            return
        slot.ctrl = conn
        conn.worker_id = slot.worker_id
        conn.slot = slot
        conn.control = True
        self._opened(conn)
        main_thread = info.get("main_thread")
        slot.main_thread = main_thread if isinstance(main_thread, int) else None
        self._send_raw(conn, [protocol.make_welcome(self.key, conn.nonce_m, nonce_w,
                                                    protocol.STATUS_OK, {})])
        logger.debug("worker %d opened its control connection", slot.worker_id)

    def _read_control(self, conn: _Conn) -> None:
        """Bytes on a control connection: heartbeats (stack dumps and NULs)."""
        slot = conn.slot
        assert slot is not None
        chunks = []
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._control_closed(conn, f"connection error: {exc}")
                return
            if not data:
                self._control_closed(conn, "connection closed")
                return
            chunks.append(data)
        if not chunks:
            return
        slot.last_seen = time.monotonic()
        data = b"".join(chunks)
        if protocol.ACK_MARK in data:  # answers first: they contain NUL bytes themselves
            data = self._control_acks(slot, data)
        data = data.replace(protocol.BEAT, b"")
        if data:
            dump = slot.dump + data
            if len(dump) > DUMP_KEEP:
                dump = dump[-DUMP_KEEP:]
            slot.dump = dump
            if slot.on_dump is not None and protocol.DUMP_END in data:
                callback, slot.on_dump = slot.on_dump, None
                callback()
        if slot.zombie:
            self._zombie_alive(slot)

    def _control_acks(self, slot: _Slot, data: bytes) -> bytes:
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
                slot.abort_pending.discard((task_id, attempt))
                if not slot.abort_pending and not slot.zombie:
                    # It had not started the aborted task: an ordinary worker again.
                    slot.stopping = False
                    slot.fail_reason = None
                    record = self._sched.workers.get(slot.worker_id)
                    if record is not None:
                        record.blocked = False
        return b"".join(rest)

    def _control_closed(self, conn: _Conn, why: str) -> None:
        self._close(conn)
        slot = conn.slot
        if slot is not None and slot.ctrl is conn:
            slot.ctrl = None
            # Not a loss by itself: the main connection or the process exit says so; should
            # the worker live on without it, its heartbeats stop and the heartbeat check decides.
            logger.debug("worker %d closed its control connection (%s)", slot.worker_id, why)
            if slot.zombie:
                self._bury(slot)

    def _send_control(self, slot: _Slot, command: int, task_id: int, attempt: int) -> bool:
        conn = slot.ctrl
        if conn is None or conn not in self._conns:
            return False
        self._send_raw(conn, [protocol.CONTROL_COMMAND.pack(command, task_id, attempt)])
        return True

    # ---------------------------------------------------------------- heartbeats
    def _check_heartbeat(self, slot: _Slot) -> None:
        """Deadline: declare the worker lost if it has been silent for heartbeat_timeout."""
        if self._slots.get(slot.worker_id) is not slot or slot.lost_reason or slot.zombie:
            return
        timeout = self.config.heartbeat_timeout
        assert timeout is not None
        # This thread may itself have been starved (the client held the GIL): read what is
        # waiting before concluding that the worker is silent.
        if time.monotonic() - slot.last_seen >= timeout:
            if slot.ctrl is not None and slot.ctrl in self._conns:
                self._read_control(slot.ctrl)
            if slot.conn is not None and slot.conn in self._conns:
                self._read_frames(slot.conn)
            if self._slots.get(slot.worker_id) is not slot:
                return
        silent = time.monotonic() - slot.last_seen
        if silent < timeout:
            self._at(slot.last_seen + timeout, partial(self._check_heartbeat, slot))
            return
        record = self._sched.workers[slot.worker_id]
        slot.lost_reason = (
            f"no heartbeat for {silent:.1f} s (heartbeat_timeout={timeout:g} s): the worker is "
            "frozen (for example stopped with SIGSTOP), or its host is overloaded or unreachable")
        logger.warning("declaring %s lost: %s", record.describe(), slot.lost_reason)
        if slot.proc is not None:
            slot.proc.kill()  # its exit completes the loss (_on_process_exit -> _finalize)
        else:
            self._finalize(slot, keep_connections=True)

    def _ping(self, slot: _Slot) -> None:
        """Deadline: tell the worker we are alive (it exits after manager_timeout without)."""
        if self._slots.get(slot.worker_id) is not slot:
            return
        self._send_control(slot, protocol.PING, 0, 0)
        self._at(time.monotonic() + self.config.heartbeat_interval, partial(self._ping, slot))

    # ---------------------------------------------------------------- zombies
    def _zombie_alive(self, slot: _Slot) -> None:
        """A worker declared lost is sending again: it was replaced, so ask it to leave."""
        if slot.shutdown_sent:
            return
        logger.warning("worker %d, declared lost %.1f s ago, is responding again; it has been "
                       "replaced and is asked to leave (what it still sends is dropped)",
                       slot.worker_id, time.monotonic() - slot.lost_at)
        slot.shutdown_sent = True
        if slot.conn is not None and slot.conn in self._conns:
            self._send_raw(slot.conn, protocol.encode_frame(protocol.SHUTDOWN, ("replaced",)))

    def _bury(self, slot: _Slot) -> None:
        """Forget a zombie for good: close whatever is left of it."""
        for conn in (slot.conn, slot.ctrl, slot.client):
            if conn is not None:
                self._close(conn)
        if slot.client is not None:
            self._client_closed(slot.client, "the worker is gone")
        self._zombies.pop(slot.worker_id, None)

    def _on_zombie_frame(self, slot: _Slot, frame: protocol.Frame) -> None:
        if frame.kind == protocol.RESULTS:
            for item in frame.meta[0]:
                logger.warning("dropped a late result for task %d (attempt %d) from worker %d, "
                               "which had been declared lost; the task was re-scheduled",
                               item[0], item[1], slot.worker_id)
        self._zombie_alive(slot)

    # ---------------------------------------------------------------- frames from workers
    def _read_frames(self, conn: _Conn) -> None:
        budget = READ_BUDGET
        decoder = conn.decoder
        slot = conn.slot
        assert slot is not None and decoder is not None
        while budget > 0:
            try:
                n = conn.sock.recv_into(decoder.recv_buffer())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._disconnected(conn, f"connection error: {exc}")
                return
            if n == 0:
                self._disconnected(conn, "connection closed")
                return
            slot.last_seen = time.monotonic()
            budget -= n
            try:
                frames = decoder.feed(n)
            except (ProtocolError, MemoryError) as exc:
                what = (str(exc) if type(exc) is not MemoryError else
                        "not enough memory for the frame it announced")
                logger.error("worker %s sent a frame that cannot be taken (%s); dropping its "
                             "connection", conn.worker_id, what)
                # Its next result was in that frame: the loss is charged to that task, so a
                # result that cannot be taken fails its task after max_retries, not loops.
                slot.bad_frame = True
                self._disconnected(conn, f"protocol error: {what}")
                return
            for frame in frames:
                if slot.zombie:
                    self._on_zombie_frame(slot, frame)
                else:
                    self._on_frame(conn, frame)
                if conn not in self._conns:
                    return

    def _on_frame(self, conn: _Conn, frame: protocol.Frame) -> None:
        worker_id = conn.worker_id
        assert worker_id is not None
        if conn.client:
            self._on_client_frame(conn, frame)
            return
        if frame.kind == protocol.RESULTS:
            self._on_results(worker_id, frame)
        elif frame.kind == protocol.READY:
            record = self._sched.workers[worker_id]
            if record.state is WorkerState.CONNECTED:
                self._sched.worker_ready(worker_id)
                if record.origin == "local":
                    self._start_failures = 0
                    self._interrupted_starts = 0
                else:
                    self._host_failures.pop(record.origin, None)
                logger.info("worker %d ready (pid %s on %s)", worker_id, record.pid, record.host)
                self._publish()
        elif frame.kind == protocol.LEAVE:
            record = self._sched.workers[worker_id]
            slot = self._slots[worker_id]
            logger.info("%s asked to leave; it finishes the %d task(s) it holds", record.describe(),
                        len(record.assigned))
            slot.retiring = True
            self._sched.drain(worker_id)
            if not record.assigned and not slot.shutdown_sent:
                self._send_shutdown(slot)
            self._publish()
            self._ensure_workers()
        elif frame.kind == protocol.INIT_FAILED:
            data, type_name, message, text = frame.meta[0]
            exc = serialization.loads_exception(data, type_name, message, text)
            record = self._sched.workers[worker_id]
            self._break(BrokenDistributedExecutor(
                f"the initializer failed on {record.describe()}: {type_name}: {message}. "
                "The executor cannot run tasks; fix the initializer and create a new one"), exc)
        else:
            self._disconnected(conn, f"protocol error: unexpected "
                                     f"{protocol.KIND_NAMES[frame.kind]} from a worker")

    def _on_results(self, worker_id: int, frame: protocol.Frame) -> None:
        (items,) = frame.meta
        sched = self._sched
        tasks = sched.tasks
        ASSIGNED = TaskState.ASSIGNED  # noqa: N806 (a local for the loop)
        for task_id, attempt, status, payload, oob, duration, extra in \
                protocol.read_result_items(items, frame.buffers):
            task = tasks.get(task_id)  # (inlined Scheduler.current: once per result)
            if (task is None or task.state is not ASSIGNED or task.attempt != attempt
                    or task.worker_id != worker_id):
                logger.info("dropped a stale result for task %d (attempt %d) from worker %d",
                            task_id, attempt, worker_id)
                continue
            self._crash_streak = 0
            if (task.x is not None and task.x.client is not None
                    and status != protocol.RESULT_DECLINED):
                self._child_finished(task, status == protocol.RESULT_OK, payload, oob, extra,
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
                    sched.settle(task, duration, True)
                    _settle(task.future, False, err)
                else:
                    sched.settle(task, duration, True)
                    _settle(task.future, True, value)
            elif status == protocol.RESULT_DECLINED:
                self._declined(task, str(extra))
            else:
                type_name, message, text = extra
                remote = serialization.loads_exception(payload, type_name, message, text)
                if task.retry_on is not None and isinstance(remote, task.retry_on):
                    if task.retries_used() < self._max_retries(task):
                        logger.warning("task %d (%s) raised %s: %s; retrying it (retry %d of %d)",
                                       task_id, serialization.describe_callable(task.fn),
                                       type_name, message, task.retries_used() + 1,
                                       self._max_retries(task))
                        sched.retry(task, duration)
                        continue
                if task.fallback is not None:
                    sched.retry(task, duration)  # back to the queue, as its fallback
                    self._to_fallback(task, remote)
                    continue
                sched.settle(task, duration, False)
                _settle(task.future, False, remote)
        slot = self._slots.get(worker_id)
        record = sched.workers.get(worker_id)
        if (slot is not None and record is not None and record.state is WorkerState.DRAINING
                and not record.assigned and not slot.shutdown_sent):
            self._send_shutdown(slot)

    def _declined(self, task: Task, reason: str) -> None:
        """The worker running ``task`` gave it back (``distexec.decline()``)."""
        worker_id = task.worker_id
        assert worker_id is not None
        record = self._sched.workers.get(worker_id)
        where = record.describe() if record is not None else f"worker {worker_id}"
        name = serialization.describe_callable(task.fn)
        if self._sched.decline(task):
            logger.info("task %d (%s) declined %s%s; it goes back to the queue", task.id, name,
                        where, f" ({reason})" if reason else "")
            return
        declined = ", ".join(str(w) for w in sorted(task.declined or ()))
        err = TaskDeclined(
            f"task {task.id} ({name}) was declined by every worker (workers {declined}); the "
            f"last, {where}, said: {reason or 'no reason given'}. Start a worker that can run "
            "it (for example with the resources it needs), or change what the task accepts")
        logger.error("task %d (%s) failed: every worker declined it", task.id, name)
        self._fail(task, err)

    def _fail(self, task: Task, err: BaseException) -> None:
        """An assigned task failed for good: run its fallback, or fail its future."""
        if task.fallback is not None:
            self._sched.requeue(task)
            self._to_fallback(task, err)
            return
        self._sched.fail_task(task)
        _settle(task.future, False, err)

    def _to_fallback(self, task: Task, exc: BaseException) -> None:
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

    # ---------------------------------------------------------------- client connections
    def _on_client_frame(self, conn: _Conn, frame: protocol.Frame) -> None:
        """A request from the tasks of a worker: read shared data, submit or claim a child."""
        kind = frame.kind
        if kind == protocol.FETCH:
            req_id, name = frame.meta
            entry = self._store.fetch(name, conn.worker_id)
            if entry is None:
                self._reply(conn, req_id, False, f"no shared data named {name!r}")
                return
            self._reply(conn, req_id, True, entry.version, [entry.payload, *entry.buffers])
        elif kind == protocol.SUBMIT:
            self._child_submitted(conn, frame)
        elif kind == protocol.CLAIM:
            self._child_claimed(conn, *frame.meta)
        else:
            self._disconnected(conn, f"protocol error: unexpected {protocol.KIND_NAMES[kind]} "
                                     "on a client connection")

    def _reply(self, conn: _Conn, req_id: int, ok: Any, extra: Any,
               buffers: list[Any] | tuple[()] = ()) -> None:
        if conn in self._conns:
            self._send_raw(conn, protocol.encode_frame(protocol.REPLY, (req_id, ok, extra),
                                                       buffers))

    def _client_closed(self, conn: _Conn, why: str) -> None:
        """A client connection ended: its children that have not started are cancelled (their
        parent is gone, or will run again and submit them again); running ones finish."""
        self._close(conn)
        slot = conn.slot
        if slot is not None and slot.client is conn:
            slot.client = None
        children, conn.children = conn.children or {}, {}
        dropped = 0
        for task in children.values():
            if task.state in (TaskState.QUEUED, TaskState.BLOCKED) and not task.attempt:
                self._sched.stop_task(task, TaskState.CANCELLED)
                _cancel(task)
                dropped += 1
        if dropped:
            logger.info("cancelled %d child task(s) of worker %s: %s", dropped, conn.worker_id,
                        why)

    def _store_data(self, name: str, payload: Any, oob: list[Any] | None) -> None:
        """Store (or, with payload None, delete) shared data; workers holding a copy are told
        to forget it, ahead of any task submitted after this."""
        for worker_id in self._store.put(name, payload, oob):
            slot = self._slots.get(worker_id)
            if slot is None:
                continue
            # On both connections: the main one orders it before later tasks; the client one
            # before a child that the worker is about to run inline (RUN), and at once.
            for conn in (slot.conn, slot.client):
                if conn is not None and conn in self._conns:
                    self._send_raw(conn, protocol.encode_frame(protocol.FORGET, ([name],)))

    def _child_submitted(self, conn: _Conn, frame: protocol.Frame) -> None:
        req_id, fn_data, name, options = frame.meta
        buffers = frame.buffers  # each its own bytearray (FrameDecoder): kept as they are
        try:
            opts = _child_options(options)
        except (TypeError, ValueError) as exc:
            data, type_name, message, text = serialization.dumps_exception(exc)
            self._reply(conn, req_id, False, (type_name, message, text), [data])
            return
        future: Future[Any] = Future()
        fn: Any = serialization.Pickled(fn_data, [], str(name))
        task = Task(next(task_ids), future, fn,
                    serialization.Pickled(buffers[0], buffers[1:]), None, TaskKind.CALL,
                    opts["time_limit"], opts["max_retries"], opts["tag"], opts["priority"],
                    opts["needs"])
        # Queued (where its parent can claim it) or running: never held in a prefetch window.
        task.exclusive = True
        task.client = (conn, req_id)
        future._distexec_task_id = task.id  # type: ignore[attr-defined]
        assert conn.children is not None
        conn.children[req_id] = task
        future.add_done_callback(partial(self._child_done, conn, req_id))
        if self._terminating:
            future.cancel()
            return
        logger.debug("worker %s submitted child task %d (%s)", conn.worker_id, task.id, name)
        if task.needs is not None:
            self._check_needs(task)
        self._sched.add_task(task)

    def _child_claimed(self, conn: _Conn, claim_id: int, req_id: int,
                       parent_id: int | None = None) -> None:
        """The parent waits for this child: if it is still queued, it runs inside the parent,
        on the parent's worker (so waiting never starves the pool)."""
        assert conn.children is not None
        task = conn.children.get(req_id)
        slot = conn.slot
        record = self._sched.workers.get(conn.worker_id)  # type: ignore[arg-type]
        if (task is None or task.state is not TaskState.QUEUED or slot is None
                or record is None or record.state not in (WorkerState.BUSY, WorkerState.IDLE,
                                                          WorkerState.DRAINING)
                or record.blocked or slot.conn is None):
            self._reply(conn, claim_id, False, "not queued")
            return
        if task.needs is not None and (record.pool is None
                                       or not record.pool.fits(task.needs, False)):
            # It needs what this worker's pool cannot lend now: it waits for a worker that can.
            self._reply(conn, claim_id, False, "its needs do not fit here")
            return
        self._sched.queue.remove(task)
        if not task.attempt and not self._claim(task):
            self._sched.stop_task(task, TaskState.CANCELLED)
            self._reply(conn, claim_id, False, "cancelled")
            return
        self._sched.assign(task, record)
        task.parent = parent_id if isinstance(parent_id, int) else None
        logger.debug("child task %d runs inside its parent on worker %d", task.id, record.id)
        self._send_tasks(slot, conn, [task], claim_id=claim_id)
        if task.time_limit is not None and task.id in record.assigned and (
                slot.limit is None or slot.limit[0] not in record.assigned):
            # (A parent's own time limit, if it has one, keeps running and bounds the child.)
            self._arm_limit(slot, task)

    def _child_finished(self, task: Task, ok: bool, payload: Any, oob: list[Any], extra: Any,
                        duration: float) -> None:
        """A child task's result or exception goes to its parent as it came, unpickled."""
        conn, req_id = task.client
        self._sched.settle(task, duration, ok)
        future = task.future
        future._distexec_forwarded = True  # type: ignore[attr-defined]
        _settle(future, True, None)
        self._reply(conn, req_id, ok, extra, [payload, *oob])

    def _child_done(self, conn: _Conn, req_id: int, future: Future[Any]) -> None:
        """Done-callback of a child's future: tell the parent how it ended, unless its result
        was passed on already (failed here: lost workers, time limit, cancelled...)."""
        if conn.children is not None:
            conn.children.pop(req_id, None)
        if getattr(future, "_distexec_forwarded", False) or conn not in self._conns:
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
        self._reply(conn, req_id, False, (type_name, message, text), [data])

    # ---------------------------------------------------------------- dependencies
    def _add_with_deps(self, task: Task) -> None:
        """File a task whose arguments include futures: it waits until they are done."""
        self._sched.add_blocked(task)
        assert task.deps is not None
        callback = partial(self._dep_callback, task.id)
        for dep in task.deps:
            dep.add_done_callback(callback)  # runs at once (posting) if already done

    def _dep_callback(self, task_id: int, _: Future[Any]) -> None:
        # Whichever thread completed the dependency: hand the news to the manager thread.
        self.post(events.DependencyDone(task_id))

    def _dependency_done(self, task_id: int) -> None:
        task = self._sched.tasks.get(task_id)
        if task is None or task.state is not TaskState.BLOCKED:
            return
        deps = task.deps
        assert deps is not None
        if task.future.cancelled():
            self._sched.stop_task(task, TaskState.CANCELLED)
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
                self._sched.stop_task(task, TaskState.FAILED)
                _settle(task.future, False, err)
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
            self._check_needs(task)
        self._sched.unblock(task)

    def _check_needs(self, task: Task) -> None:
        """Warn (once per kind of needs) about a task that no pool could ever run."""
        needs = task.needs
        assert needs is not None
        if needs.key in self._warned_needs:
            return
        if any(pool.could_ever_fit(needs) for pool in self._pools.values()
               if pool.workers or pool.name == "local" and self._target):
            return
        for host in self._hosts:
            if host.state != "failed" and Pool(host.spec.label, resources_from_settings(
                    host.spec.settings)).could_ever_fit(_without_slots(needs)):
                return
        self._warned_needs.add(needs.key)
        offered = "; ".join(f"{pool.name}: {pool.describe() or 'nothing'}"
                            for pool in self._pools.values()) or "no workers"
        logger.warning(
            "task %d (%s) needs %s, which no worker offers (%s); it waits until a worker that "
            "offers it joins (distexec worker --resources ..., or a host with those settings)",
            task.id, serialization.describe_callable(task.fn), needs, offered)

    # ---------------------------------------------------------------- writing
    def _send_raw(self, conn: _Conn, parts: list[Any]) -> None:
        conn.out.extend(parts)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        try:
            conn.out.write_to(conn.sock)
        except OSError as exc:
            self._disconnected(conn, f"connection error while sending: {exc}")
            return
        if conn.out and not conn.want_write:
            conn.want_write = True
            self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                  self._io_handler(conn))
        elif not conn.out:
            if conn.want_write:
                conn.want_write = False
                self._selector.modify(conn.sock, selectors.EVENT_READ, self._io_handler(conn))
            if conn.close_after_flush:
                self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        self._pending.done(conn)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # ---------------------------------------------------------------- dispatch
    def _claim(self, task: Task) -> bool:
        return task.future.set_running_or_notify_cancel()

    def _dispatch(self) -> None:
        if self._terminating or not self._sched.queue:
            return
        for record, tasks in self._sched.plan(self._claim):
            slot = self._slots[record.id]
            conn = slot.conn
            assert conn is not None
            self._send_tasks(slot, conn, tasks)
            for task in tasks:
                x = task.x
                if x is not None and x.time_limit is not None \
                        and task.state is TaskState.ASSIGNED:
                    self._arm_limit(slot, task)
            if record.state is WorkerState.DRAINING:
                # max_tasks_per_child reached: start its successor now to hide the startup time.
                self._publish()
                self._ensure_workers()
                if not record.assigned and not slot.shutdown_sent:
                    self._send_shutdown(slot)

    def _arm_limit(self, slot: _Slot, task: Task) -> None:
        """Start the clock of a time-limited task just sent to ``slot``'s worker. Such a task
        has its worker to itself: one deadline per worker suffices, and the heap holds ids,
        not tasks (a finished task's memory is freed)."""
        assert task.time_limit is not None
        expires = time.monotonic() + task.time_limit
        slot.limit = (task.id, task.attempt, expires)
        if not slot.limit_timer:
            slot.limit_timer = True
            self._at(expires, partial(self._check_limit, slot))

    # ---------------------------------------------------------------- stopping tasks
    def abort(self, task_id: int) -> bool:
        """Stop a task wherever it is; its future ends cancelled. Manager thread only."""
        task = self._sched.tasks.get(task_id)
        if task is None:
            return False
        if task.state is TaskState.BLOCKED or (task.state is TaskState.QUEUED
                                               and not task.attempt):
            self._sched.stop_task(task, TaskState.CANCELLED)
            return task.future.cancel()
        logger.info("aborting task %d", task_id)
        self._stop_task(task, TaskState.CANCELLED, None)
        return True

    def _check_limit(self, slot: _Slot) -> None:
        """Deadline: has the time-limited task on this worker run past its limit?"""
        slot.limit_timer = False
        if self._slots.get(slot.worker_id) is not slot or slot.limit is None:
            return
        task_id, attempt, expires = slot.limit
        task = self._sched.tasks.get(task_id)
        if (task is None or task.state is not TaskState.ASSIGNED or task.attempt != attempt
                or task.worker_id != slot.worker_id):
            slot.limit = None
            return
        if time.monotonic() < expires:  # a later task replaced the one this timer was for
            slot.limit_timer = True
            self._at(expires, partial(self._check_limit, slot))
            return
        self._time_limit_expired(task_id, attempt)

    def _time_limit_expired(self, task_id: int, attempt: int,
                            asked: _Slot | None = None) -> None:
        """The limit has passed: ask the worker for its stack (once), then stop the task.
        ``asked`` is the worker that was asked (the second call, by answer or by DUMP_WAIT)."""
        if asked is not None:
            asked.on_dump = None
        task = self._sched.tasks.get(task_id)
        if task is None or task.state is not TaskState.ASSIGNED or task.attempt != attempt:
            return
        assert task.time_limit is not None and task.worker_id is not None
        slot = self._slots.get(task.worker_id)
        if asked is None and slot is not None and slot.ctrl is not None and slot.on_dump is None:
            # Ask where it is first; stop it when the dump arrives, or after DUMP_WAIT anyway
            # (a task holding the GIL cannot answer).
            final = partial(self._time_limit_expired, task_id, attempt, slot)
            if self._send_control(slot, protocol.DUMP, task.id, attempt):
                slot.on_dump = final
                self._at(time.monotonic() + DUMP_WAIT, final)
                return
        if slot is not None:
            slot.on_dump = None
        record = self._sched.workers.get(task.worker_id)
        where = record.describe() if record is not None else f"worker {task.worker_id}"
        stack = slot.main_stack() if slot is not None else None
        name = serialization.describe_callable(task.fn)
        err = TaskTimeoutError(
            f"task {task.id} ({name}) exceeded its time limit of {task.time_limit:g} s on "
            f"{where}; the worker was stopped and will be replaced"
            + (f". Its last reported stack (most recent call first):\n{stack}" if stack else
               f". It did not report its stack within {DUMP_WAIT:g} s (a task that holds the "
               "GIL, in a C call, cannot)" if asked is not None else ""))
        logger.warning("task %d (%s) exceeded its time limit of %g s; stopping %s", task.id,
                       name, task.time_limit, where)
        self._stop_task(task, TaskState.FAILED, err)

    def _stop_task(self, task: Task, state: TaskState, err: BaseException | None) -> None:
        """Settle a task now (cancelled, or failed with ``err``) and stop it where it runs."""
        worker_id = task.worker_id if task.state is TaskState.ASSIGNED else None
        attempt = task.attempt
        future = task.future
        if err is not None and task.fallback is not None and worker_id is not None:
            self._fail(task, err)  # runs the fallback elsewhere; the worker is stopped below
        else:
            self._sched.stop_task(task, state)
            if err is None:
                force_cancel(future)
            else:
                _settle(future, False, err)
        slot = self._slots.get(worker_id) if worker_id is not None else None
        if slot is None:
            return
        how = "time limit" if err is not None else "abort"
        if slot.proc is not None and (slot.proc.running_task() == (task.id, attempt)
                                      or slot.ctrl is None):
            self._kill_to_stop(slot, f"stopped by the executor ({how} of task {task.id})")
        elif self._send_control(slot, protocol.ABORT, task.id, attempt):
            # If it runs the task, the worker exits (or restarts) and no one is charged for
            # that; if it had not started it, it says so (SKIPPED) and carries on. Until one
            # or the other, it gets no new task (whose time limit would run meanwhile).
            slot.stopping = True
            slot.abort_pending.add((task.id, attempt))
            slot.fail_reason = f"stopped by the executor ({how} of task {task.id})"
            self._sched.workers[slot.worker_id].blocked = True
        else:
            logger.warning("cannot reach worker %d to stop task %d; its result will be dropped",
                           slot.worker_id, task.id)

    def _kill_to_stop(self, slot: _Slot, reason: str) -> None:
        assert slot.proc is not None
        slot.stopping = True
        slot.fail_reason = reason
        self._sched.drain(slot.worker_id)  # no new task for a worker about to die
        self._publish()
        slot.proc.kill()

    def _check_barriers(self) -> None:
        """Answer the wait_for_all() calls whose earlier tasks have all ended."""
        tasks = self._sched.tasks
        oldest = next(iter(tasks), None)  # insertion order: (nearly) the smallest id
        still = []
        for threshold, reply in self._barriers:
            if oldest is not None and oldest < threshold:
                still.append((threshold, reply))
            elif oldest is not None and any(tid < threshold for tid in tasks):
                still.append((threshold, reply))  # a rare out-of-order submission
            else:
                _settle(reply, True, None)
        self._barriers = still

    # ---------------------------------------------------------------- status
    def _publish(self) -> None:
        """Tell waiting callers how many workers are ready (wait_for_workers)."""
        ready = sum(1 for w in self._sched.workers.values()
                    if w.state in (WorkerState.IDLE, WorkerState.BUSY))
        shared = self.shared
        if ready != shared.ready_workers:
            with shared.lock:
                shared.ready_workers = ready
                shared.changed.notify_all()

    def snapshot(self) -> list[dict[str, Any]]:
        """What each live worker is doing, as plain data. Manager thread only."""
        now = time.monotonic()
        out = []
        for record in self._sched.live_workers():
            slot = self._slots.get(record.id)
            running = None
            if slot is not None and slot.proc is not None and slot.proc.reports_progress:
                current = slot.proc.running_task()
                running = current[0] if current else None
            elif record.assigned:
                running = next(iter(record.assigned))
            out.append({
                "worker_id": record.id,
                "host": record.host,
                "pid": record.pid,
                "state": record.state.value,
                "local": record.local,
                "origin": record.origin,
                "held": tuple(record.assigned),
                "running": running,
                "tasks_done": record.tasks_done,
                "last_heartbeat_age": (now - slot.last_seen) if slot and slot.last_seen else None,
            })
        return out

    def _function(self, task: Task, slot: _Slot, defs: list[Any], forget: list[int]) -> int:
        fn: Any = task.fn
        if type(fn) is serialization.Pickled:  # a child task's function, pickled by its parent
            fn_id = self._fn_cache.add(task.fn, fn.data)  # a fresh id; not cached
            defs.append((fn_id, fn.data, True))
            return fn_id
        cached = self._fn_cache.lookup(fn)
        if cached is None:
            data = serialization.dumps_inband(fn, self.config.main_versions)
            fn_id = self._fn_cache.add(fn, data)
            cacheable = self._fn_cache.lookup(fn) is not None
        else:
            fn_id, data = cached
            cacheable = True
        known = slot.known_fns
        if fn_id in known:
            known.move_to_end(fn_id)
            return fn_id
        if _MP_MARKER in data and type(slot.proc) is not LocalProcess:
            self._check_remote(data, fn, slot)
        defs.append((fn_id, data, not cacheable))
        if cacheable:
            known[fn_id] = None
            if len(known) > WORKER_FN_CAPACITY:
                old, _ = known.popitem(last=False)
                forget.append(old)
        return fn_id

    def _send_tasks(self, slot: _Slot, conn: _Conn, tasks: list[Task],
                    claim_id: int | None = None) -> None:
        defs: list[Any] = []
        forget: list[int] = []
        items: list[Any] = []
        buffers: list[Any] = []
        limit = self.config.max_message_size
        batch_bytes = 0  # payload bytes of the frame being built

        def send_batch() -> None:
            nonlocal defs, forget, items, buffers, batch_bytes
            self._send_raw(conn, protocol.encode_frame(protocol.TASKS, (defs, forget, items),
                                                       buffers))
            defs, forget, items, buffers, batch_bytes = [], [], [], [], 0

        for task in tasks:
            first_def = len(defs)
            try:
                fn_id = self._function(task, slot, defs, forget)
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
            if _MP_MARKER in payload and type(slot.proc) is not LocalProcess:
                try:
                    self._check_remote(payload, (task.args, task.kwargs), slot)
                except _CannotTravel as exc:
                    self._unpicklable(task, "its arguments", exc)
                    continue
            size = sum(len(d[1]) for d in defs[first_def:]) + serialization.nbytes(payload, oob)
            if size > limit:
                # The function's definitions added for it go too: the worker will not learn it.
                for fid, _, _ in defs[first_def:]:
                    slot.known_fns.pop(fid, None)
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
                self._send_raw(conn, protocol.encode_frame(protocol.RUN,
                                                           (claim_id, defs, items), buffers))
            else:  # it could not be sent (its future says why): nothing to run
                self._reply(conn, claim_id, False, "the task could not be sent")
        elif items or forget or defs:
            send_batch()

    def _too_large(self, task: Task, size: int) -> None:
        name = serialization.describe_callable(task.fn)
        err = too_large(f"task {task.id} ({name}): its function and arguments", size,
                        self.config.max_message_size)
        logger.debug("task %d not sent: %s", task.id, err)
        self._sched.fail_task(task)
        _settle(task.future, False, err)

    def _check_remote(self, data: Any, obj: Any, slot: _Slot) -> None:
        """Raise _CannotTravel if ``obj`` (pickled as ``data``, which mentions
        multiprocessing) holds objects a worker not started here cannot use."""
        from ..mpobjects import check_for_remote

        record = self._sched.workers.get(slot.worker_id)
        where = record.describe() if record is not None else f"worker {slot.worker_id}"
        reason = check_for_remote(data, obj, where)
        if reason is not None:
            raise _CannotTravel(reason)

    def _unpicklable(self, task: Task, what: str, exc: BaseException) -> None:
        name = serialization.describe_callable(task.fn)
        if type(exc) is _CannotTravel:
            err = TaskPicklingError(f"task {task.id} ({name}) could not be sent: {what}: {exc}")
            logger.debug("task %d: %s cannot go to that worker", task.id, what)
            self._sched.fail_task(task)
            _settle(task.future, False, err)
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
        self._sched.fail_task(task)
        _settle(task.future, False, err)

    # ---------------------------------------------------------------- shutdown
    def _send_shutdown(self, slot: _Slot) -> None:
        slot.shutdown_sent = True
        self._sched.drain(slot.worker_id)
        self._publish()
        if slot.conn is not None:
            self._send_raw(slot.conn, protocol.encode_frame(protocol.SHUTDOWN, ("",)))
        if slot.proc is not None:
            self._at(time.monotonic() + SHUTDOWN_GRACE, partial(self._kill_late, slot))

    def _kill_late(self, slot: _Slot) -> None:
        if self._slots.get(slot.worker_id) is slot and slot.proc is not None and not slot.exited:
            logger.warning("worker %d did not exit %g s after being asked to; killing it",
                           slot.worker_id, SHUTDOWN_GRACE)
            slot.proc.kill()

    def _progress_shutdown(self) -> None:
        if self._sched.tasks:
            return
        for slot in list(self._slots.values()):
            if slot.shutdown_sent:
                continue
            if slot.conn is not None and slot.conn in self._conns:
                self._send_shutdown(slot)
            else:
                slot.shutdown_sent = True
                if slot.proc is not None:
                    slot.proc.kill()
                else:
                    self._finalize(slot)

    def _terminate(self, reason: str, sig: int = signal.SIGKILL) -> None:
        """Stop now: cancel everything, stop every worker: local ones by ``sig`` (SIGTERM:
        their connections are closed too, so they exit at once rather than leave gracefully),
        remote ones by SIGKILL on their host, hand-started ones by disconnecting them."""
        if self._terminating:
            return
        self._terminating = True
        self._closing = True
        logger.info("terminating the executor: %s", reason)
        for task in self._sched.cancel_queued():
            _cancel(task)
        for record in list(self._sched.workers.values()):
            for task in list(record.assigned.values()):
                if task.state is TaskState.ASSIGNED:  # a callback may have settled it
                    self._sched.fail_task(task)
                    force_cancel(task.future)
        for slot in list(self._slots.values()):
            slot.shutdown_sent = True
            if slot.proc is not None and sig != signal.SIGKILL and \
                    type(slot.proc) is LocalProcess:
                slot.proc.signal(sig)
                # Without its connections it exits at once, even mid-task (its control thread
                # sees the end of the connection); its exit is awaited as usual.
                for conn in (slot.conn, slot.ctrl, slot.client):
                    if conn is not None and conn in self._conns:
                        self._close(conn)
            elif slot.proc is not None:
                slot.proc.kill()
            else:
                # A worker started by hand: closing its connections makes it exit at once
                # (its control thread sees the end of the connection), even mid-task.
                self._finalize(slot)

    def _break(self, exc: BrokenDistributedExecutor, cause: BaseException | None) -> None:
        """The executor cannot go on: fail every pending future, refuse new work, stop."""
        if cause is not None:
            exc.__cause__ = cause
        with self.shared.lock:
            if self.shared.broken is not None:
                return
            self.shared.broken = exc
        logger.error("%s", exc)
        self._drain_inbox_into_failures(exc)
        for task in self._sched.cancel_queued():
            _settle(task.future, False, exc)  # cancelled in the books, failed for the user
        for record in list(self._sched.workers.values()):
            for task in list(record.assigned.values()):
                if task.state is TaskState.ASSIGNED:  # a callback may have settled it
                    self._sched.fail_task(task)
                    _settle(task.future, False, exc)
        self._terminating = True
        self._closing = True
        for slot in list(self._slots.values()):
            slot.shutdown_sent = True
            if slot.proc is not None:
                slot.proc.kill()
            else:
                self._finalize(slot)

    def _drain_inbox_into_failures(self, exc: BaseException) -> None:
        inbox = self.shared.inbox
        while inbox:
            item = inbox.popleft()
            if type(item) is Task:
                if item.future.set_running_or_notify_cancel():
                    _settle(item.future, False, exc)
            elif type(item) is events.Shutdown:
                self._closing = True

    # ---------------------------------------------------------------- worker loss
    def _disconnected(self, conn: _Conn, why: str) -> None:
        if conn.control:
            self._control_closed(conn, why)
            return
        if conn.client:
            self._client_closed(conn, why)
            return
        self._close(conn)
        slot = conn.slot
        if slot is not None and slot.zombie:
            self._bury(slot)
            return
        if slot is None or self._slots.get(slot.worker_id) is not slot or slot.conn is not conn:
            return
        if slot.disconnect_reason is None and not slot.shutdown_sent:
            slot.disconnect_reason = why
        if slot.exited:
            self._finalize(slot)
        else:
            assert slot.proc is not None
            record = self._sched.workers.get(slot.worker_id)
            if record is not None:
                record.blocked = True  # its connection is gone: nothing more can reach it
            # The exit status usually follows within milliseconds; give it a moment so the
            # error can name it, then stop waiting.
            self._at(time.monotonic() + EXIT_GRACE, partial(self._exit_overdue, slot))

    def _exit_overdue(self, slot: _Slot) -> None:
        if self._slots.get(slot.worker_id) is slot and not slot.exited and slot.proc is not None:
            logger.warning("worker %d closed its connection but did not exit; killing it",
                           slot.worker_id)
            slot.proc.kill()

    def _on_process_exit(self, proc: LocalProcess | SSHProcess) -> None:
        slot = self._slots.get(proc.worker_id)
        if slot is None or slot.proc is None or slot.proc is not proc or slot.exited:
            return
        if proc.poll() is None:
            return  # spurious wakeup
        slot.exited = True
        if proc.pidfd is not None:
            try:
                self._selector.unregister(proc.pidfd)
            except (KeyError, ValueError):
                pass
        if slot.conn is not None and slot.conn in self._conns:
            # Read whatever it sent before dying (results it managed to flush), then close.
            conn = slot.conn
            self._read_frames(conn)
            if conn in self._conns:
                self._disconnected(conn, "its process exited")
                return
            if self._slots.get(proc.worker_id) is not slot:
                return
        self._finalize(slot)

    def _finalize(self, slot: _Slot, keep_connections: bool = False) -> None:
        """The worker is over (connection closed and process exited, or declared lost): settle
        its books. With ``keep_connections`` (a silent remote worker) it becomes a zombie."""
        if self._slots.get(slot.worker_id) is not slot:
            return
        del self._slots[slot.worker_id]
        record = self._sched.workers[slot.worker_id]
        exitcode = slot.proc.poll() if slot.proc is not None else None
        record.exitcode = exitcode
        if keep_connections:
            slot.zombie = True
            slot.lost_at = time.monotonic()
            self._zombies[slot.worker_id] = slot
            if slot.client is not None:  # its tasks' requests would go unanswered
                self._client_closed(slot.client, "the worker was declared lost")
        else:
            for conn in (slot.conn, slot.ctrl, slot.client):
                if conn is not None:
                    self._close(conn)
            if slot.client is not None:
                self._client_closed(slot.client, "the worker is gone")
        clean = (slot.shutdown_sent and not record.assigned and not slot.lost_reason
                 and (exitcode is None or exitcode == 0 or self._terminating))
        if record.state in (WorkerState.LAUNCHING, WorkerState.CONNECTED):
            stage = ("before connecting" if record.state is WorkerState.LAUNCHING
                     else "while starting up (in the initializer or before it)")
            record.transition(WorkerState.LOST)
            if (not self._terminating and not slot.retiring
                    and (self._sched.tasks or not self._closing)):
                what = (slot.proc.describe_exit(exitcode) if slot.proc is not None
                        else slot.disconnect_reason or "connection lost")
                # fail_reason (timed out, wrong versions) is only ever set for our workers.
                reason = (f"{slot.fail_reason} ({what})" if slot.fail_reason else
                          slot.lost_reason or
                          f"worker {slot.worker_id} (pid {record.pid}) exited {stage}: {what}")
                if record.origin == "local" and self._killed_from_outside(slot, exitcode):
                    self._start_interrupted(reason)
                else:
                    self._start_failed(reason, record.origin)
        elif clean:
            if record.state is not WorkerState.GONE:
                if record.state is not WorkerState.DRAINING:
                    self._sched.drain(slot.worker_id)
                record.transition(WorkerState.GONE)
            log = logger.info if not record.local else logger.debug
            log("worker %d left (%s)", slot.worker_id,
                slot.proc.describe_exit(exitcode) if slot.proc is not None else "disconnected")
        else:
            self._worker_lost(slot, record, exitcode)
        if slot.proc is not None:
            slot.proc.close()
        self._sched.forget_worker(slot.worker_id)
        if self._sched.queue.declined:
            self._check_declined()
        self._publish()
        self._ensure_workers()

    def _check_declined(self) -> None:
        """A worker left: fail the queued tasks that every remaining worker has declined."""
        live = [w.id for w in self._sched.live_workers()]
        if not live:
            return  # nobody to run anything: wait for workers, as every task does
        for task in list(self._sched.queue.declined):
            declined = task.declined or set()
            if not all(w in declined for w in live):
                continue
            err = TaskDeclined(
                f"task {task.id} ({serialization.describe_callable(task.fn)}) was declined by "
                f"every worker still running (workers {', '.join(map(str, sorted(declined)))}). "
                "Start a worker that can run it, or change what the task accepts")
            logger.error("task %d failed: every remaining worker declined it", task.id)
            if task.fallback is not None:
                self._to_fallback(task, err)  # stays queued, now for any worker
            else:
                self._sched.stop_task(task, TaskState.FAILED)
                _settle(task.future, False, err)

    def _worker_lost(self, slot: _Slot, record: WorkerRecord, exitcode: int | None) -> None:
        """Re-queue what a lost worker held; charge the loss to the task it was running."""
        held = self._sched.worker_lost(slot.worker_id)
        if slot.lost_reason:
            what = slot.lost_reason + ("; it was killed" if slot.proc is not None else "")
        elif slot.bad_frame and slot.disconnect_reason:
            what = slot.disconnect_reason
        elif slot.stopping and slot.fail_reason:
            what = slot.fail_reason
        elif slot.proc is not None:
            what = slot.proc.describe_exit(exitcode)
        else:
            what = slot.fail_reason or slot.disconnect_reason or "connection lost"
        # A worker we stopped to abort a task (already settled) charges nobody for its death.
        culprit = None if slot.stopping else self._running_task(slot, held)
        if culprit is None and slot.bad_frame and held:
            culprit = held[0]  # results come back in order: its result was in the bad frame
        quiet = slot.stopping or (not held and self._closing)
        logger.log(logging.INFO if quiet else logging.WARNING, "lost %s: %s%s",
                   record.describe(), what,
                   f"; it was running task {culprit.id}" if culprit is not None else "")
        poisoned: list[Task] = []
        charged: list[Task] = []
        task_ids_held = {t.id: t for t in held}
        running = culprit
        while running is not None:
            # The running task, and the parents waiting for it if it ran inline in them: they
            # all ran on the lost worker (a child that kills its worker must not make its
            # parent retry for ever).
            charged.append(running)
            lost = LostAttempt(running.attempt, record.id, record.host, record.pid, exitcode,
                               what)
            if not self._sched.charge_loss(running, lost, self.config.max_retries):
                poisoned.append(running)
            running = task_ids_held.get(running.parent) if running.parent is not None else None
        # Everything else goes back to the front of the queue, in its order: tasks that had not
        # started, or had finished with their result still in the worker's outgoing batch.
        # Children whose parent's connection is gone are cancelled: nobody waits for them.
        for task in reversed(held):
            if task in poisoned:
                continue
            if task.client is not None and task.client[0] not in self._conns:
                self._sched.stop_task(task, TaskState.CANCELLED)
                force_cancel(task.future)
                continue
            self._sched.requeue(task)
        if culprit is not None and culprit not in poisoned:
            logger.warning("task %d (%s) will run again (its worker was lost %d time(s); "
                           "max_retries=%d)", culprit.id,
                           serialization.describe_callable(culprit.fn), len(culprit.losses or ()),
                           self._max_retries(culprit))
        if len(held) > (culprit is not None):
            logger.info("re-queued %d task(s) that worker %d held besides the one it ran",
                        len(held) - (culprit is not None), slot.worker_id)
        for task in poisoned:
            self._poisoned(task)
        if not slot.stopping and slot.proc is not None and not self._closing:
            # Workers that keep dying (no task finishing in between) are replaced ever slower.
            self._crash_streak += 1
            if self._crash_streak > RESTART_FREE:
                delay = _backoff(self._crash_streak - RESTART_FREE)
                self._launch_not_before = time.monotonic() + delay
                logger.info("%d workers lost in a row; next replacement in %.2f s",
                            self._crash_streak, delay)

    def _max_retries(self, task: Task) -> int:
        return self.config.max_retries if task.max_retries is None else task.max_retries

    def _poisoned(self, task: Task) -> None:
        """Fail a task whose workers were lost more often than its max_retries allows."""
        losses = task.losses or []
        last = losses[-1]
        name = serialization.describe_callable(task.fn)
        lines = "\n".join(f"  - {lost.describe()}" for lost in losses)
        err = WorkerLostError(
            f"task {task.id} ({name}) was running on a worker that was lost, "
            f"{len(losses)} time(s) (max_retries={self._max_retries(task)}), so it is not "
            f"retried again:\n{lines}\nIf the task itself kills its worker (memory, a crash "
            "in native code, os._exit), fix the task; otherwise raise max_retries",
            worker_id=last.worker_id, host=last.host, pid=last.pid, exitcode=last.exitcode,
            attempts=tuple(losses))
        logger.error("task %d (%s) failed: its worker was lost %d time(s)", task.id, name,
                     len(losses))
        self._fail(task, err)

    def _running_task(self, slot: _Slot, held: list[Task]) -> Task | None:
        """Which of a lost worker's tasks it was running: exact for local workers (they publish
        it in shared memory); otherwise the oldest task it held, as results come back in order."""
        if slot.proc is not None and slot.proc.reports_progress:
            running = slot.proc.running_task()
            if running is None:
                return None
            for task in held:
                if (task.id, task.attempt) == running:
                    return task
            return None
        return held[0] if held else None

    # ---------------------------------------------------------------- teardown
    def _teardown(self) -> None:
        """Last thing the thread does, also after a crash: nothing may be left behind."""
        for slot in list(self._slots.values()):
            if slot.proc is not None:
                slot.proc.kill()
        deadline = time.monotonic() + 5  # for all of them together
        for slot in list(self._slots.values()):
            if slot.proc is not None:
                if slot.proc.wait(max(0.0, deadline - time.monotonic())) is None:
                    logger.error("worker %d (pid %s) did not die", slot.worker_id, slot.proc.pid)
                slot.proc.close()
        for host in self._hosts:
            host.close()
        deadline = time.monotonic() + 10
        for host in self._hosts:
            host.join(max(0.0, deadline - time.monotonic()))
        for conn in list(self._conns):
            self._close(conn)
        leftover = BrokenDistributedExecutor("the task manager stopped before this task ran")
        for task in list(self._sched.tasks.values()):
            _settle(task.future, False, leftover)
        for _, reply in self._barriers:
            _settle(reply, True, None)  # every task has ended now, one way or another
        with self.shared.lock:
            self.shared.shutdown = True
            self.shared.stopped = True
            self.shared.ready_workers = 0
            self.shared.changed.notify_all()
        for sock in (self.listener, self._wake_r, self._wake_w):
            try:
                sock.close()
            except OSError:
                pass
        self._selector.close()
        if self._registration is not None:
            from .. import monitor

            monitor.unregister(self._registration)
        _live_managers.discard(self)


def resources_from_settings(settings: Any) -> dict[str, float | str]:
    """A hosts-file line's ``key=value`` settings as pool resources: numbers where they parse
    as numbers (``gpu=2``), text labels otherwise (``zone=a``)."""
    out: dict[str, float | str] = {}
    for key, value in settings:
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _safe_repr(obj: Any) -> str:
    """repr() of a user object, never raising (it runs on the manager thread)."""
    try:
        return repr(obj)
    except BaseException as exc:
        return f"<{type(obj).__name__} whose repr() raised {type(exc).__name__}>"


def _child_options(options: Any) -> dict[str, Any]:
    """Check the options a task gave a child task (TypeError/ValueError with what is wrong)."""
    if not isinstance(options, dict):
        raise TypeError("child task options must be a dict")
    tag = options.get("tag")
    hash(tag)
    priority = options.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError("priority must be an integer")
    time_limit = options.get("time_limit")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError("time_limit must be a positive number of seconds or None")
    max_retries = options.get("max_retries")
    if max_retries is not None and not (isinstance(max_retries, int) and max_retries >= 0):
        raise ValueError("max_retries must be an integer >= 0 or None")
    resources = options.get("resources")
    needs = None
    if resources:
        if not isinstance(resources, dict) or not all(
                isinstance(k, str) and (isinstance(v, str) or (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0))
                for k, v in resources.items()):
            raise ValueError("resources must map names to positive numbers or text labels")
        needs = Needs(resources)
    return {"tag": tag, "priority": priority, "time_limit": time_limit,
            "max_retries": max_retries, "needs": needs}


def _offered(spec: Any) -> dict[str, float | str] | None:
    """The resources a joined worker offers, keeping only well-formed entries."""
    if not isinstance(spec, dict):
        return None
    out: dict[str, float | str] = {}
    for name, value in spec.items():
        if (isinstance(name, str) and name.isidentifier() and name != "slots"
                and isinstance(value, (str, int, float)) and not isinstance(value, bool)):
            out[name] = value
        else:
            logger.warning("ignored the resource %r=%r offered by a worker", name, value)
    return out


def _without_slots(needs: Needs) -> Needs:
    spec: dict[str, float | str] = dict(needs.amounts)
    spec.pop("slots", None)
    spec.update(needs.labels)
    return Needs(spec)


def _client_sys_path() -> list[str]:
    import sys

    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]


# ---------------------------------------------------------------------------- interpreter exit
_live_managers: weakref.WeakSet[Manager] = weakref.WeakSet()
_interpreter_exiting = False


def interpreter_exiting() -> bool:
    return _interpreter_exiting


def _python_exit() -> None:
    # Runs before non-daemon threads are joined: finish the work already submitted (as
    # ProcessPoolExecutor does), then stop every worker.
    global _interpreter_exiting
    _interpreter_exiting = True
    managers = list(_live_managers)
    for manager in managers:
        with manager.shared.lock:
            manager.shared.shutdown = True
        manager.post(events.Shutdown(False))
    for manager in managers:
        manager.join()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


__all__ = ["Manager", "ManagerConfig", "SharedState", "TaskState", "WorkerRecord",
           "force_cancel"]
