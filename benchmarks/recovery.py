"""What a lost worker costs: distexec against ProcessPoolExecutor (spawn), 2 workers each.

Usage::

    python benchmarks/recovery.py              # about a minute
    python benchmarks/recovery.py --repeat 3 --json recovery.json

Cases (medians over the repetitions):

crash
    A batch of N tasks of about 1 ms, one of which SIGKILLs its own worker on its first attempt.
    distexec: wall time of the whole batch, how many futures failed (expected: none) and the
    same batch without the crash for comparison. ProcessPoolExecutor: how many futures of the
    batch failed with BrokenProcessPool, and whether the executor still accepts work.
chaos
    N tasks of about 1 ms while a busy worker is SIGKILLed every N/20 completions (progress
    driven, no timers): throughput relative to the same run without kills, and every result
    checked. ProcessPoolExecutor cannot run this case: its first kill breaks it.
kills
    N tasks of about 1 ms (10,000 by default: ``--kill-n``) while a timer SIGKILLs a random
    live worker every 100 ms and every 500 ms, whatever it is doing (starting, idle, busy):
    futures completed and failed, re-executions (tasks re-run because their worker died under
    them, counted from the executor's log) and wall time against the same run without kills.
    Before 0.6 a kill every 100 ms broke the executor (kills during start-up counted as failed
    starts).
freeze
    A worker running a task is stopped with SIGSTOP; the time until the task has started again
    on another worker (heartbeat_timeout 1 s and 2 s). The expected value is about the timeout.
    ProcessPoolExecutor has no heartbeat: it waits forever.
gil
    A task holds the GIL in a C call for 3 x heartbeat_timeout (0.5 s): the worker must not be
    declared lost (reported as the number of losses, expected 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


# --------------------------------------------------------------------------- task functions
def spin(x, crash_marker=None):
    """About a millisecond of CPU; with a marker path, the first attempt kills its worker."""
    if crash_marker is not None and not os.path.exists(crash_marker):
        with open(crash_marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.perf_counter() + 0.001
    while time.perf_counter() < deadline:
        pass
    return x


def wait_on(port):
    """Report in to the benchmark, then wait until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(str(os.getpid()).encode() + b"\n")
        while conn.recv(1):
            pass
    return os.getpid()


def hold_gil(seconds):
    import ctypes

    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))
    return os.getpid()


def _tasks():
    # Import this file as a module so that both executors pickle the functions by reference.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import recovery

    return recovery


class _Counter(logging.Handler):
    """Counts distexec log messages containing a text."""

    def __init__(self, text):
        super().__init__()
        self.text = text
        self.count = 0

    def emit(self, record):
        if self.text in record.getMessage():
            self.count += 1


# --------------------------------------------------------------------------- cases
def case_crash(n, scratch, rep):
    from distexec import DistributedExecutor

    t = _tasks()
    out = {}
    marker = os.path.join(scratch, f"crash-{rep}")
    with DistributedExecutor(max_workers=2) as ex:
        ex.wait_for_workers(2, timeout=60)
        list(ex.map(t.spin, range(50)))
        start = time.perf_counter()
        futures = [ex.submit(t.spin, i, marker if i == n // 2 else None) for i in range(n)]
        failed = sum(1 for f in futures if f.exception(timeout=600) is not None)
        out["distexec_with_crash_s"] = time.perf_counter() - start
        out["distexec_failed"] = failed
        start = time.perf_counter()
        futures = [ex.submit(t.spin, i) for i in range(n)]
        assert all(f.result(timeout=600) == i for i, f in enumerate(futures))
        out["distexec_no_crash_s"] = time.perf_counter() - start
    marker = os.path.join(scratch, f"crash-ppe-{rep}")
    ppe = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    list(ppe.map(t.spin, range(50)))
    futures = [ppe.submit(t.spin, i, marker if i == n // 2 else None) for i in range(n)]
    out["ppe_failed"] = sum(1 for f in futures
                            if isinstance(f.exception(timeout=600), BrokenProcessPool))
    try:
        ppe.submit(t.spin, 0)
        out["ppe_usable_after"] = True
    except BrokenProcessPool:
        out["ppe_usable_after"] = False
    ppe.shutdown(wait=True)
    return out


def case_chaos(n, rep):
    import random

    from distexec import DistributedExecutor

    t = _tasks()
    rng = random.Random(rep)
    out = {}
    with DistributedExecutor(max_workers=2, max_retries=1000) as ex:
        ex.wait_for_workers(2, timeout=60)
        list(ex.map(t.spin, range(50)))
        for kills_wanted in (0, 20):
            done = [0]
            cond = threading.Condition()

            def finished(_):
                with cond:
                    done[0] += 1
                    cond.notify_all()

            start = time.perf_counter()
            futures = []
            for i in range(n):
                f = ex.submit(t.spin, i)
                f.add_done_callback(finished)
                futures.append(f)
            kills = 0
            step = n // (kills_wanted + 1) if kills_wanted else n
            while kills < kills_wanted:
                with cond:
                    target = (kills + 1) * step
                    cond.wait_for(lambda target=target: done[0] >= target, 600)
                busy = [w for w in ex.workers() if w.state == "busy"]
                if not busy:
                    continue
                try:
                    os.kill(rng.choice(busy).pid, signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            assert [f.result(timeout=600) for f in futures] == list(range(n))
            out[f"tasks_per_s_{kills_wanted}_kills"] = n / (time.perf_counter() - start)
            ex.wait_for_workers(2, timeout=60)
    return out


def case_kills(n, interval):
    """N short tasks while a random live worker is SIGKILLed every ``interval`` seconds."""
    import random

    import psutil

    from distexec import DistributedExecutor

    t = _tasks()
    rng = random.Random(0)
    counter = _Counter("will run again")  # one warning per task re-run after a loss
    log = logging.getLogger("distexec")
    log.addHandler(counter)
    try:
        with DistributedExecutor(max_workers=2) as ex:
            ex.wait_for_workers(2, timeout=60)
            list(ex.map(t.spin, range(50)))
            counter.count = 0
            stop = threading.Event()
            kills = [0]

            def killer() -> None:
                me = psutil.Process()
                while not stop.wait(interval):
                    workers = [p for p in me.children()
                               if "distexec.worker" in " ".join(p.cmdline())]
                    if workers:
                        try:
                            rng.choice(workers).kill()
                            kills[0] += 1
                        except psutil.NoSuchProcess:
                            pass

            start = time.perf_counter()
            futures = [ex.submit(t.spin, i) for i in range(n)]
            thread = threading.Thread(target=killer, daemon=True)
            if interval:
                thread.start()
            completed = failed = 0
            for i, f in enumerate(futures):
                try:
                    assert f.result(timeout=3600) == i
                    completed += 1
                except Exception:
                    failed += 1
            wall = time.perf_counter() - start
            stop.set()
            if interval:
                thread.join()
    finally:
        log.removeHandler(counter)
    name = f"{int(interval * 1000)}ms" if interval else "none"
    return {f"kills_{name}_completed": completed, f"kills_{name}_failed": failed,
            f"kills_{name}_reruns": counter.count, f"kills_{name}_kills": kills[0],
            f"kills_{name}_wall_s": wall}


def case_freeze(timeout):
    from distexec import DistributedExecutor

    t = _tasks()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    counter = _Counter("declaring")
    logging.getLogger("distexec").addHandler(counter)
    try:
        with DistributedExecutor(max_workers=2, heartbeat_timeout=timeout) as ex:
            ex.wait_for_workers(2, timeout=60)
            future = ex.submit(t.wait_on, port)
            first, _ = server.accept()
            pid = int(first.makefile().readline())
            os.kill(pid, signal.SIGSTOP)
            stopped = time.perf_counter()
            second, _ = server.accept()  # the task started again elsewhere
            elapsed = time.perf_counter() - stopped
            second.makefile().readline()  # read its report: closing unread data resets it
            second.close()
            first.close()
            future.result(timeout=60)
    finally:
        logging.getLogger("distexec").removeHandler(counter)
        server.close()
    return {f"freeze_detect_{timeout:g}s": elapsed}


def case_gil():
    from distexec import DistributedExecutor

    t = _tasks()
    counter = _Counter("declaring")
    logging.getLogger("distexec").addHandler(counter)
    try:
        with DistributedExecutor(max_workers=1, heartbeat_timeout=0.5) as ex:
            ex.submit(t.hold_gil, 1.5).result(timeout=60)
    finally:
        logging.getLogger("distexec").removeHandler(counter)
    return {"gil_losses": counter.count}


def _print_kills(m, n) -> None:
    base = m["kills_none_wall_s"]
    for name, label in (("none", "no kills"), ("500ms", "a kill every 500 ms"),
                        ("100ms", "a kill every 100 ms")):
        print(f"kills:  {label}: {m[f'kills_{name}_completed']:.0f} of {n} completed, "
              f"{m[f'kills_{name}_failed']:.0f} failed, {m[f'kills_{name}_reruns']:.0f} "
              f"re-executions, {m[f'kills_{name}_kills']:.0f} kills, "
              f"{m[f'kills_{name}_wall_s']:.1f} s (x{m[f'kills_{name}_wall_s'] / base:.2f})")


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000, help="tasks per batch")
    parser.add_argument("--kill-n", type=int, default=10000, help="tasks in the kills case")
    parser.add_argument("--only", choices=["kills"], default=None,
                        help="run only this case (once)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {}
    if args.only == "kills":
        report = {}
        for interval in (0.0, 0.5, 0.1):
            report.update(case_kills(args.kill_n, interval))
        _print_kills(report, args.kill_n)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.repeat):
            results = {}
            results.update(case_crash(args.n, scratch, rep))
            results.update(case_chaos(args.n, rep))
            for timeout in (1.0, 2.0):
                results.update(case_freeze(timeout))
            results.update(case_gil())
            if rep == 0:  # long: once
                for interval in (0.0, 0.5, 0.1):
                    results.update(case_kills(args.kill_n, interval))
            for key, value in results.items():
                runs.setdefault(key, []).append(float(value))
            sys.stderr.write(f"repetition {rep + 1}/{args.repeat} done\n")
    medians = {key: statistics.median(values) for key, values in runs.items()}
    print(f"load average: {os.getloadavg()[0]:.2f}; {args.repeat} repetitions, medians; "
          f"N = {args.n} tasks of ~1 ms, 2 workers")
    m = medians
    print(f"crash:  distexec batch with one crash {m['distexec_with_crash_s'] * 1000:.0f} ms vs "
          f"{m['distexec_no_crash_s'] * 1000:.0f} ms without "
          f"(x{m['distexec_with_crash_s'] / m['distexec_no_crash_s']:.2f}); "
          f"futures failed: distexec {m['distexec_failed']:.0f}, "
          f"ProcessPoolExecutor {m['ppe_failed']:.0f} of {args.n} "
          f"(usable afterwards: {'yes' if m['ppe_usable_after'] else 'no'})")
    print(f"chaos:  {m['tasks_per_s_0_kills']:.0f} tasks/s without kills, "
          f"{m['tasks_per_s_20_kills']:.0f} with 20 SIGKILLs "
          f"(x{m['tasks_per_s_20_kills'] / m['tasks_per_s_0_kills']:.2f}); all results correct; "
          "ProcessPoolExecutor: broken by the first kill")
    print(f"freeze: SIGSTOP to re-run {m['freeze_detect_1s']:.2f} s (heartbeat_timeout 1 s), "
          f"{m['freeze_detect_2s']:.2f} s (2 s); ProcessPoolExecutor: never")
    print(f"gil:    workers declared lost while a task held the GIL 3 x the timeout: "
          f"{m['gil_losses']:.0f}")
    _print_kills(m, args.kill_n)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"medians": medians, "runs": runs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
