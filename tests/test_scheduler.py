"""The scheduler's pure bookkeeping, tested without processes, sockets or clocks."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from distexec.scheduler import (
    MAX_WINDOW,
    InvalidTransition,
    Scheduler,
    Task,
    TaskState,
    WorkerState,
)

pytestmark = pytest.mark.timeout(10)


def make(n, sched):
    tasks = [Task(i, Future(), print, (i,), None) for i in range(1, n + 1)]
    for t in tasks:
        sched.add_task(t)
    return tasks


def ready_worker(sched, wid, max_tasks=None):
    w = sched.add_worker(wid, "h", max_tasks, now=0.0)
    w.transition(WorkerState.CONNECTED)
    sched.worker_ready(wid)
    return w


def always(_):
    return True


def test_round_robin_one_at_a_time_when_durations_unknown():
    sched = Scheduler()
    make(5, sched)
    ready_worker(sched, 1)
    ready_worker(sched, 2)
    plan = sched.plan(always)
    assert [(w.id, [t.id for t in ts]) for w, ts in plan] == [(1, [1]), (2, [2])]
    assert len(sched.queue) == 3
    assert all(w.state is WorkerState.BUSY for w in sched.workers.values())


def test_short_tasks_open_the_window():
    sched = Scheduler()
    make(2000, sched)
    w = ready_worker(sched, 1)
    w.ewma = 1e-6
    assert w.window == MAX_WINDOW
    (worker, tasks), = sched.plan(always)
    assert len(tasks) == MAX_WINDOW


def test_long_tasks_keep_window_at_one():
    sched = Scheduler()
    w = ready_worker(sched, 1)
    w.ewma = 2.0
    assert w.window == 1


def test_claim_refusal_cancels_task():
    sched = Scheduler()
    t1, t2 = make(2, sched)
    ready_worker(sched, 1)
    plan = sched.plan(lambda t: t.id != 1)
    assert [t.id for _, ts in plan for t in ts] == [2]
    assert t1.state is TaskState.CANCELLED and 1 not in sched.tasks


def test_results_and_stale_results():
    sched = Scheduler()
    (t,) = make(1, sched)
    ready_worker(sched, 1)
    sched.plan(always)
    assert sched.result_arrived(1, t.id, attempt=99, duration=0.1, ok=True) is None  # stale
    assert sched.result_arrived(2, t.id, attempt=1, duration=0.1, ok=True) is None  # wrong worker
    assert sched.result_arrived(1, t.id, attempt=1, duration=0.1, ok=True) is t
    assert t.state is TaskState.DONE and not sched.has_work()
    assert sched.workers[1].state is WorkerState.IDLE
    assert sched.result_arrived(1, t.id, attempt=1, duration=0.1, ok=True) is None  # duplicate


def test_lost_worker_requeue_keeps_order_and_bumps_attempt():
    sched = Scheduler()
    tasks = make(4, sched)
    w = ready_worker(sched, 1)
    w.ewma = 1e-6
    sched.plan(always)
    held = sched.worker_lost(1)
    assert [t.id for t in held] == [1, 2, 3, 4]
    sched.fail_task(held[0])
    for t in reversed(held[1:]):
        sched.requeue(t)
    assert [t.id for t in sched.queue] == [2, 3, 4]
    ready_worker(sched, 2)
    sched.plan(lambda t: pytest.fail("re-queued tasks are not claimed twice"))
    assert tasks[1].attempt == 2 and tasks[1].worker_id == 2


def test_max_tasks_drains_worker():
    sched = Scheduler()
    make(5, sched)
    w = ready_worker(sched, 1, max_tasks=2)
    w.ewma = 1e-6
    (worker, tasks), = sched.plan(always)
    assert len(tasks) == 2 and w.state is WorkerState.DRAINING
    assert sched.plan(always) == []


def test_invalid_transitions_raise():
    sched = Scheduler()
    (t,) = make(1, sched)
    with pytest.raises(InvalidTransition):
        t.transition(TaskState.DONE)
    w = sched.add_worker(1, "h", None, 0.0)
    with pytest.raises(InvalidTransition):
        w.transition(WorkerState.BUSY)


def test_cancel_queued_counts():
    sched = Scheduler()
    make(3, sched)
    out = sched.cancel_queued()
    assert len(out) == 3 and sched.counts()["cancelled"] == 3 and not sched.has_work()
