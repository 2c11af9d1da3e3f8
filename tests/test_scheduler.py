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
    w = sched.add_worker(wid, "h", max_tasks)
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


def test_a_result_settles_its_task_and_frees_the_worker():
    # (Stale results are recognised by the dispatch room: tests/test_rooms.py.)
    sched = Scheduler()
    (t,) = make(1, sched)
    ready_worker(sched, 1)
    sched.plan(always)
    assert t.state is TaskState.ASSIGNED and sched.workers[1].state is WorkerState.BUSY
    sched.task_done(t, 0.1, True)
    assert t.state is TaskState.DONE and not sched.tasks
    assert sched.workers[1].state is WorkerState.IDLE and sched.workers[1].tasks_done == 1


def test_lost_worker_requeue_keeps_order_and_bumps_attempt():
    sched = Scheduler()
    tasks = make(4, sched)
    w = ready_worker(sched, 1)
    w.ewma = 1e-6
    sched.plan(always)
    held = sched.worker_lost(1)
    assert [t.id for t in held] == [1, 2, 3, 4]
    sched.end_task(held[0], TaskState.FAILED)
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
    w = sched.add_worker(1, "h", None)
    with pytest.raises(InvalidTransition):
        w.transition(WorkerState.BUSY)


def test_cancel_queued_counts():
    sched = Scheduler()
    make(3, sched)
    out = sched.cancel_queued()
    assert len(out) == 3 and sched.tag_counts()[None][4] == 3 and not sched.tasks


# -- issue 5: priorities, placement, declines, the policy -------------------------------------
from distexec.scheduler import Needs, Policy, Pool  # noqa: E402


def task(i, priority=0, needs=None, time_limit=None):
    return Task(i, Future(), print, (i,), None, time_limit=time_limit, priority=priority,
                needs=Needs(needs) if needs else None)


def pooled_worker(sched, wid, pool):
    w = sched.add_worker(wid, "h", None, pool=pool)
    w.transition(WorkerState.CONNECTED)
    sched.worker_ready(wid)
    return w


def test_policy_takes_highest_priority_then_oldest():
    sched = Scheduler()
    for t in [task(1), task(2, priority=3), task(3, priority=-1), task(4, priority=3), task(5)]:
        sched.add_task(t)
    w = ready_worker(sched, 1)
    w.ewma = 1e-6  # short tasks: it takes them all in one pass
    (_, tasks), = sched.plan(always)
    assert [t.id for t in tasks] == [2, 4, 1, 5, 3]


def test_needs_place_tasks_only_where_the_pool_has_them_free():
    sched = Scheduler()
    gpus = Pool("gpu-host", {"gpu": 1, "zone": "a"}, slots=2)
    plain = Pool("cpu-host", {}, slots=2)
    w1 = pooled_worker(sched, 1, gpus)
    pooled_worker(sched, 2, gpus)
    pooled_worker(sched, 3, plain)
    for t in [task(1, needs={"gpu": 1}), task(2, needs={"gpu": 1}), task(3),
              task(4, needs={"zone": "a"})]:
        sched.add_task(t)
    plan = {w.id: [t.id for t in ts] for w, ts in sched.plan(always)}
    # One gpu: task 1 on a gpu worker, task 2 waits. The other gpu-host worker takes the
    # oldest task that fits it, plain task 3; the cpu-host worker fits neither task 2 (gpu) nor
    # task 4 (zone=a).
    assert plan == {1: [1], 2: [3]}
    assert gpus.used == {"gpu": 1.0}
    assert sorted(t.id for t in sched.queue) == [2, 4]
    assert w1.limited == 1
    # Task 1 ends: the gpu is back, and task 2 can go to the now idle worker 1.
    sched.task_done(sched.tasks[1], 0.1, True)
    assert gpus.used == {"gpu": 0.0}
    assert [(w.id, [t.id for t in ts]) for w, ts in sched.plan(always)] == [(1, [2])]
    # A lost worker gives its resources back too.
    sched.worker_lost(1)
    (t2,) = w1.assigned.values()
    sched.requeue(t2)
    assert gpus.used == {"gpu": 0.0}


def test_slots_count_the_busy_workers_of_a_pool_and_wide_tasks_do_not_starve():
    sched = Scheduler()
    pool = Pool("host", {}, slots=3)
    for i in (1, 2, 3):
        pooled_worker(sched, i, pool)
    sched.add_task(task(1))
    sched.add_task(task(2, needs={"slots": 3}))
    sched.add_task(task(3))
    # Worker 1 takes task 1. The wide task cannot run while a worker is busy, and the others
    # keep their slots free for it rather than taking task 3, ranked below it.
    assert {w.id: [t.id for t in ts] for w, ts in sched.plan(always)} == {1: [1]}
    assert pool.free_slots() == 2
    sched.task_done(sched.tasks[1], 0.1, True)
    (worker, (wide,)), = sched.plan(always)
    assert wide.id == 2 and pool.free_slots() == 0  # one busy worker + two extra slots
    sched.add_task(task(4))
    assert sched.plan(always) == []  # no slot left for a plain task
    sched.task_done(sched.tasks[2], 0.1, True)
    assert pool.slot_extra == 0
    assert sorted(t.id for _, ts in sched.plan(always) for t in ts) == [3, 4]


def test_empty_priority_classes_are_dropped():
    sched = Scheduler()
    for i in range(1, 101):
        sched.add_task(task(i, priority=i))
    assert len(sched.queue.order) == 101
    w = ready_worker(sched, 1)
    w.ewma = 1e-6
    (_, tasks), = sched.plan(always)
    assert [t.id for t in tasks][:3] == [100, 99, 98]
    assert sched.queue.order == [(0, False, ())] and not sched.queue


def test_a_declined_task_never_returns_to_that_worker():
    sched = Scheduler()
    w1 = ready_worker(sched, 1)
    ready_worker(sched, 2)
    sched.add_task(task(1))
    sched.add_task(task(2))
    plan = {w.id: [t.id for t in ts] for w, ts in sched.plan(always)}
    assert plan == {1: [1], 2: [2]}
    t1 = w1.assigned[1]
    assert sched.decline(t1) is True
    assert t1.state is TaskState.QUEUED and t1.declined == {1}
    assert sched.plan(always) == []  # worker 1 is free but declined it; worker 2 is busy
    sched.task_done(sched.tasks[2], 0.1, True)
    assert [(w.id, [t.id for t in ts]) for w, ts in sched.plan(always)] == [(2, [1])]
    assert sched.decline(t1) is False  # now every live worker has declined it
    sched.end_task(t1, TaskState.FAILED)
    assert sched.tag_counts()[None][3] == 1


def test_blocked_tasks_count_as_waiting_and_can_be_cancelled():
    sched = Scheduler()
    t = task(1)
    sched.add_blocked(t)
    assert t.state is TaskState.BLOCKED and not sched.queue
    assert sched.tag_counts() == {None: (1, 0, 0, 0, 0)}
    assert sched.cancel_queued() == [t]
    assert sched.tag_counts() == {None: (0, 0, 0, 0, 1)}
    t2 = task(2)
    sched.add_blocked(t2)
    sched.unblock(t2)
    assert list(sched.queue) == [t2]


def test_the_policy_is_replaceable():
    class Newest(Policy):
        """Last in, first out (plain tasks only): a policy written in a few lines."""

        def pick(self, scheduler, worker):
            queue = scheduler.queue
            for t in reversed(queue.main):
                if scheduler.fits(t, worker):
                    return t
            return None

    sched = Scheduler(Newest())
    make(3, sched)
    w = ready_worker(sched, 1)
    w.ewma = 1e-6
    (_, tasks), = sched.plan(always)
    assert [t.id for t in tasks] == [3, 2, 1]


def test_retry_puts_the_task_at_the_back_and_counts_it():
    sched = Scheduler()
    make(2, sched)
    ready_worker(sched, 1)
    (_, (t1,)), = sched.plan(always)
    sched.retry(t1, 0.1)
    assert [t.id for t in sched.queue] == [2, 1]
    assert t1.errors == 1 and t1.retries_used() == 1 and t1.state is TaskState.QUEUED
