"""Issue 5: shared data (store/retrieve/delete, share() for a common argument sent once per
worker) and nested work (tasks that submit tasks and wait for them). Real worker processes."""

from __future__ import annotations

import itertools
import pickle

import pytest

import distexec
from distexec import DistributedExecutor, TaskCounts, TaskPicklingError, WorkerLostError

from helpers import (
    Gate,
    child_raises,
    children_map,
    fib,
    outside_api,
    parent_gated,
    parent_of_poison,
    read_shared,
    shared_identity,
    square,
    wait_gate,
)

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------- shared data
def test_store_retrieve_delete_from_tasks_and_here():
    with DistributedExecutor(max_workers=2) as ex:
        ex.store("config", {"alpha": 1})
        assert ex.submit(read_shared, "config").result(timeout=30) == {"alpha": 1}
        assert ex.retrieve("config") == {"alpha": 1}
        # Replacing it: every task submitted afterwards sees the new value, on any worker
        # (including those that cached the old one).
        ex.store("config", {"alpha": 2})
        assert [f.result(timeout=30) for f in
                [ex.submit(read_shared, "config") for _ in range(6)]] == [{"alpha": 2}] * 6
        ex.delete("config")
        with pytest.raises(KeyError, match="no shared data named 'config'"):
            ex.submit(read_shared, "config").result(timeout=30)
        with pytest.raises(KeyError):
            ex.retrieve("config")
        with pytest.raises(KeyError):
            ex.delete("config")


def test_bad_shared_data_is_refused_here():
    with DistributedExecutor(max_workers=1) as ex:
        with pytest.raises(TypeError, match="names are strings"):
            ex.store(1, "x")
        with pytest.raises(TaskPicklingError, match="shared data 'lock' could not be pickled"):
            import threading

            ex.store("lock", threading.Lock())
        with pytest.raises(KeyError):
            ex.retrieve("lock")  # nothing was stored
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.store("late", 1)


def test_share_sends_a_common_argument_once_per_worker():
    table = list(range(200_000))
    with DistributedExecutor(max_workers=2) as ex:
        ref = ex.share(table)
        assert len(pickle.dumps(ref)) < 100  # what travels with each task
        rows = list(ex.map(shared_identity, itertools.repeat(ref, 40), range(40)))
        assert [r[2] for r in rows] == list(range(40))
        ids_per_worker: dict[int, set[int]] = {}
        for pid, obj_id, _ in rows:
            ids_per_worker.setdefault(pid, set()).add(obj_id)
        # Each worker got the table once and used the same object for all its tasks.
        assert all(len(ids) == 1 for ids in ids_per_worker.values())
        assert ex.retrieve(ref.name) == table
        ex.delete(ref.name)


def test_task_side_api_outside_a_worker_explains():
    assert all("works inside a task" in m for m in outside_api())
    assert len(outside_api()) == 2


# ---------------------------------------------------------------- nested work
@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_submitting_tasks_and_waiting_do_not_deadlock(workers):
    with DistributedExecutor(max_workers=workers) as ex:
        assert ex.submit(fib, 9).result(timeout=60) == 34
        total = ex.status().total
        assert total.finished == 109 and total.waiting == 0 and total.running == 0


def test_children_take_options_and_show_in_status():
    with DistributedExecutor(max_workers=2) as ex:
        assert ex.submit(children_map, 5).result(timeout=30) == [0, 1, 4, 9, 16]
        assert ex.status().tags["child"] == TaskCounts(finished=5)


def test_a_childs_exception_reaches_the_parent_and_the_caller():
    with DistributedExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="deep problem") as info:
            ex.submit(child_raises, "deep problem").result(timeout=30)
        text = "".join(__import__("traceback").format_exception(info.value))
        assert "raise_value_error" in text and "child_raises" in text


def test_children_of_a_lost_parent_are_cancelled_and_the_retry_submits_them_again(tmp_path):
    with DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        future = ex.submit(parent_gated, gate.address, str(tmp_path / "crashed"))
        # First attempt: the child reaches the gate (or is cancelled while queued), the parent
        # dies. The retry submits a new child. Open the gate once a child waits there.
        gate.wait_arrivals(1)
        gate.open()
        assert future.result(timeout=60) == "child done"
        total = ex.status().total
        assert total.waiting == 0 and total.running == 0
        assert total.finished >= 2  # the parent and at least one child


def test_get_executor_options_are_checked():
    with pytest.raises(TypeError, match="unexpected option 'fallback'"):
        distexec.TaskExecutor(None, {}).options(fallback=print)
    with pytest.raises(TypeError, match="tag of a child task"):
        distexec.TaskExecutor(None, {}).options(tag=object())


def test_waiting_for_a_child_running_elsewhere(tmp_path):
    """A parent whose child was already taken by another worker just waits for it."""
    with DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        def parent(address):
            import distexec

            child = distexec.get_executor().submit(wait_gate, address, "from elsewhere")
            return child.result(timeout=60)  # a timeout: only wait, never run it inline

        future = ex.submit(parent, gate.address)
        gate.wait_arrivals(1)  # the child runs on the other worker
        gate.open()
        assert future.result(timeout=30) == "from elsewhere"


def test_a_child_that_kills_its_worker_fails_its_parent_after_max_retries():
    """With one worker the child runs inside its parent; each crash is charged to both, so the
    parent does not resubmit fresh children for ever."""
    with DistributedExecutor(max_workers=1, max_retries=1) as ex:
        with pytest.raises(WorkerLostError, match="lost, 2 time"):
            ex.submit(parent_of_poison, 7).result(timeout=60)
        assert ex.submit(square, 4).result(timeout=30) == 16
        total = ex.status().total
        assert total.waiting == 0 and total.running == 0
