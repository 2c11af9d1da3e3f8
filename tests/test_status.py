"""Tags and status(): task counts per tag and what each worker is doing (issue 5, first part)."""

from __future__ import annotations

import pytest

from distexec import DistributedExecutor, ExecutorStatus, TaskCounts

from helpers import Gate, raise_value_error, square, wait_gate

pytestmark = pytest.mark.timeout(60)


def test_counts_per_tag_follow_the_tasks():
    with DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        assert ex.status().total == TaskCounts()  # not started yet: nothing counted
        fits = ex.options(tag="fit")
        running = [fits.submit(wait_gate, gate.address, i) for i in range(2)]
        gate.wait_arrivals(2)  # both workers busy
        waiting = [fits.submit(square, i) for i in range(3)]
        plain = ex.submit(square, 5)
        status = ex.status()
        assert isinstance(status, ExecutorStatus)
        assert status.tags["fit"] == TaskCounts(waiting=3, running=2)
        assert status.tags[None] == TaskCounts(waiting=1)
        assert status.total == TaskCounts(waiting=4, running=2)
        assert sorted(w.running for w in status.workers) == sorted(
            f._distexec_task_id for f in running)
        gate.open()
        assert [f.result() for f in running] == [0, 1]
        assert [f.result() for f in waiting] == [0, 1, 4]
        assert plain.result() == 25
        with pytest.raises(ValueError):
            ex.options(tag="bad").submit(raise_value_error, "no").result()
        status = ex.status()
        assert status.tags["fit"] == TaskCounts(finished=5)
        assert status.tags["bad"] == TaskCounts(failed=1)
        assert status.tags[None] == TaskCounts(finished=1)


def test_cancelled_and_mapped_tasks_are_counted_under_their_tag():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        blocker = ex.options(tag=("batch", 1)).submit(wait_gate, gate.address, "x")
        gate.wait_arrivals(1)
        later = ex.options(tag=("batch", 1)).submit(square, 3)
        assert later.cancel()
        gate.open()
        assert blocker.result() == "x"
        assert list(ex.options(tag="m").map(square, range(10), chunksize=3)) == [
            x * x for x in range(10)]
        status = ex.status()
        assert status.tags[("batch", 1)] == TaskCounts(finished=1, cancelled=1)
        assert status.tags["m"] == TaskCounts(finished=4)  # 4 chunks


def test_tags_must_be_hashable():
    ex = DistributedExecutor(max_workers=1)
    with pytest.raises(TypeError):
        ex.options(tag=["not", "hashable"])
    assert ex.options(tag="a").options(max_retries=1).tag == "a"
    ex.shutdown()


def test_wait_for_all_and_barrier():
    with DistributedExecutor(max_workers=2) as ex, Gate() as gate:
        ex.wait_for_all()  # nothing submitted (not even started): returns at once
        gated = [ex.submit(wait_gate, gate.address, i) for i in range(2)]
        quick = [ex.submit(square, i) for i in range(20)]
        gate.wait_arrivals(2)
        with pytest.raises(TimeoutError, match="still pending"):
            ex.wait_for_all(timeout=0.3)
        with pytest.raises(TimeoutError, match="2 future"):
            ex.barrier(gated, timeout=0.3)
        gate.open()
        ex.barrier(gated, timeout=30)
        assert all(f.done() for f in gated)
        ex.wait_for_all(timeout=30)
        assert all(f.done() for f in quick)
        assert [f.result() for f in quick] == [i * i for i in range(20)]
        ex.barrier(timeout=30)  # no futures: everything submitted so far
