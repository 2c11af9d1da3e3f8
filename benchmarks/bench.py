"""Benchmark DistributedExecutor against ProcessPoolExecutor (spawn), both with 2 workers.

Usage::

    python benchmarks/bench.py                 # full run (a few minutes)
    python benchmarks/bench.py --quick         # smoke run (small sizes, 2 repetitions)
    python benchmarks/bench.py --repeat 7 --json results.json

Every case runs against both executors in the same process run. Repetitions alternate which
implementation goes first (D,P then P,D, ...) to spread drift (CPU frequency, page cache, other
load) evenly; the latency case goes further and alternates blocks of 100 round trips inside each
repetition. Except for "startup" (a fresh executor per measurement) and memory (see below), cases
run on one long-lived, warmed-up executor per implementation, and every case gets an untimed
warm-up pass first. The reported number is the median over the repetitions. The load average is
printed: on a busy machine, latency and startup are noisy.

The "adv" column is the advantage of distexec: a ratio oriented so that > 1 always means
distexec is better (for throughputs: distexec / PPE; for times, latencies and memory:
PPE / distexec).

Client memory per pending task is measured in a fresh child interpreter per repetition and
implementation (so the heap's earlier high-water mark cannot hide growth): both workers are
blocked in a task that waits on a loopback socket the child controls (they report that they
are running, so nothing sleeps for synchronisation), 1,000 tasks are queued to warm up the code
paths, then RSS (psutil) is read, 200,000 no-op tasks are submitted (they cannot start), RSS is
read again, and the difference divided by 200,000 is reported (min(repeat, 3) children per
implementation; the figure is reproducible to < 0.1%). One more child per implementation does the
same under tracemalloc (Python allocations only, all threads, tracemalloc's own overhead
excluded); it is reported for information. The workers are then released and the executor is
shut down with cancel_futures=True.

Note that this file must stay cheap to import: ProcessPoolExecutor's spawned workers import it
again as ``__mp_main__``. Heavy imports (numpy, psutil, distexec) happen inside functions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, Executor, ProcessPoolExecutor, wait

MiB = 1024 * 1024
LATENCY_BLOCK = 100  # round trips per implementation before switching to the other one
MEMORY_MAX_REPEAT = 3  # RSS per pending task is reproducible to < 0.1%; fewer children suffice
WAIT_LIMIT = 600.0  # seconds; only a guard against hangs, never a synchronisation device


# --------------------------------------------------------------------------- task functions
def _tasks():
    """The task functions: bench_tasks, next to this file, importable by name in the workers.

    Both executors then pickle ``bench_tasks.noop`` by reference (identical, fair treatment;
    run as a script, this file is ``__main__``, which cloudpickle would pickle by value and PPE
    by reference to ``__mp_main__``), and the workers import a module that imports only os and
    socket (see bench_tasks).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in [os.path.abspath(p or ".") for p in sys.path]:
        sys.path.insert(0, here)
    import importlib

    return importlib.import_module("bench_tasks")


# --------------------------------------------------------------------------- executors
IMPLS = ("distexec", "ppe")
LABEL = {"distexec": "distexec", "ppe": "PPE(spawn)"}


def make_executor(impl: str, workers: int) -> Executor:
    if impl == "distexec":
        from distexec import DistributedExecutor

        return DistributedExecutor(max_workers=workers)
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _wait_all(futures) -> None:
    done, not_done = wait(futures, timeout=WAIT_LIMIT, return_when=FIRST_EXCEPTION)
    if not_done:
        for f in done:
            if f.exception() is not None:
                raise f.exception()
        raise TimeoutError(f"{len(not_done)} tasks not done after {WAIT_LIMIT} s")


def _check_all(futures) -> None:
    for f in futures:
        if f.result(0) is not None:
            raise AssertionError("a no-op returned something")


# --------------------------------------------------------------------------- cases
# Each case function runs one repetition on one executor and returns a dict of raw numbers.
def case_startup(impl: str, workers: int, size: dict) -> dict:
    t = _tasks()
    gc.collect()
    t0 = time.perf_counter()
    ex = make_executor(impl, workers)
    ex.submit(t.noop).result(WAIT_LIMIT)
    elapsed = time.perf_counter() - t0
    ex.shutdown(wait=True)
    return {"seconds": elapsed}


def case_submit(ex: Executor, size: dict) -> dict:
    t = _tasks()
    n = size["submit_n"]
    noop_ = t.noop
    submit = ex.submit
    gc.collect()
    t0 = time.perf_counter()
    futures = [submit(noop_) for _ in range(n)]
    t_submitted = time.perf_counter()
    _wait_all(futures)
    elapsed = time.perf_counter() - t0
    _check_all(futures)
    return {"n": n, "seconds": elapsed, "submit_seconds": t_submitted - t0}


def _map_case(ex: Executor, n: int, chunksize: int) -> dict:
    t = _tasks()
    gc.collect()
    t0 = time.perf_counter()
    count = 0
    for _r in ex.map(t.identity, range(n), chunksize=chunksize, timeout=WAIT_LIMIT):
        count += 1
    elapsed = time.perf_counter() - t0
    if count != n:
        raise AssertionError(f"map returned {count} items, expected {n}")
    return {"n": n, "chunksize": chunksize, "seconds": elapsed}


def case_map1(ex: Executor, size: dict) -> dict:
    return _map_case(ex, size["map1_n"], 1)


def case_map1000(ex: Executor, size: dict) -> dict:
    return _map_case(ex, size["map1000_n"], 1000)


def case_latency(executors: dict, order, size: dict) -> dict:
    """Sequential round trips, in blocks that alternate between the implementations.

    One repetition makes ``latency_n`` round trips per implementation, in blocks of
    ``LATENCY_BLOCK`` alternating D,P,D,P... so that both see the same background load.
    """
    t = _tasks()
    noop_ = t.noop
    n = size["latency_n"]
    samples: dict = {impl: [] for impl in order}
    gc.collect()
    clock = time.perf_counter
    done = 0
    while done < n:
        block = min(LATENCY_BLOCK, n - done)
        for impl in order:
            submit = executors[impl].submit
            out = samples[impl]
            for _ in range(block):
                t0 = clock()
                submit(noop_).result(WAIT_LIMIT)
                out.append(clock() - t0)
        done += block
    result = {}
    for impl, values in samples.items():
        values.sort()
        result[impl] = {
            "n": n,
            "p50_us": _percentile(values, 50) * 1e6,
            "p99_us": _percentile(values, 99) * 1e6,
            "mean_us": statistics.fmean(values) * 1e6,
        }
    return result


def _roundtrip_case(ex: Executor, payload, nbytes: int, trips: int, check) -> dict:
    t = _tasks()
    gc.collect()
    times = []
    for i in range(trips):
        t0 = time.perf_counter()
        out = ex.submit(t.identity, payload).result(WAIT_LIMIT)
        times.append(time.perf_counter() - t0)
        if i == 0:
            check(out)
        del out
    rt = statistics.median(times)
    return {"bytes": nbytes, "trips": trips, "roundtrip_seconds": rt,
            "mib_per_s": nbytes / MiB / rt}


_PAYLOADS: dict = {}


def _payload(kind: str, nbytes: int):
    key = (kind, nbytes)
    if key not in _PAYLOADS:
        import numpy as np

        rng = np.random.default_rng(12345)
        if kind == "bytes":
            _PAYLOADS[key] = rng.bytes(nbytes)
        else:
            _PAYLOADS[key] = rng.random(nbytes // 8)  # float64
    return _PAYLOADS[key]


def case_bytes(ex: Executor, size: dict) -> dict:
    nbytes = size["payload_bytes"]
    data = _payload("bytes", nbytes)

    def check(out):
        if type(out) is not bytes or out != data:
            raise AssertionError("bytes round trip changed the data")

    return _roundtrip_case(ex, data, nbytes, size["payload_trips"], check)


def case_array(ex: Executor, size: dict) -> dict:
    import numpy as np

    nbytes = size["payload_bytes"]
    arr = _payload("array", nbytes)

    def check(out):
        if not isinstance(out, np.ndarray) or not np.array_equal(out, arr):
            raise AssertionError("array round trip changed the data")

    return _roundtrip_case(ex, arr, arr.nbytes, size["payload_trips"], check)


# --------------------------------------------------------------------------- memory (child)
def memory_child(impl: str, workers: int, pending: int, warm: int, use_tracemalloc: bool) -> dict:
    """Runs in a fresh interpreter; prints one JSON line. See the module docstring."""
    import psutil

    if use_tracemalloc:
        import tracemalloc

        tracemalloc.start()
    t = _tasks()
    proc = psutil.Process()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_LIMIT)
    host, port = listener.getsockname()[:2]
    ex = make_executor(impl, workers)
    # Fresh executor: the blockers are the first tasks, so each worker takes exactly one
    # (distexec hands a worker one task at a time until it has measured task durations; PPE's
    # workers pull one call each).
    blockers = [ex.submit(t.blocker, host, port) for _ in range(workers)]
    conns, pids = [], set()
    for _ in range(workers):
        conn, _addr = listener.accept()
        conn.settimeout(WAIT_LIMIT)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                raise RuntimeError("a blocker hung up before reporting")
            line += chunk
        pids.add(int(line))
        conns.append(conn)
    if len(pids) != workers:
        raise RuntimeError(f"blockers run in {len(pids)} distinct workers, expected {workers}")
    # Every worker is now inside a blocker: nothing submitted below can start.
    noop_ = t.noop
    submit = ex.submit
    futures = [submit(noop_) for _ in range(warm)]
    gc.collect()
    rss0 = proc.memory_info().rss
    tm0 = tracemalloc.get_traced_memory()[0] if use_tracemalloc else None
    t0 = time.perf_counter()
    futures += [submit(noop_) for _ in range(pending)]
    submit_seconds = time.perf_counter() - t0
    gc.collect()
    rss1 = proc.memory_info().rss
    tm1 = tracemalloc.get_traced_memory()[0] if use_tracemalloc else None
    inbox = getattr(getattr(ex, "_shared", None), "inbox", None)
    not_yet_filed = len(inbox) if inbox is not None else None
    running_or_done = sum(1 for f in futures if f.running() or f.done())
    # Release the workers, then stop without running the queued no-ops.
    for conn in conns:
        conn.sendall(b"g")
        conn.close()
    listener.close()
    for f in blockers:
        f.result(WAIT_LIMIT)
    t1 = time.perf_counter()
    ex.shutdown(wait=True, cancel_futures=True)
    shutdown_seconds = time.perf_counter() - t1
    out = {
        "impl": impl,
        "pending": pending,
        "rss_before": rss0,
        "rss_after": rss1,
        "rss_bytes_per_task": (rss1 - rss0) / pending,
        "submit_seconds": submit_seconds,
        "shutdown_seconds": shutdown_seconds,
        "started_before_release": running_or_done,
        "not_yet_filed_by_manager": not_yet_filed,
    }
    if use_tracemalloc:
        out["traced_bytes_per_task"] = (tm1 - tm0) / pending
    return out


_COLD_CHILD = """
import json, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "distexec":
    from distexec import DistributedExecutor
    ex = DistributedExecutor(max_workers=int(sys.argv[2]))
else:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    ex = ProcessPoolExecutor(max_workers=int(sys.argv[2]),
                             mp_context=multiprocessing.get_context("spawn"))
t1 = time.perf_counter()
assert ex.submit(abs, -1).result() == 1
t2 = time.perf_counter()
ex.shutdown(wait=True)
print(json.dumps({"construct_seconds": t1 - t0, "seconds": t2 - t0}))
"""


def case_coldstart(impl: str, workers: int, size: dict) -> dict:
    """A fresh interpreter: import, construct, first result (what a script's user waits for).

    Timed inside the child from before the import, so the interpreter's own start (the same for
    both) is left out. The child runs in the temporary directory: from the repository, ``import
    distexec`` (and the workers) would load the source tree instead of the installed package.
    """
    import tempfile

    res = subprocess.run([sys.executable, "-c", _COLD_CHILD, impl, str(workers)],
                         capture_output=True, text=True, timeout=WAIT_LIMIT,
                         cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise RuntimeError(f"cold-start child failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def case_memory(impl: str, workers: int, size: dict, use_tracemalloc: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl,
           "--workers", str(workers), "--pending", str(size["memory_pending"])]
    if use_tracemalloc:
        cmd.append("--tracemalloc")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_LIMIT)
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- reporting
def _percentile(sorted_values, pct):
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * pct / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# (metric key, case, label, unit, higher_is_better, extractor, target advantage or None)
def _metrics(size: dict):
    mb = size["payload_bytes"] / MiB
    n_s, n_m1, n_m1000 = size["submit_n"], size["map1_n"], size["map1000_n"]
    return [
        ("startup", "startup", "startup to first result", "ms", False,
         lambda r: r["seconds"] * 1e3, 1.0),
        ("cold", "coldstart", "fresh interpreter: import..result", "ms", False,
         lambda r: r["seconds"] * 1e3, 1.0),
        ("cold_ctor", "coldstart", "fresh interpreter: import+ctor", "ms", False,
         lambda r: r["construct_seconds"] * 1e3, None),
        ("submit", "submit", f"{n_s:,} submits + wait", "tasks/s", True,
         lambda r: r["n"] / r["seconds"], 1.0),
        ("map1", "map1", f"map chunksize=1, {n_m1:,} items", "items/s", True,
         lambda r: r["n"] / r["seconds"], 1.0),
        ("map1000", "map1000", f"map chunksize=1000, {n_m1000:,}", "items/s", True,
         lambda r: r["n"] / r["seconds"], 1.0),
        ("lat_p50", "latency", "round-trip latency p50", "us", False,
         lambda r: r["p50_us"], 1.0),
        ("lat_p99", "latency", "round-trip latency p99", "us", False,
         lambda r: r["p99_us"], 1.0),
        ("bytes", "bytes", f"{mb:g} MiB bytes identity", "MiB/s*", True,
         lambda r: r["mib_per_s"], 1.0),
        ("array", "array", f"{mb:g} MiB ndarray identity", "MiB/s*", True,
         lambda r: r["mib_per_s"], 3.0),
        ("mem_rss", "memory", "client RSS / pending task", "B/task", False,
         lambda r: r["rss_bytes_per_task"], 1.0),
        ("mem_traced", "memory_tm", "tracemalloc / pending task", "B/task", False,
         lambda r: r["traced_bytes_per_task"], None),
    ]


def summarize(raw: dict, size: dict) -> list[dict]:
    rows = []
    for key, case, label, unit, higher, extract, target in _metrics(size):
        if case not in raw:
            continue
        med = {}
        for impl in IMPLS:
            values = [extract(r) for r in raw[case][impl]]
            med[impl] = statistics.median(values) if values else float("nan")
        d, p = med["distexec"], med["ppe"]
        try:
            adv = d / p if higher else p / d
        except ZeroDivisionError:
            adv = float("inf") if (d if higher else p) > 0 else float("nan")
        if not higher and d <= 0 and p > 0:
            adv = float("inf")  # distexec allocated nothing measurable
        rows.append({
            "metric": key, "label": label, "unit": unit,
            "better": "higher" if higher else "lower",
            "distexec": d, "ppe": p, "advantage": adv, "target": target,
            "met": None if target is None else bool(adv >= target),
            "reps": len(raw[case]["distexec"]),
        })
    return rows


def _fmt(v: float) -> str:
    if v != v:
        return "nan"
    if abs(v) >= 100_000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'case':34} {'unit':8} {'better':6} {'distexec':>12} {'PPE(spawn)':>12} "
            f"{'adv':>6}  {'target':>7} {'met':>4}")
    print(head)
    print("-" * len(head))
    for r in rows:
        target = "-" if r["target"] is None else f">={r['target']:g}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"{r['label']:34} {r['unit']:8} {r['better']:6} {_fmt(r['distexec']):>12} "
              f"{_fmt(r['ppe']):>12} {r['advantage']:>6.2f}  {target:>7} {met:>4}")
    print()
    print("adv = distexec's advantage, > 1 means distexec is better (throughput: distexec/PPE;")
    print("      time, latency, memory: PPE/distexec). Target startup >=1: distexec starts at")
    print("      least as fast as PPE. Values are medians over the repetitions.")
    print("MiB/s* = payload size / round-trip time: each round trip moves the payload to the")
    print("      worker and back (2x the payload on the wire).")


# --------------------------------------------------------------------------- driver
SIZES = {
    "full": {"submit_n": 20_000, "map1_n": 20_000, "map1000_n": 1_000_000, "latency_n": 2_000,
             "payload_bytes": 64 * MiB, "payload_trips": 3, "memory_pending": 200_000},
    "quick": {"submit_n": 2_000, "map1_n": 2_000, "map1000_n": 100_000, "latency_n": 200,
              "payload_bytes": 8 * MiB, "payload_trips": 1, "memory_pending": 20_000},
}
WARM = {"submit_n": 2_000, "map1_n": 2_000, "map1000_n": 50_000, "latency_n": 200,
        "payload_trips": 1}

CASES = ("startup", "coldstart", "latency", "submit", "map1", "map1000", "bytes", "array", "memory")


def _order(rep: int):
    return IMPLS if rep % 2 == 0 else IMPLS[::-1]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> dict:
    size = dict(SIZES["quick" if args.quick else "full"])
    reps = args.repeat
    selected = [c for c in CASES if c in args.cases]
    raw: dict = {}
    workers = args.workers

    if "startup" in selected:
        raw["startup"] = {i: [] for i in IMPLS}
        for impl in IMPLS:  # untimed: warms the page cache and imports for both
            case_startup(impl, workers, size)
        for rep in range(reps):
            for impl in _order(rep):
                raw["startup"][impl].append(case_startup(impl, workers, size))
        _log(f"startup done: {_brief(raw['startup'], lambda r: r['seconds'] * 1e3, 'ms')}")

    if "coldstart" in selected:
        raw["coldstart"] = {i: [] for i in IMPLS}
        for impl in IMPLS:  # untimed: warms the page cache for both
            case_coldstart(impl, workers, size)
        for rep in range(reps):
            for impl in _order(rep):
                raw["coldstart"][impl].append(case_coldstart(impl, workers, size))
        _log(f"coldstart done: {_brief(raw['coldstart'], lambda r: r['seconds'] * 1e3, 'ms')}")

    steady = [c for c in selected if c in ("latency", "submit", "map1", "map1000", "bytes",
                                           "array")]
    if steady:
        executors = {impl: make_executor(impl, workers) for impl in IMPLS}
        try:
            t = _tasks()
            for ex in executors.values():  # start the workers, import numpy in each
                _wait_all([ex.submit(t.noop) for _ in range(1000)])
                _wait_all([ex.submit(t.identity, _payload("array", MiB)) for _ in range(8)])
            funcs = {"latency": case_latency, "submit": case_submit, "map1": case_map1,
                     "map1000": case_map1000, "bytes": case_bytes, "array": case_array}
            for case in steady:
                fn = funcs[case]
                warm_size = {**size, **{k: min(v, size[k]) for k, v in WARM.items()}}
                raw[case] = {i: [] for i in IMPLS}
                if case == "latency":  # interleaved in blocks inside each repetition
                    case_latency(executors, IMPLS, warm_size)
                    for rep in range(reps):
                        res = case_latency(executors, _order(rep), size)
                        for impl in IMPLS:
                            raw[case][impl].append(res[impl])
                else:
                    for impl in IMPLS:
                        fn(executors[impl], warm_size)
                    for rep in range(reps):
                        for impl in _order(rep):
                            raw[case][impl].append(fn(executors[impl], size))
                _log(f"{case} done")
        finally:
            for ex in executors.values():
                ex.shutdown(wait=True, cancel_futures=True)

    if "memory" in selected:
        raw["memory"] = {i: [] for i in IMPLS}
        if not args.no_tracemalloc:
            raw["memory_tm"] = {i: [] for i in IMPLS}
        for rep in range(min(reps, MEMORY_MAX_REPEAT)):
            for impl in _order(rep):
                raw["memory"][impl].append(case_memory(impl, workers, size, False))
                # tracemalloc is deterministic here (and slow): once per implementation.
                if rep == 0 and not args.no_tracemalloc:
                    raw["memory_tm"][impl].append(case_memory(impl, workers, size, True))
        _log(f"memory done: {_brief(raw['memory'], lambda r: r['rss_bytes_per_task'], 'B/task')}")
    return {"size": size, "raw": raw}


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _brief(per_impl: dict, extract, unit: str) -> str:
    return ", ".join(f"{impl} {_fmt(statistics.median(extract(r) for r in rs))} {unit}"
                     for impl, rs in per_impl.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions per case (default 5, or 2 with --quick)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="write raw numbers and medians here")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of: {','.join(CASES)}")
    parser.add_argument("--no-tracemalloc", action="store_true",
                        help="skip the tracemalloc memory runs (RSS only)")
    # Internal: one memory measurement in a fresh interpreter.
    parser.add_argument("--memory-child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--pending", type=int, default=200_000, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        out = memory_child(args.memory_child, args.workers, args.pending, 1_000, args.tracemalloc)
        print(json.dumps(out))
        return 0

    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")

    import distexec

    try:
        import psutil

        mem_total = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover
        mem_total = None
    meta = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cpus": os.cpu_count(), "mem_total": mem_total, "distexec": distexec.__version__,
        "workers": args.workers, "repeat": args.repeat, "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": _loadavg(),
    }
    print(f"distexec {meta['distexec']} vs ProcessPoolExecutor(spawn), {args.workers} workers "
          f"each; Python {meta['python']}, {meta['cpus']} CPUs; {args.repeat} repetitions"
          f"{' (quick)' if args.quick else ''}; load average {meta['loadavg_start']}", flush=True)
    if meta["loadavg_start"] and meta["loadavg_start"][0] > 0.5:
        print("warning: the machine is not idle; latency and startup numbers will be noisy",
              flush=True)
    t0 = time.perf_counter()
    result = run(args)
    elapsed = time.perf_counter() - t0
    meta["loadavg_end"] = _loadavg()
    rows = summarize(result["raw"], result["size"])
    print()
    print_table(rows)
    print(f"\ntotal benchmark time {elapsed:.0f} s; load average at the end {meta['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "size": result["size"], "summary": rows,
                       "raw": result["raw"], "elapsed_seconds": elapsed}, fh, indent=1)
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
