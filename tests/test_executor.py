"""The concurrent.futures contract, exercised with real worker processes."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import os
import pickle

import pytest

import distexec
from distexec import BrokenDistributedExecutor, DistributedExecutor, TaskPicklingError
from helpers import (
    Gate,
    add,
    getpid,
    identity,
    init_fail,
    init_read,
    init_store,
    square,
    wait_gate,
)

pytestmark = pytest.mark.timeout(60)


def test_submit_returns_real_future(executor):
    future = executor.submit(add, 2, b=3)
    assert isinstance(future, cf.Future)
    assert future.result() == 5


def test_is_an_executor():
    assert issubclass(DistributedExecutor, cf.Executor)


def test_builtins_and_lambdas(executor):
    assert executor.submit(pow, 2, 10).result() == 1024
    assert executor.submit(lambda x: x + 1, 41).result() == 42
    offset = 7
    assert executor.submit(lambda x: x + offset, 1).result() == 8


def test_map_matches_builtin_map(executor):
    assert list(executor.map(square, range(50))) == [x * x for x in range(50)]
    assert list(executor.map(add, range(5), range(10, 20))) == [a + b for a, b in zip(range(5), range(10, 20))]


@pytest.mark.parametrize("chunksize", [1, 2, 7, 100, 1000])
def test_map_chunksize(executor, chunksize):
    assert list(executor.map(square, range(333), chunksize=chunksize)) == [x * x for x in range(333)]


def test_map_bad_arguments(executor):
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(square, range(3), chunksize=0)
    with pytest.raises(ValueError, match="buffersize"):
        executor.map(square, range(3), buffersize=0)
    with pytest.raises(TypeError, match="buffersize"):
        executor.map(square, range(3), buffersize=2.0)


def test_map_exception_raised_at_its_position(executor):
    results = executor.map(lambda x: 1 // x, [1, 1, 0, 1])
    assert next(results) == 1
    assert next(results) == 1
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout(executor):
    with Gate() as gate:
        results = executor.map(wait_gate, [gate.address], timeout=0.2)
        with pytest.raises(cf.TimeoutError):
            next(results)
        gate.open()


def test_map_buffersize_reads_lazily(executor):
    pulled = []

    def source():
        for i in itertools.count():
            pulled.append(i)
            yield i

    results = executor.map(square, source(), buffersize=4)
    assert len(pulled) == 4  # only the buffer was submitted
    first = list(itertools.islice(results, 10))
    assert first == [x * x for x in range(10)]
    assert len(pulled) <= 10 + 4
    results.close()


def test_map_buffersize_with_chunks(executor):
    results = executor.map(square, itertools.count(), chunksize=5, buffersize=2)
    assert list(itertools.islice(results, 23)) == [x * x for x in range(23)]
    results.close()


def test_submit_after_shutdown_raises():
    ex = DistributedExecutor(max_workers=1)
    assert ex.submit(square, 3).result() == 9
    ex.shutdown()
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.submit(square, 3)
    ex.shutdown()  # idempotent


def test_shutdown_before_use_is_harmless():
    ex = DistributedExecutor(max_workers=1)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        DistributedExecutor(max_workers=bad)


def test_max_workers_defaults_to_cpu_count():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert DistributedExecutor().max_workers == expected


def test_context_manager_returns_executor_and_waits():
    with DistributedExecutor(max_workers=2) as ex:
        assert isinstance(ex, DistributedExecutor)
        futures = [ex.submit(square, i) for i in range(20)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(20)]


def test_wait_and_as_completed(executor):
    futures = [executor.submit(square, i) for i in range(10)]
    done, not_done = cf.wait(futures, return_when=cf.ALL_COMPLETED)
    assert len(done) == 10 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures)) == [i * i for i in range(10)]


def test_wait_first_completed(executor):
    with Gate() as gate:
        blocked = executor.submit(wait_gate, gate.address)
        quick = executor.submit(square, 3)
        done, not_done = cf.wait([blocked, quick], return_when=cf.FIRST_COMPLETED)
        assert quick in done and blocked in not_done
        gate.open()
        assert blocked.result() is None


def test_asyncio_integration(executor):
    async def main():
        loop = asyncio.get_running_loop()
        a = await loop.run_in_executor(executor, square, 6)
        b = await asyncio.wrap_future(executor.submit(add, 1, 2))
        return a, b

    assert asyncio.run(main()) == (36, 3)


def test_cancel_queued_future():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        running = ex.submit(wait_gate, gate.address)
        gate.wait_arrivals(1)
        queued = [ex.submit(square, i) for i in range(5)]
        assert not running.cancel()  # running: standard semantics
        assert all(f.cancel() for f in queued)
        gate.open()
        assert running.result() is None
    assert all(f.cancelled() for f in queued)


def test_shutdown_cancel_futures():
    ex = DistributedExecutor(max_workers=1)
    with Gate() as gate:
        running = ex.submit(wait_gate, gate.address, "ran")
        gate.wait_arrivals(1)
        queued = [ex.submit(square, i) for i in range(5)]
        ex.shutdown(wait=False, cancel_futures=True)
        gate.open()  # only now can the worker take another task: none is left
        ex.shutdown(wait=True)
    assert running.result() == "ran"
    assert all(f.cancelled() for f in queued)


def test_shutdown_no_wait_finishes_work_in_background():
    ex = DistributedExecutor(max_workers=1)
    with Gate() as gate:
        future = ex.submit(wait_gate, gate.address, 5)
        gate.wait_arrivals(1)
        ex.shutdown(wait=False)
        assert not future.done()
        gate.open()
        assert future.result(timeout=30) == 5


def test_initializer_runs_in_each_worker():
    with DistributedExecutor(max_workers=2, initializer=init_store, initargs=("hello",)) as ex:
        assert set(ex.map(lambda _: init_read(), range(10))) == {"hello"}


def test_failing_initializer_breaks_executor():
    ex = DistributedExecutor(max_workers=2, initializer=init_fail)
    future = ex.submit(square, 2)
    with pytest.raises(cf.BrokenExecutor) as info:
        future.result()
    assert isinstance(info.value, BrokenDistributedExecutor)
    assert "initializer" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    assert "error in initializer" in str(info.value.__cause__)
    with pytest.raises(BrokenDistributedExecutor, match="initializer"):
        ex.submit(square, 2)
    assert ex._broken
    ex.shutdown()


def test_unpicklable_initializer_is_refused_at_construction():
    import threading

    with pytest.raises(TaskPicklingError, match="initializer"):
        DistributedExecutor(initializer=init_store, initargs=(threading.Lock(),))


def test_bad_initializer_type():
    with pytest.raises(TypeError):
        DistributedExecutor(initializer=42)


@pytest.mark.parametrize("bad", [0, -3])
def test_max_tasks_per_child_validated(bad):
    with pytest.raises(ValueError):
        DistributedExecutor(max_tasks_per_child=bad)


def test_max_tasks_per_child_replaces_workers():
    with DistributedExecutor(max_workers=1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(getpid).result() for _ in range(6)]
    assert len(set(pids)) == 3
    assert all(pids.count(p) == 2 for p in set(pids))


def test_max_tasks_per_child_with_map():
    with DistributedExecutor(max_workers=2, max_tasks_per_child=3) as ex:
        assert list(ex.map(square, range(40))) == [x * x for x in range(40)]


def test_many_tasks(executor):
    futures = [executor.submit(square, i) for i in range(5000)]
    assert [f.result() for f in futures] == [i * i for i in range(5000)]


def test_large_numpy_round_trip(executor):
    np = pytest.importorskip("numpy")
    array = np.arange(4 * 1024 * 1024, dtype=np.float64)
    back = executor.submit(identity, array).result()
    assert back.dtype == array.dtype and np.array_equal(back, array)
    blob = os.urandom(3 * 1024 * 1024)
    assert executor.submit(identity, blob).result() == blob


def test_executor_works_from_many_threads(executor):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as threads:
        results = list(threads.map(lambda i: executor.submit(square, i).result(), range(200)))
    assert results == [i * i for i in range(200)]


def test_public_names():
    for name in distexec.__all__:
        assert getattr(distexec, name) is not None
    assert issubclass(distexec.TaskPicklingError, pickle.PicklingError)
    assert issubclass(distexec.BrokenDistributedExecutor, cf.BrokenExecutor)


class _Obj:
    pass


def _make_obj(_):
    return _Obj()


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_does_not_keep_yielded_results_alive(executor, chunksize):
    import gc
    import weakref

    for obj in executor.map(_make_obj, range(4), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_quick_result_not_held_behind_a_long_task():
    # Short tasks get batched; a finished one must not wait for a long one sent with it.
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        for _ in range(50):
            ex.submit(int).result()  # the worker now counts tasks as short and batches them
        quick = ex.submit(square, 5)
        slow = ex.submit(wait_gate, gate.address)
        assert quick.result(timeout=20) == 25  # returned while slow still blocks
        assert not slow.done()
        gate.open()
        assert slow.result() is None


class _CountsPickling:
    pickled = 0

    def __reduce__(self):
        type(self).pickled += 1
        return (_CountsPickling, ())


def test_function_is_pickled_once_not_per_task(executor):
    marker = _CountsPickling()

    def task(x):
        return (marker is not None) and x  # closes over marker: pickling fn pickles marker

    assert list(executor.map(task, range(300))) == list(range(300))
    assert executor.submit(task, 5).result() == 5
    assert _CountsPickling.pickled == 1
