"""What the task manager's toolbox costs and saves (issue 5), against ProcessPoolExecutor.

Usage::

    python benchmarks/toolbox.py            # a minute or two
    python benchmarks/toolbox.py --quick    # smoke run

Cases (2 workers each, medians over ``--repeat`` repetitions that alternate which executor
goes first; every executor is warmed up before it is timed):

* ``common-arg``: 64 tasks that each need the same 16 MiB ``bytes`` object. ProcessPoolExecutor
  and plain ``submit`` send it with every task; ``ex.share()`` sends it once per worker (the
  timing includes ``share()`` itself, the workers' fetches and ``delete()``).
* ``options``: 20,000 no-op tasks through ``submit`` versus ``ex.options(tag=...).submit``
  (tagged, with a priority): what the options path costs per task.
* ``dependency``: a chain of 500 tasks, each taking the previous future as its argument (the
  task manager resolves it), versus the caller waiting for each result and submitting the
  next (the only way with ProcessPoolExecutor).
* ``nested``: ``fib(14)`` as child tasks (1,219 tasks that submit and wait for children) on
  2 workers; tasks per second. ProcessPoolExecutor has no equivalent (its workers cannot
  submit work), so this one is reported alone.

The plain ``submit``/``map`` figures against ProcessPoolExecutor are in ``bench.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait

MiB = 1024 * 1024


def size_of(blob, i):
    return len(blob) + i


def noop(*args):
    return None


def inc(x):
    return x + 1


def fib(n):
    if n < 2:
        return n
    import distexec

    ex = distexec.get_executor()
    a, b = ex.submit(fib, n - 1), ex.submit(fib, n - 2)
    return a.result() + b.result()


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def case_common_arg(executors, n, nbytes):
    blob = b"x" * nbytes

    def plain(ex):
        return lambda: wait([ex.submit(size_of, blob, i) for i in range(n)])

    def shared():
        # Timed from scratch each time: share() pickles the blob, each worker fetches it once.
        ex = executors["distexec"]
        ref = ex.share(blob)
        wait([ex.submit(size_of, ref, i) for i in range(n)])
        ex.delete(ref.name)

    return {"ppe": plain(executors["ppe"]), "distexec": plain(executors["distexec"]),
            "distexec share()": shared}


def case_options(executors, n):
    ex = executors["distexec"]
    tagged = ex.options(tag="bench", priority=1)
    return {"distexec submit": lambda: wait([ex.submit(noop, i) for i in range(n)]),
            "distexec options().submit": lambda: wait([tagged.submit(noop, i)
                                                       for i in range(n)])}


def case_dependency(executors, n):
    def chained(ex):
        def run():
            future = ex.submit(inc, 0)
            for _ in range(n - 1):
                future = ex.submit(inc, future)
            assert future.result() == n
        return run

    def waited(ex):
        def run():
            value = 0
            for _ in range(n):
                value = ex.submit(inc, value).result()
            assert value == n
        return run

    return {"ppe (caller waits)": waited(executors["ppe"]),
            "distexec (caller waits)": waited(executors["distexec"]),
            "distexec (future as argument)": chained(executors["distexec"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    repeat = 2 if args.quick else args.repeat
    scale = 0.1 if args.quick else 1.0
    from distexec import DistributedExecutor

    import multiprocessing as mp

    executors = {"distexec": DistributedExecutor(max_workers=2),
                 "ppe": ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"))}
    try:
        for ex in executors.values():  # warm up: workers started, functions imported
            wait([ex.submit(noop, i) for i in range(200)])
        cases = {
            "common-arg (64 x 16 MiB), s": case_common_arg(
                executors, max(8, int(64 * scale)), 16 * MiB),
            "options (20,000 no-ops), s": case_options(executors, int(20_000 * scale)),
            "dependency chain (500), s": case_dependency(executors, max(20, int(500 * scale))),
        }
        print(f"python {sys.version.split()[0]}, 2 workers, medians of {repeat}")
        for title, variants in cases.items():
            for fn in variants.values():  # untimed warm-up pass
                fn()
            times: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for rep in range(repeat):
                for name in names if rep % 2 == 0 else reversed(names):
                    times[name].append(timed(variants[name]))
            medians = {name: statistics.median(v) for name, v in times.items()}
            base = next(iter(medians.values()))
            print(f"\n{title}")
            for name, value in medians.items():
                print(f"  {name:32} {value:9.4f}   x{base / value:5.2f} vs {names[0]}")
        ex = executors["distexec"]
        n = 11 if args.quick else 14
        rates = []
        for _ in range(repeat):
            before = ex.status().total.finished
            seconds = timed(lambda: ex.submit(fib, n).result())
            rates.append((ex.status().total.finished - before) / seconds)
        print(f"\nnested fib({n}): {statistics.median(rates):,.0f} tasks/s "
              f"(each task above the leaves submits two children and waits for them)")
    finally:
        for ex in executors.values():
            ex.shutdown(cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
