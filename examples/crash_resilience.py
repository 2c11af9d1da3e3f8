"""A worker that dies fails only its own task; the executor replaces it and keeps working.

Run it with::

    python examples/crash_resilience.py

With ProcessPoolExecutor, a worker that dies (a segfault in a C extension, the OOM killer,
``os._exit``) breaks the whole pool: every pending future fails with BrokenProcessPool and the
executor refuses new work. With DistributedExecutor only the task that was running on the dead
worker fails, with ``distexec.WorkerLostError`` (which is also a BrokenProcessPool, so existing
``except`` clauses still match), and the dead worker is replaced by a fresh one.
"""

import math
import os

from distexec import DistributedExecutor, WorkerLostError


def count_primes(limit):
    """Some CPU-bound work (a few milliseconds)."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, math.isqrt(n) + 1)))


def analyse(batch):
    if batch == 3:
        # Simulate a hard crash, like a segfault in a C extension: no exception, no cleanup,
        # the worker process just dies.
        os._exit(7)
    return count_primes(20_000 + 1_000 * batch)


with DistributedExecutor(max_workers=2) as ex:
    futures = [ex.submit(analyse, batch) for batch in range(6)]
    for batch, future in enumerate(futures):
        try:
            print(f"batch {batch}: {future.result()} primes")
        except WorkerLostError as exc:
            print(f"batch {batch}: WorkerLostError, worker exit code {exc.exitcode}")
            print(f"  {exc}")

    # The dead worker was replaced: the executor is still fully usable.
    again = list(ex.map(analyse, [0, 1]))
    print(f"after the crash the executor still works: {again}")

print("executor shut down cleanly")
