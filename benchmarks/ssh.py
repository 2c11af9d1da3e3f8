"""SSH workers: throughput, latency and bandwidth through the SSH tunnel versus direct loopback.

Usage (as root, with openssh-server installed; it starts a one-host SSH lab from
tests/sshlab.py and removes it at the end)::

    python benchmarks/ssh.py              # about a minute
    python benchmarks/ssh.py --repeat 3 --json ssh.json

Three executors with 2 workers each, measured in the same run, repetitions alternating the
order: ``ssh`` (workers on a lab host, reached through a remote port forward over paramiko),
``direct`` (the same host, workers connecting straight to the task manager: ``tunnel=False``)
and ``local`` (local workers on loopback). ProcessPoolExecutor (spawn) is included for the
local reference. Medians over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

MiB = 1024 * 1024


def noop(x=None):
    return x


def identity(x):
    return x


def _tasks():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ssh as module  # this file, importable by name so that functions pickle by reference

    return module


def measure(ex, n_map: int, n_lat: int, nbytes: int) -> dict:
    t = _tasks()
    list(ex.map(t.noop, range(200)))
    start = time.perf_counter()
    list(ex.map(t.noop, range(n_map)))
    rate = n_map / (time.perf_counter() - start)
    times = []
    for i in range(n_lat):
        start = time.perf_counter()
        ex.submit(t.noop, i).result()
        times.append(time.perf_counter() - start)
    times.sort()
    payload = os.urandom(nbytes)
    ex.submit(t.identity, b"x").result()
    start = time.perf_counter()
    assert len(ex.submit(t.identity, payload).result()) == nbytes
    bandwidth = nbytes / MiB / (time.perf_counter() - start)
    return {"tasks_per_s": rate, "p50_us": times[len(times) // 2] * 1e6,
            "p99_us": times[int(len(times) * 0.99) - 1] * 1e6, "mib_per_s": bandwidth}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tests"))
    import cloudpickle
    from sshlab import Lab

    from distexec import DistributedExecutor

    cloudpickle.register_pickle_by_value(_tasks())  # the lab host cannot import this file
    n_map, n_lat, nbytes = 5000, 500, 64 * MiB
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        lab = Lab.up(1, scratch)
        try:
            host = lab.hosts[0]
            makers = {
                "ssh": lambda: DistributedExecutor(hosts=[f"{host.name} slots=2"],
                                                   ssh_config=str(lab.ssh_config)),
                "direct": lambda: DistributedExecutor(
                    hosts=[f"{host.name} slots=2"], ssh_config=str(lab.ssh_config),
                    tunnel=False, listen="0.0.0.0:0", key=os.urandom(32)),
                "local": lambda: DistributedExecutor(max_workers=2),
                "ppe": lambda: ProcessPoolExecutor(
                    2, mp_context=multiprocessing.get_context("spawn")),
            }
            for rep in range(args.repeat):
                order = list(makers) if rep % 2 == 0 else list(reversed(makers))
                for name in order:
                    ex = makers[name]()
                    try:
                        if hasattr(ex, "wait_for_workers"):
                            ex.wait_for_workers(2, timeout=120)
                        runs.setdefault(name, []).append(measure(ex, n_map, n_lat, nbytes))
                    finally:
                        ex.shutdown()
                sys.stderr.write(f"repetition {rep + 1}/{args.repeat} done\n")
        finally:
            lab.down()
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in runs.items()}
    print(f"{args.repeat} repetitions, medians; 2 workers; lab mode {lab.mode}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'path':8} {'map no-op tasks/s':>18} {'p50 us':>8} {'p99 us':>8} "
          f"{'64 MiB MiB/s':>13}")
    for name, m in medians.items():
        print(f"{name:8} {m['tasks_per_s']:18.0f} {m['p50_us']:8.0f} {m['p99_us']:8.0f} "
              f"{m['mib_per_s']:13.0f}")
    s, loc = medians["ssh"], medians["local"]
    print(f"ssh / local: throughput x{s['tasks_per_s'] / loc['tasks_per_s']:.2f}, "
          f"p50 x{s['p50_us'] / loc['p50_us']:.2f}, bandwidth "
          f"x{s['mib_per_s'] / loc['mib_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"medians": medians, "runs": runs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
