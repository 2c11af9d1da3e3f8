"""The elastic pool: workers started by hand join and leave, listen/key options, keygen,
resize(), graceful leave on SIGTERM, abort on a hand-started worker, and shutdown's effect on
hand-started workers.

Workers are real processes (``python -m distexec.cli worker``) over real sockets. Tests wait on
gates, log messages, process exits and ``wait_for_workers``, never on sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from distexec import DistributedExecutor, TaskTimeoutError

from helpers import (
    Gate,
    LogWatch,
    getpid,
    occupy_local_and_hand_worker,
    square,
    wait_for_pid_gone,
    wait_gate,
    worker_running,
)

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def worker_env(python_env, key_hex=None):
    """Environment for a worker started by hand: tests/ importable, key only if given."""
    env = dict(python_env)
    env.pop("DISTEXEC_KEY", None)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, env["PYTHONPATH"]])
    if key_hex is not None:
        env["DISTEXEC_KEY"] = key_hex
    return env


def stop(proc, timeout=10):
    """Kill a process this test started (if still running) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout)


def wait_log_count(log, predicate, n, timeout=30.0):
    """Wait until at least ``n`` log records satisfy ``predicate``; return them."""
    return log.wait_count(predicate, n, timeout)


def keygen(python_env, path):
    return subprocess.run([sys.executable, "-m", "distexec.cli", "keygen", str(path)],
                          env=python_env, capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------------- 1. no local workers
def test_executor_without_local_workers_runs_on_hand_started_ones(hand_workers):
    with DistributedExecutor(max_workers=0, listen="127.0.0.1:0") as ex, Gate() as gate:
        ex.start()
        assert ex.address.startswith("127.0.0.1:")
        assert ex.workers() == []  # no local worker was started
        procs = hand_workers(ex, 2)
        pids = {p.pid for p in procs}
        assert ex.wait_for_workers(2, timeout=30) >= 2
        infos = ex.workers()
        assert len(infos) == 2
        assert {w.pid for w in infos} == pids
        for info in infos:
            assert info.local is False
            assert info.host == socket.gethostname()
            assert info.state in ("idle", "busy")
        # Both workers busy at once: each holds one of the two gated tasks.
        futures = [ex.submit(wait_gate, gate.address, i) for i in range(2)]
        gate.wait_arrivals(2)
        running_on = {worker_running(ex, f).pid for f in futures}
        assert running_on == pids
        gate.open()
        assert [f.result(timeout=30) for f in futures] == [0, 1]
        assert gate.arrived == 2
        assert set(ex.map(getpid, range(20))) <= pids
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
    for proc in procs:
        assert proc.wait(20) == 0


# ---------------------------------------------------------------------- 2. argument checks
def test_listen_and_key_argument_errors(monkeypatch):
    monkeypatch.delenv("DISTEXEC_KEY", raising=False)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        DistributedExecutor(max_workers=0)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        DistributedExecutor(max_workers=-1, listen="127.0.0.1:0")
    with pytest.raises(ValueError, match="key") as info:
        DistributedExecutor(max_workers=1, listen="0.0.0.0:0")
    assert "DISTEXEC_KEY" in str(info.value) and "0.0.0.0" in str(info.value)
    with pytest.raises(ValueError, match="too short"):
        DistributedExecutor(max_workers=1, key=b"0123456789")
    with pytest.raises(ValueError, match="too short"):
        DistributedExecutor(max_workers=1, listen="0.0.0.0:0", key="00" * 15)
    with pytest.raises(ValueError, match="hexadecimal"):
        DistributedExecutor(max_workers=1, key="not hex at all")
    for bad in ("nonsense", "127.0.0.1", "127.0.0.1:port", "127.0.0.1:-1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            DistributedExecutor(max_workers=1, listen=bad)
    # A too-short key in the environment is refused as well.
    monkeypatch.setenv("DISTEXEC_KEY", "ab" * 4)
    with pytest.raises(ValueError, match="too short"):
        DistributedExecutor(max_workers=1)


def test_a_key_in_the_environment_is_the_executors_key(monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv("DISTEXEC_KEY", key.hex())
    ex = DistributedExecutor(max_workers=1, listen="0.0.0.0:0")
    assert ex.key == key
    assert ex.address is None  # not started: constructing does not listen
    ex.shutdown()


# ---------------------------------------------------------------------- 3. non-loopback listen
def test_wildcard_listen_with_key_accepts_a_hand_worker(hand_workers, monkeypatch):
    monkeypatch.delenv("DISTEXEC_KEY", raising=False)
    key = os.urandom(32)
    with DistributedExecutor(max_workers=0, listen="0.0.0.0:0", key=key) as ex:
        assert ex.key == key
        ex.start()
        host, _, port = ex.address.rpartition(":")
        assert host == "0.0.0.0" and int(port) > 0
        target = SimpleNamespace(address=f"127.0.0.1:{port}", key=key)
        (proc,) = hand_workers(target, 1)
        ex.wait_for_workers(1, timeout=30)
        (info,) = ex.workers()
        assert info.pid == proc.pid and info.local is False
        assert ex.submit(getpid).result(timeout=30) == proc.pid
        assert ex.submit(square, 12).result(timeout=30) == 144
    assert proc.wait(20) == 0


# ---------------------------------------------------------------------- 4. key file
def test_keygen_writes_a_private_key_file_that_a_worker_can_use(python_env, tmp_path):
    path = tmp_path / "distexec.key"
    result = keygen(python_env, path)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    key_hex = text.strip()
    assert len(key_hex) == 64
    bytes.fromhex(key_hex)  # valid hexadecimal

    # keygen never overwrites a key.
    again = keygen(python_env, path)
    assert again.returncode == 1
    assert "cannot create" in again.stderr
    assert path.read_text() == text

    with DistributedExecutor(max_workers=0, listen="127.0.0.1:0", key=key_hex) as ex:
        assert ex.key == bytes.fromhex(key_hex)
        ex.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "distexec.cli", "worker", ex.address, "--key-file", str(path)],
            env=worker_env(python_env), stdin=subprocess.DEVNULL)
        try:
            ex.wait_for_workers(1, timeout=30)
            assert ex.submit(getpid).result(timeout=30) == proc.pid
            assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]
        except BaseException:
            stop(proc)
            raise
    try:
        assert proc.wait(20) == 0
    finally:
        stop(proc)


# ---------------------------------------------------------------------- 5. wrong key
def test_worker_with_the_wrong_key_is_refused_and_the_executor_carries_on(python_env):
    with LogWatch() as log, DistributedExecutor(max_workers=1, listen="127.0.0.1:0") as ex:
        ex.wait_for_workers(1, timeout=30)
        wrong = os.urandom(32)
        assert wrong != ex.key
        proc = subprocess.Popen(
            [sys.executable, "-m", "distexec.cli", "worker", ex.address],
            env=worker_env(python_env, wrong.hex()), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            stop(proc)
        assert proc.returncode == 3, err
        assert "handshake" in err and "key" in err, err
        assert "authentication failed" in log.wait_for("refused connection")
        # Only the local worker; it still works.
        (info,) = ex.workers()
        assert info.local is True
        assert ex.submit(square, 7).result(timeout=30) == 49
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]


# ---------------------------------------------------------------------- 6. graceful leave
def test_sigterm_on_a_hand_worker_leaves_after_its_task_without_a_retry(hand_workers):
    with LogWatch() as log, DistributedExecutor(max_workers=1, listen="127.0.0.1:0") as ex, \
            Gate() as gate:
        proc, futures, remote = occupy_local_and_hand_worker(ex, hand_workers, gate)
        assert remote.pid == proc.pid
        (mine,) = [f for f in futures if worker_running(ex, f).worker_id == remote.worker_id]
        proc.send_signal(signal.SIGTERM)
        message = log.wait_for("asked to leave")
        assert f"worker {remote.worker_id}" in message
        assert "finishes the 1 task(s) it holds" in message
        assert proc.poll() is None  # still running its task
        draining = next(w for w in ex.workers() if w.worker_id == remote.worker_id)
        assert draining.state == "draining"
        gate.open()
        assert [f.result(timeout=30) for f in futures] == [0, 1]
        assert mine.result() in (0, 1)
        assert gate.arrived == 2  # nothing ran twice
        assert proc.wait(20) == 0
        log.wait_for(f"worker {remote.worker_id} left")
        assert not log.matching("will run again")
        assert not log.matching(f"lost worker {remote.worker_id}")
        infos = ex.workers()
        assert proc.pid not in {w.pid for w in infos}
        assert remote.worker_id not in {w.worker_id for w in infos}
        assert all(w.local for w in infos)
        # New tasks go to the local worker only (a hand-started worker is not replaced).
        local_pids = {w.pid for w in infos}
        assert set(ex.map(getpid, range(10))) <= local_pids


# ---------------------------------------------------------------------- 7. resize
def test_resize_grows_then_shrinks_without_rerunning_tasks():
    with LogWatch() as log, DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        ex.wait_for_workers(1, timeout=30)
        ex.resize(3)
        assert ex.max_workers == 3
        ex.wait_for_workers(3, timeout=30)
        before = ex.workers()
        assert len(before) == 3 and all(w.local for w in before)
        futures = [ex.submit(wait_gate, gate.address, i) for i in range(3)]
        gate.wait_arrivals(3)
        assert {worker_running(ex, f).worker_id for f in futures} == \
            {w.worker_id for w in before}
        ex.resize(1)
        assert ex.max_workers == 1
        during = ex.workers()  # answered after the resize command (same ordered inbox)
        retiring = [w for w in during if w.state == "draining"]
        staying = [w for w in during if w.state != "draining"]
        assert len(retiring) == 2 and len(staying) == 1, during
        assert all(len(w.held) == 1 for w in retiring)  # they keep their task
        for w in retiring:
            assert psutil.pid_exists(w.pid)
        gate.open()
        assert [f.result(timeout=30) for f in futures] == [0, 1, 2]
        assert gate.arrived == 3  # no task ran twice
        for w in retiring:
            assert wait_for_pid_gone(w.pid, 20), f"retired worker {w.worker_id} did not exit"
            log.wait_for(f"worker {w.worker_id} left")
        assert not log.matching("will run again")
        assert not log.matching("lost worker")
        (last,) = ex.workers()
        assert last.local and last.worker_id == staying[0].worker_id
        assert last.pid == staying[0].pid
        assert ex.max_workers == 1
        assert set(ex.map(getpid, range(5))) == {last.pid}


def test_resize_rejects_bad_sizes_and_works_before_start():
    ex = DistributedExecutor(max_workers=1)
    try:
        with pytest.raises(ValueError, match=">= 0"):
            ex.resize(-1)
        with pytest.raises(TypeError):
            ex.resize(2.0)
        assert ex.max_workers == 1
        ex.resize(2)
        assert ex.max_workers == 2
        assert ex.address is None  # still not started
        assert ex.wait_for_workers(2, timeout=30) == 2
        infos = ex.workers()
        assert len(infos) == 2 and all(w.local for w in infos)
        assert ex.submit(square, 3).result(timeout=30) == 9
    finally:
        ex.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.resize(1)


# ---------------------------------------------------------------------- 8. abort
def test_abort_on_a_hand_worker_restarts_it_in_place(hand_workers):
    with LogWatch() as log, DistributedExecutor(max_workers=0, listen="127.0.0.1:0") as ex, \
            Gate() as gate:
        ex.start()
        (proc,) = hand_workers(ex, 1)
        ex.wait_for_workers(1, timeout=30)
        future = ex.submit(wait_gate, gate.address, "never")
        gate.wait_arrivals(1)
        old = worker_running(ex, future)
        assert old.pid == proc.pid and not old.local
        assert ex.abort(future) is True
        assert future.cancelled()
        with pytest.raises(Exception) as info:
            future.result(timeout=5)
        assert type(info.value).__name__ == "CancelledError"
        # The process re-executes itself (same pid) and joins again under a new id.
        joined = wait_log_count(
            log, lambda r: "joined from" in r and f"(pid {proc.pid} on" in r, 2)
        new_id = int(joined[-1].split()[1])
        assert new_id != old.worker_id
        log.wait_for(f"worker {new_id} ready")
        ex.wait_for_workers(1, timeout=30)
        assert proc.poll() is None
        infos = ex.workers()
        assert [(w.worker_id, w.pid) for w in infos] == [(new_id, proc.pid)]
        assert not log.matching("will run again")  # an abort charges nobody
        assert gate.arrived == 1  # the aborted task did not run again
        assert ex.submit(getpid).result(timeout=30) == proc.pid
        assert ex.submit(square, 6).result(timeout=30) == 36
        assert future.cancelled()
        # The old heartbeat process was collected before the re-exec: one live pulse process,
        # no zombie left behind by each restart.
        kids = psutil.Process(proc.pid).children()
        assert [k.status() != psutil.STATUS_ZOMBIE and "distexec-pulse" in k.cmdline()
                for k in kids] == [True]
    assert proc.wait(20) == 0


# ---------------------------------------------------------------------- 9. shutdown
def test_hand_workers_exit_cleanly_when_the_executor_shuts_down(hand_workers):
    ex = DistributedExecutor(max_workers=0, listen="127.0.0.1:0")
    try:
        ex.start()
        procs = hand_workers(ex, 2)
        ex.wait_for_workers(2, timeout=30)
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
        assert all(p.poll() is None for p in procs)
    finally:
        ex.shutdown(wait=True)
    assert [p.wait(20) for p in procs] == [0, 0]


def test_cancel_running_disconnects_a_busy_hand_worker(hand_workers):
    with LogWatch() as log, DistributedExecutor(max_workers=0, listen="127.0.0.1:0") as ex, \
            Gate() as gate:
        ex.start()
        (proc,) = hand_workers(ex, 1)
        ex.wait_for_workers(1, timeout=30)
        future = ex.submit(wait_gate, gate.address, "never")
        queued = ex.submit(square, 5)
        gate.wait_arrivals(1)
        assert worker_running(ex, future).pid == proc.pid
        start = time.monotonic()
        ex.shutdown(wait=True, cancel_running=True)
        elapsed = time.monotonic() - start
        # The gate is still closed: the task cannot have finished; shutdown did not wait for it.
        assert gate.arrived == 1
        assert elapsed < 20, f"shutdown(cancel_running=True) took {elapsed:.1f} s"
        assert future.cancelled()
        assert queued.cancelled()
        assert log.matching("terminating the executor")
        assert proc.wait(20) == 4  # its control connection closed: it exits at once
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(square, 1)


# ---------------------------------------------------------------------- 10. wait_for_workers
def test_wait_for_workers_times_out_naming_the_count():
    with DistributedExecutor(max_workers=1) as ex:
        assert ex.wait_for_workers(1, timeout=30) == 1
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="only 1 of 5") as info:
            ex.wait_for_workers(5, timeout=0.5)
        assert time.monotonic() - start >= 0.5
        assert "0.5 s" in str(info.value)
        assert ex.submit(square, 2).result(timeout=30) == 4


# ---------------------------------------------------------------------- more elastic behaviour
def test_tasks_wait_for_a_worker_and_a_worker_may_start_before_the_executor(hand_workers):
    key = os.urandom(32)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # a free port, released for the executor
    # The worker starts first and keeps trying to connect (--connect-timeout).
    (proc,) = hand_workers(SimpleNamespace(address=f"127.0.0.1:{port}", key=key), 1,
                           "--connect-timeout", "30")
    with DistributedExecutor(max_workers=0, listen=f"127.0.0.1:{port}", key=key) as ex:
        # Submitted before any worker is ready: they wait in the queue.
        futures = [ex.submit(square, i) for i in range(5)]
        pid_future = ex.submit(getpid)
        assert ex.address == f"127.0.0.1:{port}"
        assert [f.result(timeout=30) for f in futures] == [0, 1, 4, 9, 16]
        assert pid_future.result(timeout=30) == proc.pid
        (info,) = ex.workers()
        assert info.pid == proc.pid and not info.local
    assert proc.wait(20) == 0


def test_resize_never_touches_hand_started_workers(hand_workers):
    with LogWatch() as log, DistributedExecutor(max_workers=2, listen="127.0.0.1:0") as ex:
        ex.wait_for_workers(2, timeout=30)
        (proc,) = hand_workers(ex, 1)
        ex.wait_for_workers(3, timeout=30)
        local = [w for w in ex.workers() if w.local]
        assert len(local) == 2
        ex.resize(0)
        assert ex.max_workers == 0
        for w in local:
            assert wait_for_pid_gone(w.pid, 20)
            log.wait_for(f"worker {w.worker_id} left")
        (remote,) = ex.workers()
        assert remote.pid == proc.pid and not remote.local
        assert proc.poll() is None
        assert set(ex.map(getpid, range(10))) == {proc.pid}
        ex.resize(1)  # and back: a local worker again, next to the hand-started one
        ex.wait_for_workers(2, timeout=30)
        infos = ex.workers()
        assert sorted(w.local for w in infos) == [False, True]
    assert proc.wait(20) == 0


def test_sigterm_on_an_idle_hand_worker_leaves_at_once(hand_workers):
    with LogWatch() as log, DistributedExecutor(max_workers=1, listen="127.0.0.1:0") as ex:
        ex.wait_for_workers(1, timeout=30)
        (proc,) = hand_workers(ex, 1)
        ex.wait_for_workers(2, timeout=30)
        remote = next(w for w in ex.workers() if not w.local)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.wait_for(f"worker {remote.worker_id} left")
        assert "finishes the 0 task(s)" in log.wait_for("asked to leave")
        assert [w.local for w in ex.workers()] == [True]  # not replaced
        assert ex.submit(square, 9).result(timeout=30) == 81


def test_second_sigterm_exits_at_once_and_the_task_runs_again(hand_workers):
    with LogWatch() as log, DistributedExecutor(max_workers=1, listen="127.0.0.1:0") as ex, \
            Gate() as gate:
        proc, futures, remote = occupy_local_and_hand_worker(ex, hand_workers, gate)
        (mine,) = [f for f in futures if worker_running(ex, f).worker_id == remote.worker_id]
        proc.send_signal(signal.SIGTERM)
        log.wait_for("asked to leave")  # the first signal was handled
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.wait_for(f"lost worker {remote.worker_id} ")
        message = log.wait_for("will run again")
        assert f"task {mine._distexec_task_id} " in message
        gate.open()
        assert [f.result(timeout=30) for f in futures] == [0, 1]
        assert gate.arrived == 3  # the hand worker's task ran again, on the local worker
        assert [w.local for w in ex.workers()] == [True]


def test_time_limit_on_a_hand_worker_restarts_it_in_place(hand_workers):
    from distexec import TaskTimeoutError

    with LogWatch() as log, DistributedExecutor(max_workers=0, listen="127.0.0.1:0") as ex, \
            Gate() as gate:
        ex.start()
        (proc,) = hand_workers(ex, 1)
        ex.wait_for_workers(1, timeout=30)
        (old,) = ex.workers()
        future = ex.options(time_limit=0.5).submit(wait_gate, gate.address, "too late")
        gate.wait_arrivals(1)
        with pytest.raises(TaskTimeoutError, match="exceeded its time limit of 0.5 s"):
            future.result(timeout=30)
        joined = wait_log_count(
            log, lambda r: "joined from" in r and f"(pid {proc.pid} on" in r, 2)
        new_id = int(joined[-1].split()[1])
        assert new_id != old.worker_id
        log.wait_for(f"worker {new_id} ready")
        assert proc.poll() is None
        assert ex.submit(getpid).result(timeout=30) == proc.pid
        assert gate.arrived == 1  # not retried
    assert proc.wait(20) == 0


def test_a_leaving_worker_that_is_aborted_exits_instead_of_restarting(hand_workers):
    with LogWatch() as log, DistributedExecutor(max_workers=0, listen="127.0.0.1:0") as ex, \
            Gate() as gate:
        ex.start()
        (proc,) = hand_workers(ex, 1)
        ex.wait_for_workers(1, timeout=30)
        future = ex.submit(wait_gate, gate.address, "x")
        gate.wait_arrivals(1)
        proc.send_signal(signal.SIGTERM)
        log.wait_for("asked to leave")
        assert ex.abort(future) is True
        assert proc.wait(20) == 6  # EXIT_ABORTED, not a re-exec that would rejoin
        assert len(log.matching("joined from")) == 1


def test_a_time_limited_task_never_waits_behind_an_abort_in_progress(hand_workers):
    # The first task holds the GIL past its limit: the worker cannot act on the ABORT until
    # the call returns. The second, time-limited task must not be sent there meanwhile (its
    # clock would run while it waits) and must succeed.
    from helpers import hold_gil

    with DistributedExecutor(max_workers=0, listen="127.0.0.1:0") as ex:
        ex.start()
        hand_workers(ex, 1)
        ex.wait_for_workers(1, timeout=30)
        stuck = ex.options(time_limit=0.5).submit(hold_gil, 3.0)
        with pytest.raises(TaskTimeoutError):
            stuck.result(timeout=30)
        later = ex.options(time_limit=2.0).submit(square, 3)
        assert later.result(timeout=30) == 9
