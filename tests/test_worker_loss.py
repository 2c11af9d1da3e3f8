"""A worker that dies fails only the task it was running; the executor keeps working."""

from __future__ import annotations

import signal
from concurrent.futures.process import BrokenProcessPool

import pytest

from distexec import BrokenDistributedExecutor, DistributedExecutor, WorkerLostError
import concurrent.futures as cf

from helpers import Gate, exit_now, getpid, kill_self, segfault, square, wait_gate

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "fn, args, expected",
    [
        (exit_now, (3,), "exit code 3"),
        (kill_self, (signal.SIGKILL,), "SIGKILL"),
        (segfault, (), "SIGSEGV"),
    ],
    ids=["os._exit", "sigkill", "segfault"],
)
def test_dead_worker_fails_its_task_only(executor, fn, args, expected):
    pid_before = executor.submit(getpid).result()
    future = executor.submit(fn, *args)
    with pytest.raises(WorkerLostError) as info:
        future.result()
    err = info.value
    assert isinstance(err, BrokenProcessPool)  # drop-in: PPE code catching this still works
    assert expected in str(err)
    assert err.pid is not None and str(err.pid) in str(err)
    assert f"worker {err.worker_id}" in str(err)
    # The executor is not broken and still has its workers.
    assert list(executor.map(square, range(20))) == [x * x for x in range(20)]
    assert not executor._broken
    assert pid_before  # sanity


def test_prefetched_tasks_survive_a_crash():
    # One worker, short tasks: several travel together; only the crashing one may fail.
    with DistributedExecutor(max_workers=1) as ex:
        assert list(ex.map(square, range(200))) == [x * x for x in range(200)]  # warm up
        futures = [ex.submit(exit_now, 9) if i == 5 else ex.submit(square, i) for i in range(12)]
        outcomes = []
        for i, f in enumerate(futures):
            try:
                outcomes.append(f.result())
            except WorkerLostError:
                outcomes.append("lost")
    assert outcomes == [i * i if i != 5 else "lost" for i in range(12)]


def test_replacement_workers_keep_the_pool_full():
    with DistributedExecutor(max_workers=2) as ex:
        for _ in range(3):
            with pytest.raises(WorkerLostError):
                ex.submit(exit_now, 1).result()
        pids = set(ex.map(getpid, range(200)))
        assert 1 <= len(pids) <= 2


def test_workers_that_cannot_start_break_the_executor(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'not really python' >&2\nexit 1\n")
    fake.chmod(0o755)
    ex = DistributedExecutor(max_workers=2, python=str(fake))
    future = ex.submit(square, 2)
    with pytest.raises(BrokenDistributedExecutor) as info:
        future.result()
    assert "could not start workers" in str(info.value)
    assert "exit code 1" in str(info.value)
    with pytest.raises(BrokenDistributedExecutor):
        ex.submit(square, 2)
    ex.shutdown()


def test_missing_interpreter_breaks_the_executor(tmp_path):
    ex = DistributedExecutor(max_workers=1, python=str(tmp_path / "no-such-python"))
    with pytest.raises(BrokenDistributedExecutor, match="could not be started"):
        ex.submit(square, 2).result()
    ex.shutdown()


def test_initializer_that_kills_its_worker_breaks_the_executor():
    ex = DistributedExecutor(max_workers=2, initializer=exit_now, initargs=(5,))
    with pytest.raises(BrokenDistributedExecutor) as info:
        ex.submit(square, 2).result()
    assert "while starting up" in str(info.value) and "exit code 5" in str(info.value)
    ex.shutdown()


def test_cancel_futures_after_a_crash_cancels_requeued_tasks():
    # Tasks re-queued after a crash already have running futures: they must still end.
    ex = DistributedExecutor(max_workers=1)
    assert list(ex.map(square, range(200))) == [x * x for x in range(200)]  # short tasks: batching
    with Gate() as gate:
        futures = [ex.submit(exit_now, 9)] + [ex.submit(wait_gate, gate.address) for _ in range(20)]
        with pytest.raises(WorkerLostError):
            futures[0].result()
        gate.wait_arrivals(1)
        ex.shutdown(wait=False, cancel_futures=True)
        gate.open()
        cf.wait(futures, timeout=30)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures[2:])
    ex.shutdown()
