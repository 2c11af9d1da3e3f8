"""The loop of the task manager: its thread, selector, wakeup, inbox, deadlines and teardown.

:class:`Manager` is built in the caller's thread (it opens the listener, so that the address is
known at once); :meth:`Manager.start` launches the ``distexec-manager`` thread, which runs
everything else. Other threads only append to the inbox (:meth:`Manager.post`: a new
:class:`~distexec.scheduler.Task`, or one of the typed events of :mod:`.events`) and wake the
loop; the manager thread alone reads and writes the tables, the sockets and the processes.

One turn of the loop: wait on the selector (the listener, the wakeup socket, every connection,
the workers' pidfds) until the next deadline; handle what is ready; drain the inbox; run the
deadlines due; dispatch queued tasks; answer barriers; move a shutdown along; then complete
the futures settled during the turn. Futures are completed only at such safe points (the end of
a turn, and after each RESULTS frame), never inside a room's handler, because completing one
runs its done-callbacks, which are user code: a callback that calls an executor method
(``abort()``, ``status()``) is then answered at once without finding the tables half-way
through a change (:meth:`Manager.handle_now`).

The work is done by the rooms, each of which owns its own state (see :mod:`distexec.manager`):
the door, the fleet and its lifecycle, the watchdog, dispatch, recovery, stopping, child tasks,
dependencies and barriers, shared data and status. They reach each other through the manager's
attributes (``door``, ``fleet``, ...) and the few methods below (``at``, ``settle``, ``post``,
``give_up``).

User code that can run on this thread (``__reduce__`` while pickling an argument,
``__setstate__`` while unpickling a result, done-callbacks) runs behind ``except
BaseException``, so one bad task fails its own future and never the manager.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import signal
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import TYPE_CHECKING, Any

from .. import protocol, serialization
from ..errors import BrokenDistributedExecutor
from ..launchers.base import Launcher
from ..launchers.local import LocalLauncher
from ..scheduler import Scheduler, Task, TaskState
from . import events
from .children import Children
from .connections import CLIENT, Door
from .dependencies import Dependencies
from .dispatch import Dispatch
from .fleet import Fleet
from .lifecycle import Life
from .recovery import Recovery
from .status import StatusRoom
from .stopping import Stopper
from .store import SharedStore
from .watchdog import Watchdog

if TYPE_CHECKING:  # the SSH launcher is imported only for an executor with hosts
    from ..launchers.hosts import HostSpec
    from ..launchers.ssh import SSHOptions
    from .connections import Conn

logger = logging.getLogger(__name__)


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


class ManagerConfig:
    """Everything the task manager needs to know, checked by :mod:`distexec.settings`.

    Read-only once made (the executor replaces it, with :meth:`replace`, while the manager has
    not started). A plain class with slots rather than a frozen dataclass: importing
    :mod:`dataclasses` (and :mod:`inspect` with it) costs about 5 ms of every executor's start.
    """

    __slots__ = ("max_workers", "initializer", "max_tasks_per_child", "python",
                 "worker_start_timeout", "max_message_size", "unpickle_timeout", "listen_host",
                 "listen_port", "key", "heartbeat_timeout", "max_retries", "hosts", "ssh",
                 "name", "resources", "inheritance", "main_versions")

    def __init__(
        self, *, max_workers: int, initializer: bytes | None, max_tasks_per_child: int | None,
        python: str | None, worker_start_timeout: float, max_message_size: int,
        unpickle_timeout: float | None = 60.0, listen_host: str = "127.0.0.1",
        listen_port: int = 0, key: bytes | None = None, heartbeat_timeout: float | None = 30.0,
        max_retries: int = 3, hosts: tuple[HostSpec, ...] = (), ssh: SSHOptions | None = None,
        name: str | None = None, resources: dict[str, float | str] | None = None,
        inheritance: Any = None, main_versions: Any = None,
    ) -> None:
        self.max_workers = max_workers
        self.initializer = initializer
        self.max_tasks_per_child = max_tasks_per_child
        self.python = python
        self.worker_start_timeout = worker_start_timeout
        self.max_message_size = max_message_size
        self.unpickle_timeout = unpickle_timeout
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.key = key
        self.heartbeat_timeout = heartbeat_timeout
        self.max_retries = max_retries
        self.hosts = hosts
        self.ssh = ssh
        self.name = name  # registered for `distexec status NAME`
        self.resources = resources  # what the local workers' pool offers
        # Descriptors local workers inherit for the initargs (distexec.mpobjects.Inheritance).
        self.inheritance = inheritance
        # Versions of the __main__ globals that functions carry (serialization.MainVersions).
        self.main_versions = main_versions

    def replace(self, **changes: Any) -> ManagerConfig:
        """A copy with ``changes``."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return ManagerConfig(**fields)

    @property
    def heartbeat_interval(self) -> float:
        # Five beats per timeout: one late beat is never mistaken for a frozen worker.
        if self.heartbeat_timeout is None:
            return 5.0
        return max(0.05, self.heartbeat_timeout / 5)


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


def _set(future: Future[Any], ok: bool, value: Any) -> None:
    """Complete a future, tolerating one that was cancelled meanwhile."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except InvalidStateError:
        pass


def _cancel_unclaimed(future: Future[Any]) -> None:
    if future.cancel():
        # The task will never be claimed: notify concurrent.futures.wait() and as_completed()
        # now, as claiming it would have.
        future.set_running_or_notify_cancel()


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
        listener = socket.create_server((config.listen_host, config.listen_port),
                                        family=family, backlog=128)
        listener.setblocking(False)
        host, port = listener.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.listener = listener
        self.thread = threading.Thread(target=self._run, name="distexec-manager", daemon=False)
        self.executor_ref: Any = None  # weakref to the executor, set by it
        # Manager-thread state below.
        self.books = Scheduler()
        self.closing = False  # shutdown requested: finish the work, then stop
        self.terminating = False  # stop now
        self._selector = selectors.DefaultSelector()
        self._deadlines: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        # Completions of futures settled during this turn, run at its end (see the docstring).
        self._completions: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._completing = False
        local = LocalLauncher(
            config.python, wanted=config.max_workers, resources=config.resources,
            pass_fds=config.inheritance.fds if config.inheritance is not None else ())
        # The rooms (see the module docstring).
        self.door = Door(self, listener, self._selector)
        self.fleet = Fleet(self, local, self._hosts())
        self.watchdog = Watchdog(self)
        self.dispatch = Dispatch(self)
        self.recovery = Recovery(self)
        self.stopper = Stopper(self)
        self.children = Children(self)
        self.deps = Dependencies(self)
        self.store = SharedStore()  # shared data, and which workers hold a copy
        self.status = StatusRoom(self)
        self._on_event = self._handlers()
        self._registration: Any = None  # the name's registry file, removed at teardown
        if config.name is not None:
            from .. import monitor

            try:
                self._registration = monitor.register(config.name, self.address, self.key)
            except BaseException:
                self.listener.close()
                raise

    def _hosts(self) -> list[Launcher]:
        if not self.config.hosts:
            return []
        from ..launchers.ssh import SSHHost, SSHOptions

        options = self.config.ssh or SSHOptions()
        return [SSHHost(spec, options, self.address, on_ready=self._host_ready,
                        on_failed=self._host_failed) for spec in self.config.hosts]

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

    def post(self, event: Any) -> None:
        """Any thread: hand the manager a Task or an event (see :mod:`.events`)."""
        self.shared.inbox.append(event)
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self.thread and self.thread.is_alive():
            self.thread.join(timeout)

    def handle_now(self, event: Any) -> None:
        """Manager thread only: an executor method called from a done-callback (waiting for
        the next turn would deadlock). Callbacks run only at the end of a turn, when no room
        is in the middle of a change, so the event is handled there and then."""
        if not self._completing:
            raise RuntimeError(
                "this executor method cannot be called while the task manager pickles or "
                "unpickles (from a __reduce__ or __setstate__ method); call it from your "
                "own thread, or from a future's done-callback")
        self._on_event[type(event)](event)
        self._complete()  # its reply (and what it settled) now: the caller waits for it

    def _host_ready(self, host: Any, info: dict[str, Any], slots: int) -> None:
        # An SSH host's thread: hand the news to the manager thread.
        self.post(events.HostChanged("ready", host, "", info, slots))

    def _host_failed(self, host: Any, why: str) -> None:
        self.post(events.HostChanged("failed", host, why))

    # ---------------------------------------------------------------- for the rooms
    def at(self, when: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` on this thread once ``time.monotonic()`` reaches ``when``."""
        heapq.heappush(self._deadlines, (when, next(self._seq), callback))

    def complete(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)``, which completes a future, at the end of this turn."""
        self._completions.append((fn, args))

    def settle(self, future: Future[Any], ok: bool, value: Any) -> None:
        """Complete ``future`` with a result (``ok``) or an exception, at the end of the turn."""
        self._completions.append((_set, (future, ok, value)))

    def force_cancel(self, future: Future[Any]) -> None:
        self._completions.append((force_cancel, (future,)))

    def cancel_task(self, task: Task) -> None:
        """Cancel a queued task's future; one re-queued after a lost worker is running."""
        if task.attempt:
            self.force_cancel(task.future)
        else:
            self._completions.append((_cancel_unclaimed, (task.future,)))

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> None:
        self._selector.register(fd, selectors.EVENT_READ, lambda _fd, _mask: callback())

    def unwatch_fd(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
            self.door.open()
            self.fleet.open()
            while not self._finished():
                self._turn()
        except BaseException as exc:  # a bug in distexec: say so, fail everything, clean up
            logger.exception("distexec task manager crashed")
            self.give_up(BrokenDistributedExecutor(
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
        self.dispatch.dispatch()
        self.deps.check_barriers()
        if self.closing:
            self._progress_shutdown()
        if self._completions:
            self._complete()

    def _complete(self) -> None:
        """Complete the futures settled during the turn (their callbacks run here)."""
        completions = self._completions
        was, self._completing = self._completing, True
        try:
            while completions:
                fn, args = completions.popleft()
                fn(*args)
        finally:
            self._completing = was

    def _finished(self) -> bool:
        return ((self.closing or self.terminating) and not self.fleet.workers
                and not self.books.tasks)

    def _on_wakeup(self, sock: Any, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _drain_inbox(self) -> None:
        self._wake_pending = False
        inbox = self.shared.inbox
        books = self.books
        while inbox:
            item = inbox.popleft()
            if type(item) is Task:
                if self.terminating:
                    self.complete(item.future.cancel)
                    continue
                x = item.extras
                if x is not None:
                    if x.deps is not None:
                        self.deps.add(item)
                        continue
                    if x.needs is not None:
                        self.fleet.warn_if_unplaceable(item)
                books.add_task(item)
            else:
                self._on_event[type(item)](item)

    def _run_deadlines(self) -> None:
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, callback = heapq.heappop(deadlines)
            callback()

    # ---------------------------------------------------------------- events
    def _handlers(self) -> dict[type, Callable[[Any], None]]:
        """What the manager does with each kind of event (see :mod:`.events`)."""
        status = self.status
        return {
            events.Shutdown: self._on_shutdown,
            events.Terminate: lambda e: self._terminate(e.reason, e.sig),
            events.Abort: lambda e: self.settle(e.reply, True, self.stopper.abort(e.task_id)),
            events.Resize: lambda e: self.fleet.resize(e.n),
            events.Query: lambda e: self.settle(e.reply, True, status.snapshot()),
            events.Status: lambda e: self.settle(e.reply, True, (self.books.tag_counts(),
                                                                 status.snapshot())),
            events.Barrier: lambda e: self.deps.barrier(e.task_id, e.reply),
            events.DependencyDone: lambda e: self.deps.done(e.task_id),
            events.Store: self._on_store,
            events.Retrieve: self._on_retrieve,
            events.Delete: self._on_delete,
            events.ProcessExited: lambda e: self.fleet.on_process_exit(e.proc),
            events.HostChanged: self.fleet.on_launcher_news,
        }

    def _on_shutdown(self, event: events.Shutdown) -> None:
        self.closing = True
        if event.cancel_futures:
            for task in self.books.cancel_queued():
                self.cancel_task(task)

    def _on_store(self, event: events.Store) -> None:
        self._store_data(event.name, event.payload, event.buffers)
        self.settle(event.reply, True, None)

    def _on_retrieve(self, event: events.Retrieve) -> None:
        entry = self.store.get(event.name)
        self.settle(event.reply, entry is not None, (entry.payload, entry.buffers)
                    if entry is not None else KeyError(f"no shared data named {event.name!r}"))

    def _on_delete(self, event: events.Delete) -> None:
        found = event.name in self.store
        if found:
            self._store_data(event.name, None, None)
        self.settle(event.reply, found, None if found
                    else KeyError(f"no shared data named {event.name!r}"))

    def _store_data(self, name: str, payload: Any, oob: list[Any] | None) -> None:
        """Store (or, with payload None, delete) shared data; workers holding a copy are told
        to forget it, ahead of any task submitted after this."""
        for worker_id in self.store.put(name, payload, oob):
            handle = self.fleet.workers.get(worker_id)
            if handle is None:
                continue
            # On both connections: the main one orders it before later tasks; the client one
            # before a child that the worker is about to run inline (RUN), and at once.
            forget = protocol.encode_frame(protocol.FORGET, ([name],))
            self.door.send_open(handle.conn, forget)
            self.door.send_open(handle.client, list(forget))

    # ---------------------------------------------------------------- frames from workers
    def on_frame(self, conn: Conn, frame: protocol.Frame) -> None:
        """A frame from a worker's main or client connection (the door read it)."""
        handle = conn.handle
        assert handle is not None
        if handle.life is Life.ZOMBIE:
            self.watchdog.zombie_frame(handle, frame)
            return
        if conn.channel is CLIENT:
            self.children.on_frame(conn, frame)
            return
        kind = frame.kind
        if kind == protocol.RESULTS:
            self.dispatch.on_results(handle, frame)
            # Between frames the rooms are between changes: complete the results' futures
            # now rather than at the end of the turn (a caller waiting on one gets it sooner).
            if self._completions:
                self._complete()
        elif kind == protocol.READY:
            self.fleet.ready(handle)
        elif kind == protocol.LEAVE:
            self.fleet.leave_asked(handle)
        elif kind == protocol.INIT_FAILED:
            data, type_name, message, text = frame.meta[0]
            exc = serialization.loads_exception(data, type_name, message, text)
            self.give_up(BrokenDistributedExecutor(
                f"the initializer failed on {handle.record.describe()}: {type_name}: "
                f"{message}. The executor cannot run tasks; fix the initializer and create a "
                "new one"), exc)
        else:
            self.door.disconnected(conn, f"protocol error: unexpected "
                                         f"{protocol.KIND_NAMES[kind]} from a worker")

    # ---------------------------------------------------------------- stopping
    def _progress_shutdown(self) -> None:
        if not self.books.tasks:
            self.fleet.all_leave()

    def _terminate(self, reason: str, sig: int = signal.SIGKILL) -> None:
        """Stop now: cancel everything, stop every worker: local ones by ``sig`` (SIGTERM:
        their connections are closed too, so they exit at once rather than leave gracefully),
        remote ones by SIGKILL on their host, hand-started ones by disconnecting them."""
        if self.terminating:
            return
        self.terminating = True
        self.closing = True
        logger.info("terminating the executor: %s", reason)
        for task in self.books.cancel_queued():
            self.cancel_task(task)
        for record in list(self.books.workers.values()):
            for task in list(record.assigned.values()):
                if task.state is TaskState.ASSIGNED:
                    self.books.end_task(task, TaskState.FAILED)
                    self.force_cancel(task.future)
        self.fleet.end_all(sig if sig != signal.SIGKILL else None)

    def give_up(self, exc: BrokenDistributedExecutor, cause: BaseException | None) -> None:
        """The executor cannot go on: fail every pending future, refuse new work, stop."""
        if cause is not None:
            exc.__cause__ = cause
        with self.shared.lock:
            if self.shared.broken is not None:
                return
            self.shared.broken = exc
        logger.error("%s", exc)
        self._drain_inbox_into_failures(exc)
        for task in self.books.cancel_queued():
            self.settle(task.future, False, exc)  # cancelled in the books, failed for the user
        for record in list(self.books.workers.values()):
            for task in list(record.assigned.values()):
                if task.state is TaskState.ASSIGNED:
                    self.books.end_task(task, TaskState.FAILED)
                    self.settle(task.future, False, exc)
        self.terminating = True
        self.closing = True
        self.fleet.end_all(None)

    def _drain_inbox_into_failures(self, exc: BaseException) -> None:
        inbox = self.shared.inbox
        while inbox:
            item = inbox.popleft()
            if type(item) is Task:
                if item.future.set_running_or_notify_cancel():
                    self.settle(item.future, False, exc)
            elif type(item) is events.Shutdown:
                self.closing = True

    def _teardown(self) -> None:
        """Last thing the thread does, also after a crash: nothing may be left behind."""
        try:
            self._complete()
        except BaseException:  # pragma: no cover - a callback that escaped its guard
            logger.exception("completing futures at teardown failed")
        self.fleet.teardown()
        self.door.close_all()
        leftover = BrokenDistributedExecutor("the task manager stopped before this task ran")
        for task in list(self.books.tasks.values()):
            self.settle(task.future, False, leftover)
        self.deps.release_all()
        self._complete()
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


__all__ = ["Manager", "ManagerConfig", "SharedState", "force_cancel"]
