"""The fleet: which workers exist, starting and replacing them, and the end of each one.

Owns the worker handles (:class:`~.lifecycle.WorkerHandle`, one checked lifecycle each), the
launchers (this machine's, one per SSH host; see :mod:`distexec.launchers.base`) and their
resource pools, and the policies around them: how many workers each launcher should have,
restart backoff for workers that keep dying, start failures (``START_FAILURE_LIMIT`` in a row
break the executor, or retire an SSH host), starts killed from outside (retried after a growing
pause), retiring surplus workers when the pool shrinks, and telling workers to leave. A
worker's end (:meth:`Fleet.end`) is decided here from its life and how it exited; a loss then
goes to :mod:`.recovery`, which re-queues and charges its tasks.

Manager thread only. No sockets: it sends through the door and starts processes through the
launchers.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import protocol
from .._version import mismatches, versions
from ..errors import BrokenDistributedExecutor
from ..launchers.base import JoinedProcess, Launcher, WorkerProcess
from ..scheduler import Needs, Pool, Task, WorkerState
from . import events
from .lifecycle import Ending, Life, WorkerHandle, verdict, what_ended

if TYPE_CHECKING:
    from .connections import Conn
    from .loop import Manager

logger = logging.getLogger(__name__)

# After a worker's connection drops, how long to wait for its exit status before killing it.
EXIT_GRACE = 2.0
# After SHUTDOWN, how long a worker may take to exit before it is killed.
SHUTDOWN_GRACE = 5.0
# Consecutive workers that fail to start (no READY in between) before the executor breaks (or,
# for an SSH host, before the host is given up). Only deterministic failures count: the worker
# reported its own start-up error, exited by itself, crashed (SIGSEGV and the like) or timed out.
# A local worker killed from outside while it started (SIGKILL from the OOM killer or an
# operator, SIGTERM, ...) is replaced after a growing pause instead.
START_FAILURE_LIMIT = 3
# Replacing workers that keep dying: losses in a row (no task finished in between) that are
# replaced at once; after that the delay doubles from RESTART_BACKOFF up to RESTART_BACKOFF_MAX.
RESTART_FREE = 2
RESTART_BACKOFF = 0.1
RESTART_BACKOFF_MAX = 10.0


def backoff(n: int) -> float:
    """The pause before the n-th retry in a row (n >= 1): 0.1 s, 0.2 s, ... up to 10 s."""
    return min(RESTART_BACKOFF * 2.0 ** (n - 1), RESTART_BACKOFF_MAX)


class Fleet:
    def __init__(self, m: Manager, local: Launcher, hosts: list[Launcher]) -> None:
        self.m = m
        self.workers: dict[int, WorkerHandle] = {}
        self.local = local
        self.hosts = hosts
        self.launchers = [local, *hosts]
        local_resources, _ = local.resources()
        # Resource pools by origin: the local workers', each host's, each joined worker's.
        self.pools: dict[str, Pool] = {
            "local": Pool("local", local_resources, slots=local.wanted)}
        self._ids = iter(range(1, 1 << 62))
        self._interrupted = 0  # starting local workers killed from outside, in a row
        self.crash_streak = 0  # workers lost in a row with no task finishing in between
        self._not_before = 0.0  # restart backoff, for every launcher
        self._launch_timer = False  # a deadline to call ensure() is armed
        self._warned_needs: set[Any] = set()  # needs no pool has, warned about once
        self._versions: dict[str, str] | None = None  # ours, to compare with each worker's

    def open(self) -> None:
        for launcher in self.hosts:
            launcher.open()
        self.ensure()

    # ---------------------------------------------------------------- how many workers
    def active(self) -> dict[str, int]:
        """Live workers we launched that are not on their way out, per origin."""
        counts: dict[str, int] = {}
        for handle in self.workers.values():
            record = handle.record
            if (record.origin != "joined" and record.state is not WorkerState.DRAINING
                    and (handle.staying or handle.life is Life.SILENT)):
                counts[record.origin] = counts.get(record.origin, 0) + 1
        return counts

    def ensure(self) -> None:
        """Launch workers up to what each ready launcher wants (respecting the backoff)."""
        self._launch_timer = False
        m = self.m
        if m.terminating or m.shared.broken is not None or (m.closing and not m.books.tasks):
            return  # stopping: workers are needed only to finish submitted work
        active = self.active()
        now = time.monotonic()
        plan = [(launcher, launcher.wanted - active.get(launcher.label, 0))
                for launcher in self.launchers
                if launcher.state == "ready" and launcher.not_before <= now]
        if not any(n > 0 for _, n in plan):
            return
        if now < self._not_before:
            if not self._launch_timer:
                self._launch_timer = True
                m.at(self._not_before, self.ensure)
            return
        for launcher, n in plan:
            for _ in range(n):
                self._launch(launcher)

    def resize(self, n: int) -> None:
        """Change the number of local workers; surplus ones leave after the tasks they hold."""
        logger.info("resizing the pool of local workers from %d to %d", self.local.wanted, n)
        self.local.wanted = n
        self.pools["local"].amounts["slots"] = float(n)
        self.ensure()
        handles = [h for h in self.workers.values()
                   if h.record.origin == "local" and h.staying
                   and h.record.state not in (WorkerState.DRAINING, WorkerState.GONE,
                                              WorkerState.LOST)]
        surplus = len(handles) - n
        if surplus <= 0:
            return
        # Cheapest to retire first: not yet started, then idle, then those holding the fewest.
        order = {WorkerState.LAUNCHING: 0, WorkerState.CONNECTED: 1, WorkerState.IDLE: 2}
        handles.sort(key=lambda h: (order.get(h.record.state, 3), len(h.record.assigned),
                                    -h.worker_id))
        for handle in handles[:surplus]:
            if handle.record.state is WorkerState.LAUNCHING or handle.conn is None:
                handle.to(Life.RETIRING)
                handle.proc.kill()
            else:
                self.retire(handle)
        self.m.status.publish()

    def retire(self, handle: WorkerHandle) -> None:
        """The worker finishes what it holds, takes nothing new, then is told to leave."""
        if handle.life is Life.ABORTING:
            handle.resume = Life.RETIRING
        elif handle.life in (Life.STARTING, Life.READY):
            handle.to(Life.RETIRING)
        self.m.books.drain(handle.worker_id)
        if not handle.record.assigned and handle.life is not Life.LEAVING:
            self.send_shutdown(handle)

    # ---------------------------------------------------------------- launching
    def _launch(self, launcher: Launcher) -> None:
        m = self.m
        worker_id = next(self._ids)
        now = time.monotonic()
        record = m.books.add_worker(worker_id, launcher.host, m.config.max_tasks_per_child,
                                    self._pool(launcher))
        record.origin = launcher.label
        record.local = launcher is self.local
        try:
            proc = launcher.start(worker_id, m.address, m.key)
        except OSError as exc:
            record.transition(WorkerState.LOST)
            m.books.forget_worker(worker_id)
            self.start_failed(launcher, f"worker {worker_id} could not be started with "
                                        f"{launcher.describe_start()}: {exc}")
            # Try again shortly (nothing else would): the failure limit gives up.
            m.at(now + 0.05 * 2 ** launcher.failures, self.ensure)
            return
        record.pid = proc.pid
        self.workers[worker_id] = WorkerHandle(record, proc)
        if proc.exit_fd is not None:
            m.watch_fd(proc.exit_fd, partial(self.on_process_exit, proc))
        else:
            proc.watch(self._exit_from_thread)
        m.at(now + m.config.worker_start_timeout, partial(self._check_started, worker_id))

    def _pool(self, launcher: Launcher) -> Pool:
        """The resource pool a launcher's workers share."""
        pool = self.pools.get(launcher.label)
        if pool is None:
            resources, slots = launcher.resources()
            pool = self.pools[launcher.label] = Pool(launcher.label, resources, slots=slots)
        return pool

    def _exit_from_thread(self, proc: WorkerProcess) -> None:
        # A reaper or launcher thread: hand the news to the manager thread.
        self.m.post(events.ProcessExited(proc))

    def _check_started(self, worker_id: int) -> None:
        handle = self.workers.get(worker_id)
        if handle is None or handle.record.state is not WorkerState.LAUNCHING:
            return
        handle.reason = (f"worker {worker_id} (pid {handle.record.pid}) did not connect within "
                         f"{self.m.config.worker_start_timeout:g} s")
        logger.warning("%s; killing it", handle.reason)
        handle.proc.kill()

    def _launcher_of(self, origin: str) -> Launcher | None:
        return next((launcher for launcher in self.launchers if launcher.label == origin), None)

    def _start_interrupted(self, reason: str) -> None:
        """A starting worker was killed from outside: start another, after a growing pause
        (0.1 s, 0.2 s, ... up to RESTART_BACKOFF_MAX) while it keeps happening."""
        self._interrupted += 1
        delay = backoff(self._interrupted)
        self._not_before = max(self._not_before, time.monotonic() + delay)
        logger.warning("%s; killed from outside, so not counted as a failed start: starting "
                       "another in %.1f s", reason, delay)

    def start_failed(self, launcher: Launcher | None, reason: str) -> None:
        """A worker failed to start (see START_FAILURE_LIMIT)."""
        logger.warning("%s", reason)
        if launcher is None:
            return  # a worker that joined by hand: nothing to retry
        launcher.failures += 1
        count = launcher.failures
        if launcher.essential:
            if count >= START_FAILURE_LIMIT:
                self.m.give_up(BrokenDistributedExecutor(
                    f"could not start workers: {count} attempts in a row failed; the last "
                    f"one: {reason}. Check that {launcher.describe_start()} can run "
                    "'python -m distexec.worker' (see the worker's stderr above)"), None)
            return
        if launcher.state != "ready":
            return
        if count < START_FAILURE_LIMIT:
            # Try again there after a pause (0.1 s, 0.2 s, ...), not at once.
            launcher.not_before = time.monotonic() + backoff(count)
            self.m.at(launcher.not_before, self.ensure)
            return
        live = self.active().get(launcher.label, 0)
        if live:
            # Keep the workers that run; stop adding more (e.g. sshd's MaxSessions).
            logger.error("host %s: %d workers in a row failed to start (the last one: %s); "
                         "keeping its %d running worker(s) and starting no more there",
                         launcher.label, count, reason, live)
            launcher.wanted = live
            return
        launcher.state = "failed"
        launcher.error = (f"{launcher.label}: {count} workers in a row failed to start; the "
                          f"last one: {reason}")
        logger.error("giving up on host %s; its work goes to the other workers", launcher.error)
        launcher.close()
        self.check_capacity()

    # ---------------------------------------------------------------- launchers' news
    def on_launcher_news(self, event: events.HostChanged) -> None:
        launcher = event.host
        if event.kind == "ready":
            launcher.state = "ready"
            launcher.info = dict(event.info or {})
            launcher.wanted = event.slots
            self.ensure()
        else:
            launcher.state = "failed"
            launcher.error = event.detail
            logger.error("host %s cannot be used: %s", launcher.label, event.detail)
            self.check_capacity()
        if all(h.state != "starting" for h in self.hosts) and \
                any(h.state == "failed" for h in self.hosts):
            logger.warning("hosts:\n%s", self.hosts_table())

    def hosts_table(self) -> str:
        """One row per host: state, what its interpreter runs, slots, and what is wrong."""
        rows = [("host", "state", "python", "cloudpickle", "tblib", "distexec", "slots",
                 "problem")]
        for h in self.hosts:
            info = h.info
            rows.append((h.label, h.state, str(info.get("python", "-")),
                         str(info.get("cloudpickle", "-")), str(info.get("tblib", "-")),
                         str(info.get("distexec", "-")), str(h.wanted or "-"),
                         (h.error or "").removeprefix(f"{h.label}: ")))
        widths = [max(len(r[i]) for r in rows) for i in range(7)]
        return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r[:7], widths, strict=True))
                         + "  " + r[7] for r in rows)

    def check_capacity(self) -> None:
        """Break the executor when nothing can ever run its tasks: no local workers wanted,
        no usable host, no worker that joined by hand, and no way for one to join."""
        m = self.m
        if m.terminating or m.shared.broken is not None:
            return
        if self.local.wanted > 0 or any(h.state in ("starting", "ready") for h in self.hosts):
            return
        if any(w.origin == "joined" for w in m.books.live_workers()):
            return
        if not self.hosts:
            return  # an executor that waits for workers started by hand
        m.give_up(BrokenDistributedExecutor(
            f"no host is usable, so no worker can run the tasks:\n{self.hosts_table()}\nRun "
            "'distexec hosts check FILE' to check the hosts again"), None)

    def warn_if_unplaceable(self, task: Task) -> None:
        """Warn (once per kind of needs) about a task that no pool could ever run."""
        needs = task.needs
        assert needs is not None
        if needs.key in self._warned_needs:
            return
        if any(pool.could_ever_fit(needs) for pool in self.pools.values()
               if pool.workers or pool.name == "local" and self.local.wanted):
            return
        for launcher in self.hosts:
            if launcher.state != "failed" and Pool(
                    launcher.label, launcher.resources()[0]).could_ever_fit(_without_slots(needs)):
                return
        self._warned_needs.add(needs.key)
        offered = "; ".join(f"{pool.name}: {pool.describe() or 'nothing'}"
                            for pool in self.pools.values()) or "no workers"
        from .. import serialization

        logger.warning(
            "task %d (%s) needs %s, which no worker offers (%s); it waits until a worker that "
            "offers it joins (distexec worker --resources ..., or a host with those settings)",
            task.id, serialization.describe_callable(task.fn), needs, offered)

    # ---------------------------------------------------------------- connecting
    def _version_problem(self, info: dict[str, Any]) -> str | None:
        if self._versions is None:
            self._versions = versions()
        problems = mismatches(self._versions, info)
        if not problems:
            return None
        here = self._versions
        return (f"version mismatch with the worker on host {info.get('host', '?')} "
                f"(pid {info.get('pid', '?')}): {'; '.join(problems)}. This executor runs "
                f"Python {here['python']}, cloudpickle {here['cloudpickle']}, tblib "
                f"{here['tblib']}, distexec {here['distexec']}. Install matching versions on "
                "both sides")

    def worker_connected(self, conn: Conn, info: dict[str, Any], nonce_w: bytes) -> None:
        """A worker's main connection proved it holds the key: welcome it, or say why not."""
        m = self.m
        door = m.door
        problem = self._version_problem(info)
        token = info.get("worker_id")
        handle = self.workers.get(token) if isinstance(token, int) else None
        if problem is not None:
            if handle is not None:
                handle.reason = problem
            door.refuse(conn, protocol.STATUS_VERSION_MISMATCH, problem, nonce_w)
            return
        if m.terminating or (m.closing and not m.books.tasks):
            door.refuse(conn, protocol.STATUS_REFUSED, "the executor is shutting down", nonce_w)
            return
        now = time.monotonic()
        if handle is not None:
            if handle.record.state is not WorkerState.LAUNCHING or handle.conn is not None:
                door.refuse(conn, protocol.STATUS_REFUSED,
                            f"worker id {token} is already connected", nonce_w)
                return
        elif token is not None:
            door.refuse(conn, protocol.STATUS_REFUSED,
                        f"unknown worker id {token}: start workers without --worker-id to "
                        "join a running executor", nonce_w)
            return
        else:
            handle = self._joined(conn, info)
        record = handle.record
        pid = info.get("pid")
        if isinstance(pid, int):
            record.pid = pid
        handle.proc.connected(record.pid)
        record.host = str(info.get("host", record.host))
        record.transition(WorkerState.CONNECTED)
        handle.conn = conn
        door.opened(conn, handle, "main")
        m.watchdog.watch(handle, now)
        door.welcome(conn, nonce_w, {
            "worker_id": handle.worker_id, "heartbeat_interval": m.config.heartbeat_interval,
            "manager_timeout": m.watchdog.manager_timeout()})
        config = {
            "worker_id": handle.worker_id,
            "sys_path": _client_sys_path() if handle.proc.local_child else None,
            "initializer": m.config.initializer,
            "resources": record.pool.describe() if record.pool is not None else {},
            "origin": record.origin,
            "max_message_size": m.config.max_message_size,
            "unpickle_timeout": m.config.unpickle_timeout,
        }
        door.send(conn, protocol.encode_frame(protocol.CONFIG, (config,)))
        logger.debug("worker %d connected from %s (pid %s)", handle.worker_id, conn.peer,
                     record.pid)

    def _joined(self, conn: Conn, info: dict[str, Any]) -> WorkerHandle:
        """A worker started by hand: it has a pool of its own (its ``--resources``)."""
        worker_id = next(self._ids)
        pool = Pool(f"worker {worker_id}", _offered(info.get("resources")), slots=1)
        record = self.m.books.add_worker(worker_id, str(info.get("host", "?")),
                                         self.m.config.max_tasks_per_child, pool)
        record.local = False
        record.origin = "joined"
        handle = self.workers[worker_id] = WorkerHandle(record, JoinedProcess(worker_id))
        logger.info("worker %d joined from %s (pid %s on %s)", worker_id, conn.peer,
                    info.get("pid"), info.get("host"))
        return handle

    def ready(self, handle: WorkerHandle) -> None:
        """READY: its initializer ran; it takes tasks from now on."""
        record = handle.record
        if record.state is not WorkerState.CONNECTED:
            return
        self.m.books.worker_ready(handle.worker_id)
        if handle.life is Life.STARTING:
            handle.to(Life.READY)
        launcher = self._launcher_of(record.origin)
        if launcher is not None:
            launcher.failures = 0
        if record.origin == "local":
            self._interrupted = 0
        logger.info("worker %d ready (pid %s on %s)", handle.worker_id, record.pid, record.host)
        self.m.status.publish()

    def leave_asked(self, handle: WorkerHandle) -> None:
        """LEAVE: the worker wants to go (``distexec.leave()``, its own lifetime)."""
        logger.info("%s asked to leave; it finishes the %d task(s) it holds",
                    handle.record.describe(), len(handle.record.assigned))
        self.retire(handle)
        self.m.status.publish()
        self.ensure()

    # ---------------------------------------------------------------- leaving
    def send_shutdown(self, handle: WorkerHandle) -> None:
        """Tell a worker to leave (it exits once its outgoing results are sent)."""
        if handle.life in (Life.STARTING, Life.READY, Life.RETIRING, Life.ABORTING):
            handle.to(Life.LEAVING)
        self.m.books.drain(handle.worker_id)
        self.m.status.publish()
        self.m.door.send_open(handle.conn, protocol.encode_frame(protocol.SHUTDOWN, ("",)))
        if handle.proc.killable:
            self.m.at(time.monotonic() + SHUTDOWN_GRACE, partial(self._kill_late, handle))

    def _kill_late(self, handle: WorkerHandle) -> None:
        if not handle.over and not handle.exited:
            logger.warning("worker %d did not exit %g s after being asked to; killing it",
                           handle.worker_id, SHUTDOWN_GRACE)
            handle.proc.kill()

    def leave_when_drained(self, handle: WorkerHandle) -> None:
        """A worker that drains (its task budget is used up) and holds nothing: let it go."""
        if (handle.record.state is WorkerState.DRAINING and not handle.record.assigned
                and handle.life not in (Life.LEAVING, Life.STOPPING, Life.SILENT)
                and not handle.over):
            self.send_shutdown(handle)

    def all_leave(self) -> None:
        """Every task has ended and the executor shuts down: every worker leaves."""
        for handle in list(self.workers.values()):
            if handle.life in (Life.LEAVING, Life.STOPPING, Life.SILENT):
                continue
            if handle.conn is not None and handle.conn in self.m.door.conns:
                self.send_shutdown(handle)
            else:
                handle.to(Life.LEAVING)
                if handle.proc.killable:
                    handle.proc.kill()
                else:
                    self.end(handle)

    def end_all(self, sig: int | None) -> None:
        """Stop every worker now: with ``sig``, local workers get that signal and lose their
        connections (they exit at once, even mid-task); otherwise every worker that can be
        killed is killed, and the others (started by hand) are disconnected."""
        for handle in list(self.workers.values()):
            if handle.life in (Life.STARTING, Life.READY, Life.RETIRING, Life.ABORTING):
                handle.to(Life.LEAVING)
            proc = handle.proc
            if sig is not None and proc.local_child:
                proc.signal(sig)
                for conn in (handle.conn, handle.ctrl, handle.client):
                    if conn is not None:
                        self.m.door.close(conn)
            elif proc.killable:
                proc.kill()
            else:
                # A worker started by hand: closing its connections makes it exit at once
                # (its control thread sees the end of the connection), even mid-task.
                self.end(handle)

    # ---------------------------------------------------------------- the end
    def declare_lost(self, handle: WorkerHandle, reason: str) -> None:
        """The watchdog found the worker silent: kill it, or keep it as a zombie."""
        if handle.life is Life.STOPPING:
            handle.proc.kill()  # being killed already: try again
            return
        told = handle.life is Life.LEAVING
        handle.to(Life.SILENT, reason)
        logger.warning("declaring %s lost: %s", handle.record.describe(), reason)
        if handle.proc.killable:
            handle.proc.kill()  # its exit completes the loss (on_process_exit -> end)
        else:
            self.end(handle, keep_connections=True, told=told)

    def on_process_exit(self, proc: WorkerProcess) -> None:
        handle = self.workers.get(proc.worker_id)
        if handle is None or handle.proc is not proc or handle.exited:
            return
        if proc.poll() is None:
            return  # spurious wakeup
        handle.exited = True
        if proc.exit_fd is not None:
            self.m.unwatch_fd(proc.exit_fd)
        door = self.m.door
        conn = handle.conn
        if conn is not None and conn in door.conns:
            # Read whatever it sent before dying (results it managed to flush), then close.
            door.read_frames(conn)
            if conn in door.conns:
                door.disconnected(conn, "its process exited")
                return
            if handle.over:
                return
        self.end(handle)

    def disconnected(self, conn: Conn, why: str) -> None:
        """A worker's main connection ended (the door closed it)."""
        handle = conn.handle
        assert handle is not None
        if handle.life is Life.ZOMBIE:
            self.m.watchdog.bury(handle)
            return
        if handle.over or handle.conn is not conn:
            return
        handle.lose_connection(why if handle.life is not Life.LEAVING else "")
        if handle.exited:
            self.end(handle)
        else:
            # The exit status usually follows within milliseconds; give it a moment so the
            # error can name it, then stop waiting.
            self.m.at(time.monotonic() + EXIT_GRACE, partial(self._exit_overdue, handle))

    def _exit_overdue(self, handle: WorkerHandle) -> None:
        if not handle.over and not handle.exited:
            logger.warning("worker %d closed its connection but did not exit; killing it",
                           handle.worker_id)
            handle.proc.kill()

    def end(self, handle: WorkerHandle, keep_connections: bool = False,
            told: bool = False) -> None:
        """The worker is over (connection closed and process exited, or declared lost): settle
        its books. With ``keep_connections`` (a silent worker that cannot be killed) it
        becomes a zombie (``told``: it was told to leave already)."""
        if handle.over:
            return
        m = self.m
        del self.workers[handle.worker_id]
        record = handle.record
        exitcode = handle.proc.poll()
        started = record.state not in (WorkerState.LAUNCHING, WorkerState.CONNECTED)
        ending = verdict(handle, exitcode, started=started, terminating=m.terminating,
                         wanted=bool(m.books.tasks) or not m.closing)
        what = what_ended(handle, exitcode, started)
        stopped = handle.stopped is not None
        client = handle.client
        if keep_connections:
            m.watchdog.haunt(handle, told)
            if client is not None:  # its tasks' requests would go unanswered
                m.door.close(client)
                m.children.client_closed(client, "the worker was declared lost")
        else:
            handle.to(Life.ENDED)
            for conn in (handle.conn, handle.ctrl, client):
                if conn is not None:
                    m.door.close(conn)
            if client is not None:
                m.children.client_closed(client, "the worker is gone")
        if ending is Ending.START_INTERRUPTED:
            record.transition(WorkerState.LOST)
            self._start_interrupted(what)
        elif ending is Ending.START_FAILED:
            record.transition(WorkerState.LOST)
            self.start_failed(self._launcher_of(record.origin), what)
        elif ending is Ending.START_ABANDONED:
            record.transition(WorkerState.LOST)
        elif ending is Ending.LEFT:
            if record.state is not WorkerState.GONE:
                if record.state is not WorkerState.DRAINING:
                    m.books.drain(handle.worker_id)
                record.transition(WorkerState.GONE)
            log = logger.info if not record.local else logger.debug
            log("worker %d left (%s)", handle.worker_id, handle.proc.describe_exit(exitcode))
        else:
            m.recovery.worker_lost(handle, exitcode, what, stopped)
            if not stopped and handle.proc.killable and not m.closing:
                # Workers that keep dying (no task finishing in between) are replaced ever
                # slower.
                self.crash_streak += 1
                if self.crash_streak > RESTART_FREE:
                    delay = backoff(self.crash_streak - RESTART_FREE)
                    self._not_before = time.monotonic() + delay
                    logger.info("%d workers lost in a row; next replacement in %.2f s",
                                self.crash_streak, delay)
        handle.proc.close()
        m.books.forget_worker(handle.worker_id)
        if m.books.queue.declined:
            m.dispatch.check_declined()
        m.status.publish()
        self.ensure()

    def teardown(self) -> None:
        """The manager thread is ending: kill what is left, wait for it (bounded), stop the
        launchers."""
        handles = list(self.workers.values())
        for handle in handles:
            handle.proc.kill()
        deadline = time.monotonic() + 5  # for all of them together
        for handle in handles:
            if handle.proc.killable:
                if handle.proc.wait(max(0.0, deadline - time.monotonic())) is None:
                    logger.error("worker %d (pid %s) did not die", handle.worker_id,
                                 handle.proc.pid)
            handle.proc.close()
        for launcher in self.hosts:
            launcher.close()
        deadline = time.monotonic() + 10
        for launcher in self.hosts:
            launcher.join(max(0.0, deadline - time.monotonic()))


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
    import os
    import sys

    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
