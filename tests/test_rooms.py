"""The task manager's rooms with logic, fed events directly: no processes, no sockets."""

from __future__ import annotations

import pytest

from distexec.manager.store import SharedStore

pytestmark = pytest.mark.timeout(30)


def test_store_versions_readers_and_forgetting():
    store = SharedStore()
    assert store.put("a", b"p1", [b"x"]) == set()  # nobody holds a copy yet
    first = store.fetch("a", worker_id=1)
    assert first is not None and (first.payload, first.buffers) == (b"p1", [b"x"])
    assert store.fetch("a", worker_id=2) == first
    assert store.fetch("missing", worker_id=1) is None
    assert store.fetch(3, worker_id=1) is None  # a name that is not a string: nothing

    # Replacing it: the holders must be told, and then they hold nothing.
    assert store.put("a", b"p2", None) == {1, 2}
    second = store.get("a")
    assert second is not None and second.version > first.version and second.buffers == []
    assert store.put("a", b"p3", None) == set()

    # Deleting it.
    store.fetch("a", worker_id=3)
    assert "a" in store
    assert store.put("a", None, None) == {3}
    assert "a" not in store and store.get("a") is None


def test_store_get_does_not_make_a_reader():
    store = SharedStore()
    store.put("k", b"v", [])
    store.get("k")  # the caller's retrieve()
    assert store.put("k", b"w", []) == set()


def test_pending_handshakes_bound_order_and_deadlines():
    from distexec.manager.handshakes import PendingHandshakes

    pending = PendingHandshakes(limit=3, timeout=10.0)
    assert pending.oldest() is None and pending.next_deadline() is None
    assert pending.add("a", now=0.0) == 10.0
    pending.add("b", now=1.0)
    pending.add("c", now=2.0)
    assert pending.full() and pending.oldest() == "a"
    pending.done("a")  # completed its handshake
    assert not pending.full() and pending.oldest() == "b" and "a" not in pending
    pending.add("d", now=3.0)
    assert pending.next_deadline() == 11.0
    assert pending.overdue(now=10.5) == []
    assert pending.overdue(now=12.0) == ["b", "c"]  # still pending until the caller closes
    for conn in pending.overdue(now=12.0):
        pending.done(conn)
    assert len(pending) == 1 and pending.next_deadline() == 13.0


def test_refusals_are_logged_in_bursts_then_counted(caplog):
    import logging

    from distexec.manager.handshakes import RefusalLog

    log = logging.getLogger("distexec.test-refusals")
    refusals = RefusalLog(log, burst=2, window=10.0)
    with caplog.at_level(logging.WARNING, logger="distexec.test-refusals"):
        assert [refusals.log(t, "refused %s", t) for t in (0.0, 1.0, 2.0, 3.0)] == [
            True, True, False, False]
        assert refusals.log(10.0, "refused %s", "late")  # a new window: summary, then the line
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused 0.0", "refused 1.0",
                        "refused 2 more connection(s) in the last 10 s without logging each",
                        "refused late"]


# ---------------------------------------------------------------------------------------------
# The rooms with logic (fleet, watchdog, dispatch, recovery, stopping), fed events through a
# hub that stands in for the manager's loop: a fake clock (deadlines run when the test says),
# a door that records what would be sent, and a launcher whose "processes" are plain objects
# that report the exit code the test gives them. Everything else is the real room.
# ---------------------------------------------------------------------------------------------
import pickle  # noqa: E402
import signal  # noqa: E402
from concurrent.futures import Future  # noqa: E402

from distexec import protocol, serialization  # noqa: E402
from distexec._version import versions  # noqa: E402
from distexec.errors import (  # noqa: E402
    BrokenDistributedExecutor,
    TaskDeclined,
    TaskTimeoutError,
    WorkerLostError,
)
from distexec.launchers.base import Launcher, WorkerProcess  # noqa: E402
from distexec.manager.children import Children  # noqa: E402
from distexec.manager.loop import ManagerConfig, SharedState  # noqa: E402
from distexec.manager.dependencies import Dependencies  # noqa: E402
from distexec.manager.dispatch import Dispatch  # noqa: E402
from distexec.manager.fleet import START_FAILURE_LIMIT, Fleet  # noqa: E402
from distexec.manager.lifecycle import (  # noqa: E402
    EDGES,
    Ending,
    InvalidLifeTransition,
    Life,
    WorkerHandle,
    verdict,
)
from distexec.manager.recovery import Recovery  # noqa: E402
from distexec.manager.status import StatusRoom  # noqa: E402
from distexec.manager.stopping import DUMP_WAIT, Stopper  # noqa: E402
from distexec.manager.watchdog import Watchdog  # noqa: E402
from distexec.scheduler import Scheduler, Task, WorkerRecord  # noqa: E402


class FakeProcess(WorkerProcess):
    """A worker process as the manager sees it; ``die(code)`` is its exit."""

    def __init__(self, worker_id, killable=True, local_child=True):
        super().__init__(worker_id)
        self.pid = 1000 + worker_id
        self.killable = killable
        self.local_child = local_child
        self.code = None
        self.kills = 0
        self.watcher = None
        self.running = None  # (task id, attempt) it runs, as shared memory would say

    reports_progress = True

    def poll(self):
        return self.code

    def wait(self, timeout=None):
        return self.code

    def kill(self):
        self.kills += 1

    def running_task(self):
        return self.running

    def watch(self, on_exit):
        self.watcher = on_exit


class FakeLauncher(Launcher):
    essential = True

    def __init__(self, wanted):
        super().__init__("local", wanted)
        self.started = []

    def start(self, worker_id, address, key):
        proc = FakeProcess(worker_id)
        self.started.append(proc)
        return proc


class FakeConn:
    def __init__(self, channel="main"):
        self.channel = channel
        self.handle = None
        self.worker_id = None
        self.children = {}
        self.peer = "test"


class FakeDoor:
    """Records what would be sent; every connection it knows is open."""

    def __init__(self):
        self.conns = set()
        self.sent = []  # (conn, frame kind or control command, meta)

    def send(self, conn, parts):
        data = b"".join(bytes(p) for p in parts)
        if conn.channel == "control":
            self.sent.append((conn, protocol.CONTROL_COMMAND.unpack(data)[0], None))
            return
        kind, _, nbufs, meta_len = protocol.FRAME_HEADER.unpack_from(data)
        start = protocol.FRAME_HEADER.size + 8 * nbufs
        self.sent.append((conn, kind, pickle.loads(data[start:start + meta_len])))

    def send_open(self, conn, parts):
        if conn is None or conn not in self.conns:
            return False
        self.send(conn, parts)
        return True

    def close(self, conn):
        self.conns.discard(conn)

    def kinds(self, conn=None):
        return [kind for c, kind, _ in self.sent if conn is None or c is conn]

    def read_now(self, handle):
        pass

    def read_frames(self, conn):
        pass

    def disconnected(self, conn, why):
        """As the real door: close, then tell the room of the connection's channel."""
        self.close(conn)
        if conn.channel == "main" and conn.handle is not None:
            self.hub.fleet.disconnected(conn, why)


class Hub:
    """What the rooms see of the manager."""

    def __init__(self, wanted=2, **config):
        self.config = ManagerConfig(max_workers=wanted, initializer=None,
                                    max_tasks_per_child=None, python=None,
                                    worker_start_timeout=10.0, max_message_size=1 << 20,
                                    **config)
        self.shared = SharedState()
        self.books = Scheduler()
        self.key = b"k" * 32
        self.address = "127.0.0.1:1"
        self.closing = False
        self.terminating = False
        self.deadlines = []
        self.completions = []
        self.gave_up = None
        self.door = FakeDoor()
        self.door.hub = self
        self.launcher = FakeLauncher(wanted)
        self.fleet = Fleet(self, self.launcher, [])
        self.watchdog = Watchdog(self)
        self.dispatch = Dispatch(self)
        self.recovery = Recovery(self)
        self.stopper = Stopper(self)
        self.children = Children(self)
        self.deps = Dependencies(self)
        self.store = SharedStore()
        self.status = StatusRoom(self)
        self._ids = iter(range(1000, 10**6))

    # the loop's services
    def at(self, when, callback):
        self.deadlines.append((when, callback))

    def run_deadlines(self, *, matching=None):
        """Run the deadlines (as if their time had come) whose callback's name contains
        ``matching``."""
        due = [d for d in self.deadlines if matching is None
               or matching in getattr(d[1], "__name__", getattr(getattr(d[1], "func", None),
                                                                 "__name__", ""))]
        for item in due:
            self.deadlines.remove(item)
            item[1]()

    def complete(self, fn, *args):
        fn(*args)

    def settle(self, future, ok, value):
        (future.set_result if ok else future.set_exception)(value)

    def force_cancel(self, future):
        from distexec.manager.loop import force_cancel

        force_cancel(future)

    def cancel_task(self, task):
        task.future.cancel()

    def post(self, event):
        raise AssertionError(f"a room posted {event!r} from the manager thread")

    def give_up(self, exc, cause):
        self.gave_up = exc
        self.terminating = self.closing = True

    def watch_fd(self, fd, callback):
        pass

    def unwatch_fd(self, fd):
        pass

    # helpers for the tests
    def connect(self, handle, ready=True):
        """The worker's handshake and READY, as the door would hand them over."""
        conn = FakeConn()
        self.door.conns.add(conn)
        info = {**versions(), "worker_id": handle.worker_id, "pid": handle.proc.pid,
                "host": "h"}
        self.door.welcome = lambda *a, **k: None
        self.door.opened = lambda c, h, channel: (setattr(c, "handle", h),
                                                  setattr(c, "worker_id", h.worker_id))
        self.fleet.worker_connected(conn, info, b"")
        ctrl = FakeConn("control")
        ctrl.handle = handle
        self.door.conns.add(ctrl)
        handle.ctrl = ctrl
        if ready:
            self.fleet.ready(handle)
        return conn

    def submit(self, fn=print, *args, retry_on=None, **options):
        task = Task(next(self._ids), Future(), fn, args, None, **options)
        if retry_on is not None:
            task.retry_on = retry_on
        self.books.add_task(task)
        return task

    def result(self, handle, task, value=None, status=protocol.RESULT_OK, attempt=None,
               extra=None):
        buffers = []
        if status == protocol.RESULT_OK:
            payload, oob = serialization.dumps(value)
        else:
            payload, oob = serialization.dumps(value), []
            if status == protocol.RESULT_RAISED:
                payload, type_name, message, text = serialization.dumps_exception(value)
                extra = (type_name, message, text)
        item = protocol.result_item(task.id, task.attempt if attempt is None else attempt,
                                    status, payload, oob, 0.001, extra, buffers)
        self.dispatch.on_results(handle, protocol.Frame(protocol.RESULTS, ([item],), buffers))


def started(hub, n=None):
    hub.fleet.ensure()
    handles = list(hub.fleet.workers.values())
    return handles if n is None else handles[:n]


def test_lifecycle_edges_are_checked_and_aborting_goes_back_where_it_was():
    record = WorkerRecord(1, "h", None)
    handle = WorkerHandle(record, FakeProcess(1))
    assert handle.life is Life.STARTING and not record.paused
    with pytest.raises(InvalidLifeTransition):
        handle.to(Life.BURIED)  # only a zombie is buried
    handle.to(Life.READY)
    handle.to(Life.RETIRING)
    handle.to(Life.ABORTING, "stopped by the executor (abort of task 7)")
    assert record.paused and handle.reason.startswith("stopped")
    handle.to(handle.resume)
    assert handle.life is Life.RETIRING and not record.paused and handle.reason is None
    handle.to(Life.ENDED)
    for state in Life:  # nothing leaves the end
        if state is not Life.ENDED:
            with pytest.raises(InvalidLifeTransition):
                handle.to(state)
    assert all(not EDGES[s] for s in (Life.ENDED, Life.BURIED))
    lost = WorkerHandle(WorkerRecord(2, "h", None), FakeProcess(2))
    lost.lose_connection("connection closed")
    assert lost.record.paused and lost.disconnected == "connection closed"


@pytest.mark.parametrize("code, life, reason, expected", [
    (-signal.SIGKILL, Life.STARTING, None, Ending.START_INTERRUPTED),  # the OOM killer
    (-signal.SIGSEGV, Life.STARTING, None, Ending.START_FAILED),  # its own crash
    (1, Life.STARTING, None, Ending.START_FAILED),
    (-signal.SIGKILL, Life.STARTING, "did not connect within 10 s", Ending.START_FAILED),
    (-signal.SIGKILL, Life.RETIRING, None, Ending.START_ABANDONED),  # the pool shrank
])
def test_verdict_before_ready(code, life, reason, expected):
    handle = WorkerHandle(WorkerRecord(1, "h", None), FakeProcess(1))
    if life is not Life.STARTING:
        handle.to(life)
    handle.reason = reason
    assert verdict(handle, code, started=False, terminating=False, wanted=True) is expected
    assert verdict(handle, code, started=False, terminating=True,
                   wanted=True) is Ending.START_ABANDONED


def test_verdict_after_ready():
    handle = WorkerHandle(WorkerRecord(1, "h", None), FakeProcess(1))
    handle.to(Life.READY)
    assert verdict(handle, 0, started=True, terminating=False, wanted=True) is Ending.LOST
    handle.to(Life.LEAVING)
    assert verdict(handle, 0, started=True, terminating=False, wanted=True) is Ending.LEFT
    assert verdict(handle, -9, started=True, terminating=False, wanted=True) is Ending.LOST
    assert verdict(handle, -9, started=True, terminating=True, wanted=True) is Ending.LEFT
    handle.record.assigned[1] = object()  # it still held a task: not clean
    assert verdict(handle, 0, started=True, terminating=False, wanted=True) is Ending.LOST


def test_fleet_launches_what_is_wanted_and_replaces_a_lost_worker():
    hub = Hub(wanted=2)
    a, b = started(hub)
    assert len(hub.launcher.started) == 2
    hub.fleet.ensure()
    assert len(hub.launcher.started) == 2  # starting workers count
    hub.connect(a)
    hub.connect(b)
    assert hub.shared.ready_workers == 2 and a.life is Life.READY
    a.proc.code = -signal.SIGKILL
    hub.fleet.on_process_exit(a.proc)
    hub.fleet.disconnected(a.conn, "connection closed")
    assert a.life is Life.ENDED and a.worker_id not in hub.fleet.workers
    assert len(hub.launcher.started) == 3  # replaced at once
    assert hub.shared.ready_workers == 1


def test_fleet_breaks_the_executor_after_failed_starts_but_not_for_kills_from_outside():
    hub = Hub(wanted=1)
    for _ in range(5):  # killed by someone else while starting: backoff, never "broken"
        (h,) = started(hub)
        h.proc.code = -signal.SIGKILL
        hub.fleet.on_process_exit(h.proc)
        hub.fleet._not_before = 0.0  # (the backoff's time has come)
    assert hub.gave_up is None
    for _ in range(START_FAILURE_LIMIT):
        (h,) = started(hub)
        h.proc.code = 1  # it exited by itself: a broken setup
        hub.fleet.on_process_exit(h.proc)
    assert isinstance(hub.gave_up, BrokenDistributedExecutor)
    assert f"{START_FAILURE_LIMIT} attempts in a row failed" in str(hub.gave_up)
    assert "exited before connecting: exit code 1" in str(hub.gave_up)


def test_fleet_resize_retires_the_cheapest_workers_first():
    hub = Hub(wanted=3)
    a, b, c = started(hub)
    for h in (a, b):
        hub.connect(h)
    hub.submit()
    hub.dispatch.dispatch()  # a is busy, b idle, c still starting
    assert a.record.assigned and not b.record.assigned
    hub.fleet.resize(1)
    assert c.life is Life.RETIRING and c.proc.kills == 1  # not started yet: killed
    assert b.life is Life.LEAVING  # idle: told to leave
    assert protocol.SHUTDOWN in hub.door.kinds(b.conn)
    assert a.life is Life.READY  # the busy one stays
    c.proc.code = -signal.SIGKILL
    hub.fleet.on_process_exit(c.proc)
    assert hub.gave_up is None and hub.fleet._interrupted == 0  # not a failed start


def test_watchdog_kills_a_silent_worker_and_keeps_an_unkillable_one_as_a_zombie():
    hub = Hub(wanted=1, heartbeat_timeout=1.0)
    (h,) = started(hub)
    hub.connect(h)
    h.last_seen -= 5  # silent for 5 s
    hub.run_deadlines(matching="_check_heartbeat")
    assert h.life is Life.SILENT and h.proc.kills == 1 and "no heartbeat" in h.reason

    hub = Hub(wanted=1, heartbeat_timeout=1.0)
    (h,) = started(hub)
    h.proc.killable = False  # as if started by hand
    h.proc.reports_progress = False
    h.exited = True
    hub.connect(h)
    task = hub.submit()
    hub.dispatch.dispatch()
    h.last_seen -= 5
    hub.run_deadlines(matching="_check_heartbeat")
    assert h.life is Life.ZOMBIE and h.worker_id in hub.watchdog.zombies
    assert task.attempt == 1 and task in hub.books.queue  # back in the queue, charged
    assert len(task.losses) == 1 and "no heartbeat" in task.losses[0].reason
    hub.watchdog.control_bytes(h, protocol.BEAT)  # it shows life: told to leave, once
    hub.watchdog.control_bytes(h, protocol.BEAT)
    assert hub.door.kinds(h.conn).count(protocol.SHUTDOWN) == 1
    hub.fleet.disconnected(h.conn, "connection closed")
    assert h.life is Life.BURIED and not hub.watchdog.zombies


def test_dispatch_settles_results_and_drops_stale_ones():
    hub = Hub(wanted=1)
    (h,) = started(hub)
    hub.connect(h)
    task = hub.submit(len, "abc")
    hub.dispatch.dispatch()
    (_, kind, (defs, forget, items)), = [s for s in hub.door.sent if s[1] == protocol.TASKS]
    assert [item[0] for item in items] == [task.id] and len(defs) == 1
    hub.result(h, task, 3, attempt=task.attempt + 1)  # a stale attempt: dropped
    assert not task.future.done()
    hub.result(h, task, 3)
    assert task.future.result() == 3 and h.record.tasks_done == 1
    hub.result(h, task, 4)  # a duplicate: dropped
    assert task.future.result() == 3


def test_dispatch_retries_raises_and_fails_declined_tasks():
    hub = Hub(wanted=1)
    (h,) = started(hub)
    hub.connect(h)
    task = hub.submit(max_retries=1, retry_on=(ValueError,))
    hub.dispatch.dispatch()
    hub.result(h, task, ValueError("flaky"), status=protocol.RESULT_RAISED)
    assert not task.future.done() and task in hub.books.queue and task.errors == 1
    hub.dispatch.dispatch()
    hub.result(h, task, ValueError("flaky"), status=protocol.RESULT_RAISED)
    with pytest.raises(ValueError, match="flaky"):
        task.future.result()

    declined = hub.submit()
    hub.dispatch.dispatch()
    hub.result(h, declined, None, status=protocol.RESULT_DECLINED, extra="no gpu here")
    with pytest.raises(TaskDeclined, match="declined by every worker.*no gpu here"):
        declined.future.result()


def test_recovery_charges_the_running_task_and_fails_a_poison_task():
    hub = Hub(wanted=1, max_retries=1)
    poison = hub.submit()
    for _ in range(2):
        (h,) = started(hub)
        hub.connect(h)
        hub.dispatch.dispatch()
        assert poison.worker_id == h.worker_id
        h.proc.running = (poison.id, poison.attempt)
        h.proc.code = -signal.SIGSEGV
        hub.fleet.on_process_exit(h.proc)
        hub.fleet.disconnected(h.conn, "connection closed")
    with pytest.raises(WorkerLostError, match="lost, 2 time\\(s\\) \\(max_retries=1\\)") as info:
        poison.future.result()
    assert [a.exitcode for a in info.value.attempts] == [-signal.SIGSEGV] * 2


def test_a_time_limit_asks_for_the_stack_then_stops_the_worker():
    hub = Hub(wanted=1)
    (h,) = started(hub)
    hub.connect(h)
    task = hub.submit(time_limit=0.5)
    hub.dispatch.dispatch()
    h.limit = (task.id, task.attempt, 0.0)  # its time has come
    hub.run_deadlines(matching="_check_limit")
    assert hub.door.kinds(h.ctrl) == [protocol.DUMP]  # first: where is it?
    assert not task.future.done()
    h.proc.running = (task.id, task.attempt)
    hub.run_deadlines(matching="_expired")  # DUMP_WAIT passed without an answer
    with pytest.raises(TaskTimeoutError, match=f"did not report its stack within {DUMP_WAIT:g}"):
        task.future.result()
    assert h.life is Life.STOPPING and h.proc.kills == 1
    h.proc.code = -signal.SIGKILL
    hub.fleet.on_process_exit(h.proc)
    assert hub.fleet.crash_streak == 0  # a worker we stopped is no crash


def test_an_abort_the_worker_had_not_started_leaves_it_working():
    hub = Hub(wanted=1)
    (h,) = started(hub)
    h.proc.reports_progress = False
    hub.connect(h)
    hub.submit()
    second = hub.submit()
    h.record.ewma = 1e-6  # short tasks: both are sent
    hub.dispatch.dispatch()
    assert second.worker_id == h.worker_id
    assert hub.stopper.abort(second.id) is True
    assert second.future.cancelled() and h.life is Life.ABORTING and h.record.paused
    assert hub.door.kinds(h.ctrl) == [protocol.ABORT]
    hub.stopper.skipped(h, second.id, second.attempt)
    assert h.life is Life.READY and not h.record.paused


def test_a_worker_stopped_for_an_abort_charges_nobody_even_if_it_then_falls_silent():
    # An SSH-like worker (no progress reports, no signal to send it) is told to abort the task
    # it holds; it does not answer (the task holds the GIL in C) and falls silent. Its loss is
    # the executor's doing: the tasks it held go back uncharged, and it is no crash.
    hub = Hub(wanted=1, heartbeat_timeout=1.0)
    (h,) = started(hub)
    h.proc.reports_progress = False
    h.proc.local_child = False
    hub.connect(h)
    h.record.ewma = 1e-6
    aborted, other = hub.submit(), hub.submit(max_retries=0)
    hub.dispatch.dispatch()
    assert other.worker_id == h.worker_id
    hub.stopper.abort(aborted.id)
    assert h.life is Life.ABORTING and h.stopped
    h.last_seen -= 5
    hub.run_deadlines(matching="_check_heartbeat")
    assert h.life is Life.SILENT and h.stopped and h.record.paused
    h.proc.code = -signal.SIGKILL
    hub.fleet.on_process_exit(h.proc)
    assert aborted.future.cancelled()
    assert other in hub.books.queue and not other.losses and not other.future.done()
    assert hub.fleet.crash_streak == 0


def test_an_abort_answered_after_the_worker_was_told_to_leave_leaves_it_clean():
    hub = Hub(wanted=1)
    (h,) = started(hub)
    h.proc.reports_progress = False
    hub.connect(h)
    task = hub.submit()
    hub.dispatch.dispatch()
    hub.stopper.abort(task.id)
    assert h.life is Life.ABORTING
    hub.fleet.send_shutdown(h)  # (the pool shrank meanwhile)
    assert h.life is Life.LEAVING and h.stopped and h.record.paused
    hub.stopper.skipped(h, task.id, task.attempt)
    assert h.stopped is None and h.life is Life.LEAVING
    h.proc.code = 0
    hub.fleet.on_process_exit(h.proc)
    assert h.life is Life.ENDED and h.record.state.value == "gone"
