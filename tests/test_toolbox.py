"""Issue 5: per-task options (priority, resources, retries on exceptions, fallbacks), declining
a worker, dependencies between tasks, and collecting results per tag. Real worker processes."""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import threading

import pytest

import distexec
from distexec import (
    DependencyError,
    DistributedExecutor,
    TaskCounts,
    TaskDeclined,
    TaskTimeoutError,
    WorkerLostError,
)

from helpers import (
    Gate,
    LogWatch,
    add,
    decline_always,
    decline_first,
    decline_then_raise,
    exit_now,
    failing_fallback,
    flaky,
    log_run,
    raise_value_error,
    read_log,
    recover,
    spin_until_killed,
    square,
    wait_gate,
    where,
)

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------- priorities
def test_higher_priority_runs_first_then_fifo(tmp_path):
    log = str(tmp_path / "runs")
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        blocker = ex.submit(wait_gate, gate.address)
        gate.wait_arrivals(1)  # the only worker is busy: everything below queues
        futures = [ex.options(priority=p).submit(log_run, log, f"{name}")
                   for name, p in [("low1", -1), ("mid1", 0), ("high1", 5), ("mid2", 0),
                                   ("high2", 5), ("low2", -1)]]
        gate.open()
        blocker.result()
        cf.wait(futures)
    assert read_log(log) == ["high1", "high2", "mid1", "mid2", "low1", "low2"]


def test_priority_must_be_an_integer(executor):
    with pytest.raises(TypeError, match="priority must be an integer"):
        executor.options(priority=1.5)


# ---------------------------------------------------------------- retries and fallbacks
def test_retry_on_the_chosen_exception_until_it_succeeds(tmp_path):
    path = str(tmp_path / "calls")
    with DistributedExecutor(max_workers=2) as ex:
        future = ex.options(retry_on=ConnectionError, max_retries=3).submit(flaky, path, 2)
        assert future.result(timeout=30) == 2  # third call succeeded
        assert ex.status().total == TaskCounts(finished=1)


def test_other_exceptions_are_not_retried(tmp_path):
    path = str(tmp_path / "calls")
    with DistributedExecutor(max_workers=1) as ex:
        future = ex.options(retry_on=ConnectionError).submit(flaky, path, 5, KeyError)
        with pytest.raises(KeyError, match="failure 1"):
            future.result(timeout=30)
    assert os.path.getsize(path) == 1


def test_retries_are_bounded_by_max_retries(tmp_path):
    path = str(tmp_path / "calls")
    with DistributedExecutor(max_workers=1) as ex:
        future = ex.options(retry_on=(OSError,), max_retries=2).submit(flaky, path, 10)
        with pytest.raises(ConnectionError, match="failure 3"):
            future.result(timeout=30)
    assert os.path.getsize(path) == 3  # one run and two retries


def test_fallback_runs_when_every_attempt_raised(tmp_path):
    path = str(tmp_path / "calls")
    with DistributedExecutor(max_workers=1) as ex:
        opts = ex.options(retry_on=ConnectionError, max_retries=1, fallback=recover)
        assert opts.submit(flaky, path, 10).result(timeout=30) == (
            "recovered", "ConnectionError", (path, 10))
        # The fallback's own exception becomes the future's.
        bad = ex.options(fallback=failing_fallback).submit(flaky, path, 10)
        with pytest.raises(ValueError, match="fallback failed too .after ConnectionError"):
            bad.result(timeout=30)


def test_fallback_after_a_time_limit_and_after_lost_workers():
    with DistributedExecutor(max_workers=1, max_retries=0) as ex:
        slow = ex.options(time_limit=0.5, fallback=recover).submit(spin_until_killed, 1)
        assert slow.result(timeout=30) == ("recovered", "TaskTimeoutError", (1,))
        crash = ex.options(fallback=recover).submit(exit_now, 3)
        assert crash.result(timeout=30) == ("recovered", "WorkerLostError", (3,))
        # Without a fallback the same failures keep their errors.
        with pytest.raises(TaskTimeoutError):
            ex.options(time_limit=0.5).submit(spin_until_killed).result(timeout=30)
        with pytest.raises(WorkerLostError):
            ex.submit(exit_now, 3).result(timeout=30)


def test_fallback_applies_per_item_in_chunked_map(tmp_path):
    with DistributedExecutor(max_workers=2) as ex:
        out = list(ex.options(fallback=recover).map(add, [1, 2, "x"], [1, 1, 1], chunksize=2))
    assert out[:2] == [2, 3]
    assert out[2] == ("recovered", "TypeError", ("x", 1))


def test_bad_options_are_refused(executor):
    with pytest.raises(TypeError, match="retry_on"):
        executor.options(retry_on="ValueError")
    with pytest.raises(TypeError, match="fallback must be callable"):
        executor.options(fallback=3)
    with pytest.raises(TypeError, match="depends_on takes futures"):
        executor.options(depends_on=[1])
    with pytest.raises(ValueError, match="gpu=0 must be positive"):
        executor.options(resources={"gpu": 0})
    with pytest.raises(TypeError, match="must be a dict"):
        executor.options(resources=["gpu"])
    with pytest.raises(ValueError, match="'slots' is the number of workers"):
        DistributedExecutor(resources={"slots": 3})


# ---------------------------------------------------------------- resources and placement
def test_tasks_needing_a_resource_share_it():
    with DistributedExecutor(max_workers=2, resources={"gpu": 1}) as ex, Gate() as gate:
        gpu = ex.options(resources={"gpu": 1}, tag="gpu")
        first = gpu.submit(wait_gate, gate.address, "a")
        gate.wait_arrivals(1)
        second = gpu.submit(wait_gate, gate.address, "b")
        # The other worker is free, but the only gpu is taken: a plain task runs meanwhile.
        assert ex.submit(square, 4).result(timeout=30) == 16
        assert ex.status().tags["gpu"] == TaskCounts(waiting=1, running=1)
        assert gate.arrived == 1
        gate.open()
        assert (first.result(timeout=30), second.result(timeout=30)) == ("a", "b")
        w = ex.options(resources={"gpu": 1}).submit(where).result(timeout=30)
        assert w[1] == "local" and w[2] == {"gpu": 1.0, "slots": 2.0}


def test_a_task_needing_several_slots_waits_for_them_and_is_not_overtaken():
    with DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        ex.wait_for_workers(2, timeout=60)
        busy = ex.submit(wait_gate, gate.address, "plain")
        gate.wait_arrivals(1)
        wide = ex.options(resources={"slots": 2}, tag="wide").submit(square, 3)
        later = ex.options(tag="later").submit(square, 2)
        # The idle worker keeps its slot for the wide task rather than taking the later one.
        ex.status()  # (answered in the turn that files both tasks, before dispatch)
        status = ex.status()
        assert status.tags["wide"] == TaskCounts(waiting=1)
        assert status.tags["later"] == TaskCounts(waiting=1)
        gate.open()
        assert busy.result(timeout=30) == "plain"
        assert wide.result(timeout=30) == 9
        assert later.result(timeout=30) == 4


def test_unmet_needs_wait_for_a_worker_that_offers_them(hand_workers, caplog):
    """A task needing a label no worker has waits (with a warning) until a worker started by
    hand with --resources joins; then it runs there, and only there."""
    with DistributedExecutor(max_workers=1) as ex:
        ex.start()
        with caplog.at_level("WARNING", logger="distexec"):
            future = ex.options(resources={"zone": "b", "gpu": 1}).submit(where)
            assert ex.submit(square, 3).result(timeout=30) == 9  # ran locally meanwhile
        assert "which no worker offers" in caplog.text
        assert not future.done()
        (proc,) = hand_workers(ex, 1, "--resources", "zone=b,gpu=2")
        worker_id, origin, resources = future.result(timeout=60)
        assert origin == "joined"
        assert resources == {"zone": "b", "gpu": 2.0, "slots": 1.0}
    assert proc.wait(timeout=30) == 0


def test_worker_resources_option_is_checked(python_env):
    proc = subprocess.run([sys.executable, "-m", "distexec.worker", "--connect", "127.0.0.1:1",
                           "--resources", "gpu"], env=dict(python_env, DISTEXEC_KEY="00" * 32),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "'gpu' is not NAME=VALUE" in proc.stderr


# ---------------------------------------------------------------- declining a worker
def test_a_declined_task_runs_on_another_worker(tmp_path):
    with DistributedExecutor(max_workers=2) as ex:
        ex.wait_for_workers(2, timeout=60)
        declined_by, ran_on = ex.submit(decline_first, str(tmp_path / "d")).result(timeout=30)
        assert declined_by != ran_on
        assert ex.status().total == TaskCounts(finished=1)


def test_a_task_every_worker_declines_fails_clearly():
    with DistributedExecutor(max_workers=2) as ex:
        ex.wait_for_workers(2, timeout=60)
        future = ex.submit(decline_always, "wrong kind of machine")
        with pytest.raises(TaskDeclined, match="declined by every worker") as info:
            future.result(timeout=30)
        assert "wrong kind of machine" in str(info.value)
        assert ex.submit(square, 5).result() == 25  # the executor carries on


def test_decline_outside_a_worker_raises_and_current_worker_is_none():
    assert distexec.current_worker() is None
    with pytest.raises(TaskDeclined):
        distexec.decline("here")


# ---------------------------------------------------------------- dependencies
def test_futures_as_arguments_are_resolved_before_dispatch():
    with DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        slow = ex.submit(wait_gate, gate.address, 10)
        nine = ex.submit(square, 3)
        total = ex.submit(add, slow, b=nine)
        also = ex.options(depends_on=[total]).submit(square, 2)
        gate.wait_arrivals(1)
        assert nine.result(timeout=30) == 9
        assert ex.status().total.waiting == 2  # blocked on their dependencies
        assert not total.running()
        gate.open()
        assert total.result(timeout=30) == 19
        assert also.result(timeout=30) == 4


def test_a_failed_dependency_fails_the_task_with_a_chained_error():
    with DistributedExecutor(max_workers=1) as ex:
        bad = ex.submit(raise_value_error, "broken input")
        later = ex.submit(square, bad)
        with pytest.raises(DependencyError, match=r"depends on task \d+ .*ValueError: broken"
                           ) as info:
            later.result(timeout=30)
        assert isinstance(info.value.__cause__, ValueError)
        assert ex.status().total.failed == 2


def test_a_cancelled_dependency_does_not_deadlock():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        blocker = ex.submit(wait_gate, gate.address)
        gate.wait_arrivals(1)
        queued = ex.submit(square, 2)
        dependent = ex.submit(square, queued)
        assert queued.cancel()
        with pytest.raises(DependencyError, match="was cancelled") as info:
            dependent.result(timeout=30)
        assert isinstance(info.value.__cause__, cf.CancelledError)
        gate.open()
        blocker.result(timeout=30)


def test_dependencies_from_another_executor_and_cancelling_a_waiting_task():
    with DistributedExecutor(max_workers=1) as ex, cf.ThreadPoolExecutor(1) as threads:
        event = threading.Event()
        outside = threads.submit(event.wait, 30)
        waiting = ex.submit(square, 3, )
        dependent = ex.submit(add, outside, 1)  # True + 1
        aborted = ex.submit(add, outside, 2)
        assert ex.abort(aborted)
        assert aborted.cancelled()
        event.set()
        assert dependent.result(timeout=30) == 2
        assert waiting.result() == 9


def test_shutdown_cancel_futures_cancels_tasks_waiting_for_dependencies():
    ex = DistributedExecutor(max_workers=1)
    with Gate() as gate:
        slow = ex.submit(wait_gate, gate.address)
        gate.wait_arrivals(1)
        dependent = ex.submit(square, slow)
        ex.shutdown(wait=False, cancel_futures=True)
        cf.wait([dependent], timeout=30)  # the task manager cancels it
        assert dependent.cancelled()
        gate.open()
        ex.shutdown(wait=True)
    assert slow.result() is None


# ---------------------------------------------------------------- results per tag
def test_results_are_collected_per_tag_in_completion_order():
    with DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        fits = ex.options(tag="fit")
        held = fits.submit(wait_gate, gate.address, "last")
        quick = [fits.submit(square, i) for i in range(3)]
        ex.options(tag="other").submit(square, 7)
        cf.wait(quick)
        assert sorted(ex.next_result("fit") for _ in range(3)) == [0, 1, 4]
        with pytest.raises(TimeoutError, match="1 task"):
            ex.next_result("fit", timeout=0.2)
        gate.open()
        assert [f.result() for f in ex.as_completed("fit", timeout=30)] == ["last"]
        assert list(ex.as_completed("fit")) == []  # everything was collected
        with pytest.raises(LookupError, match="no task tagged 'fit'"):
            ex.next_result("fit")
        assert ex.next_result("other") == 49
        with pytest.raises(LookupError):
            ex.next_result("never used")
        failing = ex.options(tag="bad").submit(raise_value_error, "x")
        with pytest.raises(ValueError):
            ex.next_result("bad", timeout=30)
        assert failing.done()
        assert held.result() == "last"


def test_a_declined_task_can_still_fall_back(tmp_path):
    with DistributedExecutor(max_workers=2) as ex:
        ex.wait_for_workers(2, timeout=60)
        future = ex.options(fallback=recover).submit(decline_then_raise, str(tmp_path / "d"))
        assert future.result(timeout=30) == ("recovered", "ValueError", (str(tmp_path / "d"),))
        assert ex.submit(square, 3).result(timeout=30) == 9


def test_cancelling_a_task_waiting_for_dependencies_wakes_wait():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        slow = ex.submit(wait_gate, gate.address, 1)
        dependent = ex.submit(square, slow)
        gate.wait_arrivals(1)
        assert dependent.cancel()
        gate.open()
        done, _ = cf.wait([dependent], timeout=30)
        assert dependent in done and dependent.cancelled()
        assert ex.status().total.cancelled == 1


def test_a_declined_task_fails_when_the_last_worker_that_could_take_it_leaves(hand_workers):
    """Worker B declines the task while worker A is busy; when A leaves, B is all that is
    left and has declined it: the task fails instead of waiting for ever."""
    import signal

    with LogWatch() as log, DistributedExecutor(max_workers=0, listen="127.0.0.1:0") as ex, \
            Gate() as gate:
        ex.start()
        hand_workers(ex, 2)
        ex.wait_for_workers(2, timeout=60)
        busy = ex.submit(wait_gate, gate.address, "done")
        gate.wait_arrivals(1)
        declined = ex.submit(decline_always, "not on this one")
        log.wait_for("goes back to the queue")
        (a,) = [w for w in ex.workers() if w.running == busy._distexec_task_id]
        os.kill(a.pid, signal.SIGTERM)  # A leaves after the task it runs
        log.wait_for("asked to leave")
        gate.open()
        assert busy.result(timeout=30) == "done"
        with pytest.raises(TaskDeclined, match="declined by every worker still running"):
            declined.result(timeout=30)
        assert log.matching("every remaining worker declined it")
