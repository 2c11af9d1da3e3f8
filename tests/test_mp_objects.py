"""multiprocessing objects, as ProcessPoolExecutor users pass them (distexec.mpobjects).

Real Manager servers, real spawn/forkserver queues, semaphores and shared memory; real worker
processes, replaced after a SIGKILL to show that workers started later inherit them too.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from distexec import DistributedExecutor, TaskPicklingError

pytestmark = pytest.mark.timeout(90)

CONTEXTS = ["spawn", "forkserver"]

# Set by the initializer in each worker (this module is imported there by reference).
_inherited: dict = {}


def put_and_get(q, x):
    q.put(x * 2)
    return x


def update_dict(d, key, value):
    d[key] = value
    return sorted(d.keys())


def set_event(event):
    event.set()
    return event.is_set()


def locked_increment(lock, d):
    with lock:
        d["n"] = d.get("n", 0) + 1
    return True


def keep(**objects):
    _inherited.update(objects)
    if "log_queue" in objects:
        root = logging.getLogger()
        root.addHandler(logging.handlers.QueueHandler(objects["log_queue"]))
        root.setLevel(logging.INFO)


def use_inherited(i):
    objs = _inherited
    with objs["lock"]:
        objs["value"].value += 1
    objs["array"][i] = i * 10
    with objs["sem"]:
        logging.getLogger("distexec-test.task").info("task %d on pid %d", i, os.getpid())
    objs["queue"].put(("done", i))
    objs["event"].wait(30)
    return os.getpid()


def pid_of_worker(_=None):
    return os.getpid()


def flush_and_pid():
    """Flush this worker's queue feeders so that a SIGKILL loses no item and holds no queue lock.

    (multiprocessing's documented hazard: a process killed while it writes to a Queue can leave
    the queue's lock held or its data cut off; a crash loses what was not yet flushed.)
    """
    for name in ("queue", "log_queue"):
        _inherited[name].close()
        _inherited[name].join_thread()
    return os.getpid()


def proxy_from_initargs(x):
    _inherited["shared"][x] = os.getpid()
    return x


@pytest.mark.parametrize("method", [None] + CONTEXTS)
def test_manager_proxies_as_task_arguments(method):
    ctx = multiprocessing.get_context(method)
    with ctx.Manager() as manager:
        q, d, ev, lock = manager.Queue(), manager.dict(), manager.Event(), manager.Lock()
        with DistributedExecutor(max_workers=2) as ex:
            assert sorted(ex.map(put_and_get, [q] * 4, range(4))) == [0, 1, 2, 3]
            assert sorted(q.get(timeout=10) for _ in range(4)) == [0, 2, 4, 6]
            assert ex.submit(update_dict, d, "a", 1).result(timeout=30) == ["a"]
            assert d["a"] == 1
            assert ex.submit(set_event, ev).result(timeout=30) is True
            assert ev.is_set()
            assert all(ex.map(locked_increment, [lock] * 6, [d] * 6))
            assert d["n"] == 6


def test_manager_proxy_in_initargs():
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        shared = manager.dict()
        with DistributedExecutor(max_workers=2, initializer=_keep_shared,
                                 initargs=(shared,)) as ex:
            assert list(ex.map(proxy_from_initargs, range(6))) == list(range(6))
        assert sorted(shared.keys()) == list(range(6))


def _keep_shared(shared):
    _inherited["shared"] = shared


@pytest.mark.parametrize("method", CONTEXTS)
def test_inherited_objects_in_initargs_with_logging_recipe(method):
    """The logging cookbook's recipe plus the usual shared objects, through a worker crash."""
    ctx = multiprocessing.get_context(method)
    log_queue, queue = ctx.Queue(), ctx.Queue()
    event, lock, sem = ctx.Event(), ctx.Lock(), ctx.Semaphore(2)
    value, array = ctx.Value("i", 0), ctx.Array("i", 8)
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    listener = logging.handlers.QueueListener(log_queue, Collect())
    listener.start()
    try:
        kwargs = dict(log_queue=log_queue, queue=queue, event=event, lock=lock, sem=sem,
                      value=value, array=array)
        # One worker, so that the second round must run on its replacement.
        with DistributedExecutor(max_workers=1, initializer=_keep_kwargs,
                                 initargs=(kwargs,)) as ex:
            event.set()
            first = set(ex.map(use_inherited, range(4)))
            got = [queue.get(timeout=10) for _ in range(4)]
            # A worker started later (a replacement for a killed one) inherits them too.
            victim = ex.submit(flush_and_pid).result(timeout=30)
            os.kill(victim, signal.SIGKILL)
            more = set(ex.map(use_inherited, range(4, 8)))
            assert first == {victim} and len(more) == 1 and victim not in more
        got += [queue.get(timeout=10) for _ in range(4)]
        assert sorted(got) == [("done", i) for i in range(8)]
        assert value.value == 8
        assert list(array) == [i * 10 for i in range(8)]
    finally:
        listener.stop()
    messages = sorted(r.getMessage().split(" on pid")[0] for r in records)
    assert messages == sorted(f"task {i}" for i in range(8)), messages


def _keep_kwargs(kwargs):
    keep(**kwargs)


def test_fork_context_objects_are_refused_at_once():
    ctx = multiprocessing.get_context("fork")
    with pytest.raises(TaskPicklingError) as info:
        DistributedExecutor(max_workers=1, initializer=_keep_shared, initargs=(ctx.Lock(),))
    text = str(info.value)
    assert "'fork' context" in text and "get_context('spawn')" in text, text


def test_inheritance_only_object_as_argument_fails_its_future_only():
    queue = multiprocessing.get_context("spawn").Queue()
    with DistributedExecutor(max_workers=1) as ex:
        future = ex.submit(put_and_get, queue, 1)
        with pytest.raises(TaskPicklingError) as info:
            future.result(timeout=30)
        assert ex.submit(pow, 2, 5).result(timeout=30) == 32  # the executor is unaffected
    text = str(info.value)
    assert "through inheritance" in text and "initargs=" in text and "Manager()" in text, text


def test_inherited_objects_cannot_go_to_remote_workers():
    queue = multiprocessing.get_context("spawn").Queue()
    with pytest.raises(TaskPicklingError, match="SSH hosts"):
        DistributedExecutor(hosts=["127.0.0.1 slots=1"], initializer=_keep_shared,
                            initargs=(queue,))
    with pytest.raises(TaskPicklingError, match=r"workers started by hand \(listen=...\)") as info:
        DistributedExecutor(max_workers=1, listen="127.0.0.1:0", initializer=_keep_shared,
                            initargs=(queue,))
    assert "multiprocessing.queues.Queue" in str(info.value)


def test_proxy_argument_for_a_hand_started_worker_fails_at_once(hand_workers):
    with multiprocessing.get_context("spawn").Manager() as manager:
        q = manager.Queue()
        ex = DistributedExecutor(max_workers=0, listen="127.0.0.1:0").start()
        try:
            hand_workers(ex, 1)
            assert ex.wait_for_workers(1, timeout=30) == 1
            future = ex.submit(put_and_get, q, 1)
            with pytest.raises(TaskPicklingError) as info:
                future.result(timeout=30)
            assert ex.submit(pow, 3, 2).result(timeout=30) == 9
        finally:
            ex.shutdown(cancel_futures=True)
    text = str(info.value)
    assert "proxy of a multiprocessing manager" in text, text
    assert "not a worker this executor started on this machine" in text, text


MAIN_SCRIPT = textwrap.dedent('''\
    import multiprocessing, sys
    from distexec import DistributedExecutor

    progress = None          # a placeholder the initializer rebinds
    settings = {}            # filled in place by the initializer
    N = 10

    def init(q, name):
        global progress
        progress = q
        settings["name"] = name

    def work(x):
        progress.put(x)
        return settings["name"], x * N

    if __name__ == "__main__":
        q = multiprocessing.get_context("spawn").Queue()
        with DistributedExecutor(max_workers=2, initializer=init, initargs=(q, "w")) as ex:
            print(sorted(ex.map(work, range(3))))
            N = 20           # rebound here: later functions carry the new value
            print(ex.submit(lambda x: work(x), 1).result())
        print(sorted(q.get(timeout=10) for _ in range(4)))
''')


def test_globals_set_by_the_initializer_reach_tasks_in_main(tmp_path, python_env):
    script = tmp_path / "main_globals.py"
    script.write_text(MAIN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=python_env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[('w', 0), ('w', 10), ('w', 20)]",
        "('w', 20)",
        "[0, 1, 1, 2]",
    ], proc.stdout + proc.stderr
