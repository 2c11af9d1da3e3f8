"""The task manager's toolbox in one script: tags, options, placement, dependencies, shared
data, nested work, barriers and status.

Run it with::

    python examples/toolbox.py

Every feature here goes through ``ex.options(...)`` or a method of the executor; plain
``submit`` and ``map`` stay exactly the standard ones. See docs/toolbox.md.
"""

import itertools
import os
import subprocess
import sys
import tempfile

import distexec
from distexec import DependencyError, DistributedExecutor


def word_count(text):
    return len(text.split())


def flaky_download(url, scratch):
    """Fails twice with ConnectionError (counted in a scratch file), then succeeds."""
    marker = os.path.join(scratch, url.replace("/", "_"))
    with open(marker, "a") as fh:
        fh.write(".")
    if os.path.getsize(marker) < 3:
        raise ConnectionError(f"{url}: connection reset")
    return f"<contents of {url}>"


def always_down(url):
    raise ConnectionError(f"{url}: host unreachable")


def from_cache(exc, url):
    """A fallback: runs once every attempt failed, with the last exception."""
    return f"<cached copy of {url}, after {type(exc).__name__}>"


def gpu_job(i):
    worker = distexec.current_worker()
    return f"job {i} ran with gpu={worker.resources['gpu']:g}"


def only_even_workers(x):
    """Decline workers with an odd id: the task goes back to the queue for another one."""
    if distexec.current_worker().worker_id % 2:
        distexec.decline("odd worker ids are not good enough")
    return x * 10


def load(n):
    return list(range(n))


def total(values, weights):
    return sum(v * w for v, w in zip(values, weights, strict=True))


def lookup(table, key):
    """``table`` arrives as the shared object itself, sent once to each worker."""
    return table[key]


def scale(key):
    return distexec.retrieve("factor") * key


def tree_sum(lo, hi):
    """Divide and conquer with child tasks: each call submits two halves and waits for them.
    Waiting never deadlocks, even with two workers: a child not yet started runs inline."""
    if hi - lo <= 4:
        return sum(range(lo, hi))
    mid = (lo + hi) // 2
    ex = distexec.get_executor()
    left, right = ex.submit(tree_sum, lo, mid), ex.submit(tree_sum, mid, hi)
    return left.result() + right.result()


def main():
    scratch = tempfile.mkdtemp()
    name = f"toolbox-example-{os.getpid()}"
    with DistributedExecutor(max_workers=2, resources={"gpu": 1}, name=name) as ex:
        # Tags: submit under a tag, collect results per tag as they finish.
        texts = ["a b c", "d e", "f g h i"]
        for text in texts:
            ex.options(tag="count").submit(word_count, text)
        counts = sorted(ex.next_result("count") for _ in texts)
        print(f"tags: word counts collected by tag: {counts}")

        # Retries on a chosen exception, and a fallback when every attempt failed.
        retry = ex.options(retry_on=ConnectionError, max_retries=3, fallback=from_cache)
        print(f"retry_on: {retry.submit(flaky_download, 'example.org/a', scratch).result()}")
        print(f"fallback: {retry.submit(always_down, 'example.org/b').result()}")

        # Priorities: the high-priority task is dispatched before the queue of low ones.
        low = [ex.options(priority=-1).submit(word_count, "x y") for _ in range(4)]
        high = ex.options(priority=10).submit(word_count, "urgent task")
        print(f"priority: urgent result {high.result()}, then {sum(f.result() for f in low)}")

        # Resources: the local workers share one "gpu"; gpu tasks take turns on it.
        gpu = ex.options(resources={"gpu": 1})
        for line in gpu.map(gpu_job, range(2)):
            print(f"resources: {line}")

        # Declining a worker at run time.
        ex.wait_for_workers(2, timeout=60)
        print(f"decline: {ex.submit(only_even_workers, 4).result()}")

        # Dependencies: futures as arguments are resolved by the task manager.
        values = ex.submit(load, 4)
        weights = ex.submit(load, 4)
        print(f"dependencies: total = {ex.submit(total, values, weights).result()}")
        broken = ex.submit(always_down, "example.org/c")
        try:
            ex.submit(total, broken, weights).result()
        except DependencyError as exc:
            print(f"dependencies: {type(exc).__name__}, caused by "
                  f"{type(exc.__cause__).__name__}")

        # Shared data: a named store, and a large common argument sent once per worker.
        ex.store("factor", 3)
        print(f"store: {list(ex.map(scale, [1, 2, 3]))}")
        table = ex.share({k: k * k for k in range(100_000)})
        print(f"share: {list(ex.map(lookup, itertools.repeat(table), [3, 300, 3000]))}")

        # Nested work.
        print(f"nested: tree_sum(0, 64) = {ex.submit(tree_sum, 0, 64).result()}")

        # Barriers and status.
        for text in texts:
            ex.options(tag="late").submit(word_count, text)
        ex.wait_for_all(timeout=60)
        status = ex.status()
        print(f"status: tag 'late' {tuple(status.tags['late'])}, "
              f"{len(status.workers)} workers")

        # The same statistics from another process: `distexec status NAME`.
        report = subprocess.run([sys.executable, "-m", "distexec.cli", "status", name],
                                capture_output=True, text=True, timeout=30)
        first = report.stdout.splitlines()[0] if report.stdout else report.stderr.strip()
        print(f"distexec status: exit {report.returncode}, "
              f"{'names the executor' if name in first else first}")
    print("executor shut down cleanly")


if __name__ == "__main__":
    main()
