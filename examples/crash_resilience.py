"""A worker that dies costs its task a retry, not the run.

Run it with::

    python examples/crash_resilience.py

With ProcessPoolExecutor, a worker that dies (a segfault in a C extension, the OOM killer,
``os._exit``) breaks the whole pool: every pending future fails with BrokenProcessPool and the
executor refuses new work. With DistributedExecutor the dead worker is replaced and the task it
was running runs again on another worker. Only a task that keeps killing its workers (a
"poison" task) fails, after ``max_retries`` re-runs, with ``distexec.WorkerLostError`` (also a
BrokenProcessPool, so existing ``except`` clauses still match) listing every attempt.
"""

import math
import os
import tempfile

from distexec import DistributedExecutor, WorkerLostError


def count_primes(limit):
    """Some CPU-bound work (a few milliseconds)."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, math.isqrt(n) + 1)))


def analyse(batch, scratch):
    if batch == 2:
        # A flaky crash: the first attempt dies (like a worker hit by the OOM killer), the
        # retry on a fresh worker succeeds.
        marker = os.path.join(scratch, "crashed-once")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(7)
    if batch == 3:
        # A poison task: it kills every worker it runs on, like a segfault in a C extension.
        os._exit(9)
    return count_primes(20_000 + 1_000 * batch)


with tempfile.TemporaryDirectory() as scratch:
    with DistributedExecutor(max_workers=2, max_retries=2) as ex:
        futures = [ex.submit(analyse, batch, scratch) for batch in range(6)]
        for batch, future in enumerate(futures):
            try:
                print(f"batch {batch}: {future.result()} primes")
            except WorkerLostError as exc:
                print(f"batch {batch}: WorkerLostError after {len(exc.attempts)} attempts:")
                for attempt in exc.attempts:
                    print(f"  {attempt.describe()}")

        # The dead workers were replaced: the executor is still fully usable.
        again = list(ex.map(analyse, [0, 1], [scratch, scratch]))
        print(f"after the crashes the executor still works: {again}")

print("executor shut down cleanly")
