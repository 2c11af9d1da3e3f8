"""DistributedExecutor as a drop-in replacement for ProcessPoolExecutor.

Run it with::

    python examples/dropin.py

The code below is what you would write for ``concurrent.futures.ProcessPoolExecutor``; only the
import line changed. Unlike ProcessPoolExecutor with the "spawn" start method, no
``if __name__ == "__main__":`` guard is needed: workers are fresh interpreters that never
re-import this script, and functions defined here (lambdas included) travel by value.
"""

import math
import os
import time
import traceback
from concurrent.futures import as_completed

# from concurrent.futures import ProcessPoolExecutor as Executor
from distexec import DistributedExecutor as Executor


def count_primes(limit):
    """CPU-bound work: the number of primes below ``limit`` (plain trial division)."""
    count = 0
    for n in range(2, limit):
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            count += 1
    return count


def mean(values):
    """Raises ZeroDivisionError on an empty list, in the worker."""
    return sum(values) / len(values)


started = time.perf_counter()

with Executor(max_workers=4) as ex:
    # 1. map: results come back in input order.
    limits = [10_000, 20_000, 30_000, 40_000]
    for limit, primes in zip(limits, ex.map(count_primes, limits)):
        print(f"map: {primes} primes below {limit}")

    # 2. submit + as_completed: results come back as they finish.
    futures = {ex.submit(count_primes, limit): limit for limit in (50_000, 5_000)}
    for future in as_completed(futures):
        print(f"as_completed: {future.result()} primes below {futures[future]}")

    # 3. A lambda, which ProcessPoolExecutor cannot pickle.
    squares = list(ex.map(lambda x: x * x, range(10)))
    print(f"lambda: squares = {squares}")

    # 4. A remote exception is re-raised here with its original type.
    try:
        ex.submit(mean, []).result()
    except ZeroDivisionError as exc:
        # The traceback includes the frames that ran in the worker.
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"remote exception: {type(exc).__name__}: {exc}")
        print(f"  raised in {frame.name}() at {os.path.basename(frame.filename)}:{frame.lineno}")
        for note in getattr(exc, "__notes__", []):
            print(f"  {note}")

print(f"done in {time.perf_counter() - started:.1f}s")
