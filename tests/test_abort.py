"""Stopping work: abort(), per-task time limits, shutdown(cancel_running=True), and Ctrl-C while
the caller waits (which must leave the executor usable)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from concurrent.futures import CancelledError, Future

import pytest

from distexec import DistributedExecutor, TaskTimeoutError
from distexec.manager import Manager

from helpers import (
    Gate,
    LogWatch,
    getpid,
    square,
    wait_for_pid_gone,
    wait_gate,
    worker_running,
)

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------------------- abort
def test_abort_a_queued_task_cancels_it_and_it_never_runs():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        running = ex.submit(wait_gate, gate.address, "first")
        gate.wait_arrivals(1)
        queued = ex.submit(wait_gate, gate.address, "second")
        assert ex.abort(queued) is True
        assert queued.cancelled()
        gate.open()
        assert running.result() == "first"
        assert ex.submit(square, 3).result() == 9
        assert gate.arrived == 1


def test_abort_a_running_task_stops_and_replaces_its_worker():
    with LogWatch() as log, DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        future = ex.submit(wait_gate, gate.address, "never")
        gate.wait_arrivals(1)
        worker = worker_running(ex, future)
        assert ex.abort(future) is True
        assert future.cancelled()
        with pytest.raises(CancelledError):
            future.result()
        assert wait_for_pid_gone(worker.pid, 10)  # it was really stopped
        log.wait_for(f"stopped by the executor (abort of task {future._distexec_task_id})")
        assert not log.matching("will run again")  # an abort is not a loss to retry
        ex.wait_for_workers(2, timeout=30)
        assert worker.pid not in {w.pid for w in ex.workers()}
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
        assert gate.arrived == 1


def test_abort_a_prefetched_task_skips_it_without_killing_the_worker():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        assert list(ex.map(square, range(300))) == [x * x for x in range(300)]  # short: batching
        pid = ex.submit(getpid).result()
        futures = [ex.submit(wait_gate, gate.address, 0)] + [ex.submit(square, i)
                                                            for i in range(1, 6)]
        gate.wait_arrivals(1)
        assert ex.abort(futures[3]) is True
        gate.open()
        assert futures[3].cancelled()
        assert [futures[i].result() for i in (0, 1, 2, 4, 5)] == [0, 1, 4, 16, 25]
        assert ex.submit(getpid).result() == pid  # the same worker: nothing was killed


def test_abort_of_a_finished_future_returns_false():
    with DistributedExecutor(max_workers=1) as ex:
        future = ex.submit(square, 4)
        assert future.result() == 16
        assert ex.abort(future) is False
        assert future.result() == 16


def test_abort_rejects_a_foreign_future():
    with DistributedExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="needs a future returned by this executor"):
            ex.abort(Future())


# ----------------------------------------------------------------------------- time limits
def test_time_limit_fails_the_task_with_where_it_was_and_does_not_retry():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        pid = ex.submit(getpid).result()
        future = ex.options(time_limit=0.5).submit(wait_gate, gate.address, "late")
        with pytest.raises(TaskTimeoutError) as info:
            future.result(timeout=30)
        err = info.value
        assert isinstance(err, TimeoutError)
        text = str(err)
        assert "exceeded its time limit of 0.5 s" in text and "wait_gate" in text
        assert "helpers.py" in text  # the line it was stuck at, from the stack dump it sent
        assert wait_for_pid_gone(pid, 10)
        assert gate.arrived == 1  # not retried
        assert ex.submit(square, 5).result() == 25  # a replacement worker serves


def test_time_limit_does_not_touch_tasks_that_finish_in_time():
    with DistributedExecutor(max_workers=2, time_limit=30) as ex:
        pids = set(ex.map(getpid, range(40)))
        assert list(ex.map(square, range(200), chunksize=20)) == [x * x for x in range(200)]
        assert ex.options(time_limit=None).submit(square, 3).result() == 9
        assert set(ex.map(getpid, range(40))) <= pids | {w.pid for w in ex.workers()}
        assert {w.pid for w in ex.workers()} == pids or len(pids) <= 2  # no worker replaced


def test_a_time_limited_task_gets_a_worker_of_its_own():
    # The limit counts from dispatch, so such a task never waits behind another on a worker.
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        assert list(ex.map(square, range(300))) == [x * x for x in range(300)]  # short: batching
        first = ex.submit(wait_gate, gate.address, "a")
        limited = ex.options(time_limit=60).submit(square, 6)
        gate.wait_arrivals(1)
        assert worker_running(ex, limited) is None  # not sent behind the running task
        gate.open()
        assert first.result() == "a" and limited.result() == 36


@pytest.mark.parametrize("kwargs, error", [
    ({"time_limit": 0}, ValueError),
    ({"time_limit": -1.0}, ValueError),
    ({"time_limit": "soon"}, TypeError),
    ({"max_retries": -1}, ValueError),
    ({"max_retries": 1.5}, TypeError),
])
def test_options_are_checked(kwargs, error):
    ex = DistributedExecutor(max_workers=1)
    with pytest.raises(error):
        ex.options(**kwargs)
    with pytest.raises(error):
        DistributedExecutor(max_workers=1, **kwargs)
    ex.shutdown()


def test_options_views_compose():
    with DistributedExecutor(max_workers=1, max_retries=5) as ex:
        view = ex.options(time_limit=10).options(max_retries=0)
        assert (view.time_limit, view.max_retries) == (10.0, 0)
        assert ex.options(max_retries=2).max_retries == 2
        assert list(view.map(square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]
        assert view.submit(square, 9).result() == 81


# ------------------------------------------------------------------ shutdown(cancel_running)
def test_shutdown_cancel_running_returns_promptly_and_stops_everything():
    gate = Gate()
    try:
        ex = DistributedExecutor(max_workers=2)
        running = [ex.submit(wait_gate, gate.address, i) for i in range(2)]
        queued = [ex.submit(wait_gate, gate.address, i) for i in range(2, 8)]
        gate.wait_arrivals(2)
        pids = [w.pid for w in ex.workers()]
        ex.shutdown(wait=True, cancel_running=True)  # the gate is still closed
        assert all(f.cancelled() for f in running + queued)
        assert all(wait_for_pid_gone(pid, 10) for pid in pids)
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            ex.submit(square, 1)
    finally:
        gate.close()
    assert gate.arrived == 2


# ------------------------------------------------------------------------------- Ctrl-C
@contextlib.contextmanager
def interrupt_main_when(is_target):
    """Deliver SIGINT to the main thread at the first profiled event ``is_target`` accepts.

    The hook runs in the main thread, so the interrupt lands exactly there (no race with a
    helper thread); the test then checks what the executor looks like afterwards.
    """
    main = threading.main_thread().ident
    fired: list[str] = []

    def profiler(frame, event, arg):
        if not fired and is_target(frame, event, arg):
            fired.append(f"{event} {frame.f_code.co_name}")
            signal.pthread_kill(main, signal.SIGINT)

    assert threading.current_thread() is threading.main_thread()
    sys.setprofile(profiler)
    try:
        yield fired
    finally:
        sys.setprofile(None)


def waiting_in_result(frame, event, arg):
    return (event == "call" and frame.f_code is threading.Condition.wait.__code__
            and frame.f_back is not None and frame.f_back.f_code.co_name == "result")


def test_ctrl_c_during_result_leaves_the_executor_usable(executor):
    with Gate() as gate:
        future = executor.submit(wait_gate, gate.address, "still running")
        gate.wait_arrivals(1)
        with pytest.raises(KeyboardInterrupt), interrupt_main_when(waiting_in_result) as fired:
            future.result(timeout=60)
        assert fired
        assert not future.done()  # the task itself was not disturbed
        gate.open()
        assert future.result(timeout=30) == "still running"
    assert executor.submit(square, 3).result() == 9
    assert list(executor.map(square, range(20))) == [x * x for x in range(20)]


def test_ctrl_c_while_iterating_map_cancels_the_rest_and_leaves_the_executor_usable(executor):
    with Gate() as gate:
        results = executor.map(wait_gate, [gate.address] * 6, range(6))
        gate.wait_arrivals(2)
        with pytest.raises(KeyboardInterrupt), interrupt_main_when(waiting_in_result) as fired:
            next(results)
        assert fired
        gate.open()
    assert executor.submit(square, 4).result() == 16
    assert list(executor.map(square, range(20))) == [x * x for x in range(20)]


@pytest.mark.parametrize("where", ["entering wake", "sending the wakeup byte"])
def test_ctrl_c_inside_submit_leaves_the_executor_usable(executor, where):
    # The interrupt lands inside Manager.wake(), between queueing the task and waking the
    # manager. Whatever happened to that submit, later ones must still wake the manager.
    assert executor.submit(square, 2).result() == 4  # started

    def in_wake(frame, event, arg):
        if where == "entering wake":
            return event == "call" and frame.f_code is Manager.wake.__code__
        return (event == "c_call" and frame.f_code is Manager.wake.__code__
                and getattr(arg, "__name__", "") == "send")

    for _ in range(3):
        with pytest.raises(KeyboardInterrupt), interrupt_main_when(in_wake) as fired:
            executor.submit(square, 5)
            # Where the signal is checked is CPython's business; reaching here means it was
            # not checked inside submit, so wait for it in an interruptible call.
            threading.Event().wait(30)
        assert fired
        assert executor.submit(square, 7).result(timeout=30) == 49


# ------------------------------------------------------------------------ review regressions
def test_done_callbacks_that_abort_siblings_during_cancel_running_are_safe():
    # "When one finishes, stop the rest": the callback runs while shutdown(cancel_running)
    # is settling futures in the manager thread, and settles a sibling under its feet.
    with Gate() as gate:
        ex = DistributedExecutor(max_workers=1)
        assert list(ex.map(square, range(300))) == [x * x for x in range(300)]  # batching
        first = ex.submit(wait_gate, gate.address, "a")
        second = ex.submit(square, 2)
        gate.wait_arrivals(1)
        answers = []
        first.add_done_callback(lambda _: answers.append(ex.abort(second)))
        ex.shutdown(wait=True, cancel_running=True)
        assert first.cancelled() and second.cancelled()
        assert len(answers) == 1
        assert not ex._broken  # the manager did not crash


def test_time_limit_deadlines_do_not_keep_finished_results_alive():
    import gc
    import weakref

    from helpers import make_box

    with DistributedExecutor(max_workers=1, time_limit=600) as ex:
        future = ex.submit(make_box, 1_000_000)
        ref = weakref.ref(future.result())
        del future
        gc.collect()
        assert ref() is None
