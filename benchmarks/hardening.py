"""What hostile or unlucky peers cost the caller: junk connections, big payloads.

Usage::

    python benchmarks/hardening.py                  # both cases, about a minute
    python benchmarks/hardening.py junk --connections 50000
    python benchmarks/hardening.py payload --repeat 3 --json payload.json

Cases:

junk
    While two workers run a steady stream of short tasks, a separate process opens N
    connections to the executor's port (no key): a third close at once, a third send garbage,
    a third send a plausible handshake header and then stall, with up to 500 of them held open
    at a time. Reported: the caller's RSS growth (peak and after), how many tasks completed
    during the attack against the same time without it, and whether every task still completed.
    The requirement is growth below 50 MiB for 50,000 connections.
payload
    One task that returns its argument (``bytes`` and, when NumPy is installed, a float64
    array), for 64 MiB and 1 GiB: round-trip throughput (payload bytes each way / wall time,
    median over the repetitions) and the caller's peak RSS above the input, measured for
    distexec, for ProcessPoolExecutor (spawn) and for a raw loopback TCP echo between two
    Python processes (the machine's limit for this round trip), interleaved in the same run
    after one untimed round, with distexec's ratio to each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec import DistributedExecutor  # noqa: E402

MiB = 1024 * 1024


def rss() -> int:
    return psutil.Process().memory_info().rss


def echo(x):
    return x


def tiny(x):
    return x + 1


# --------------------------------------------------------------------------- junk
def _attack(host: str, port: int, n: int, held_max: int, out: multiprocessing.Queue) -> None:
    """Open n junk connections (runs in its own process, so its memory is not counted)."""
    held: list[socket.socket] = []
    refused = 0
    start = time.perf_counter()
    header = b"DXEW" + struct.pack("!HH", 1, 2000) + b"\0" * 64  # claims 2000 bytes, sends none
    for i in range(n):
        try:
            s = socket.create_connection((host, port), timeout=5)
        except OSError:
            refused += 1
            continue
        kind = i % 3
        try:
            if kind == 0:
                s.close()
            elif kind == 1:
                s.sendall(os.urandom(200))
                s.close()
            else:
                s.sendall(header)
                held.append(s)
                if len(held) >= held_max:
                    for h in held[: held_max // 2]:
                        h.close()
                    del held[: held_max // 2]
        except OSError:
            s.close()
    for h in held:
        h.close()
    out.put((time.perf_counter() - start, refused))


def _count_tasks(ex: DistributedExecutor, stop: threading.Event, counter: list[int]) -> None:
    while not stop.is_set():
        futures = [ex.submit(tiny, i) for i in range(200)]
        for i, f in enumerate(futures):
            assert f.result(timeout=60) == i + 1
        counter[0] += len(futures)


def junk(connections: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with DistributedExecutor(max_workers=2) as ex:
        ex.wait_for_workers(2, timeout=60)
        list(ex.map(tiny, range(2000)))
        host, port = ex.address.rsplit(":", 1)
        # Baseline throughput for 3 s.
        stop, counter = threading.Event(), [0]
        t = threading.Thread(target=_count_tasks, args=(ex, stop, counter))
        t0 = time.perf_counter()
        t.start()
        time.sleep(3)
        stop.set()
        t.join()
        base_rate = counter[0] / (time.perf_counter() - t0)

        before = rss()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss())

        sampler = threading.Thread(target=sample)
        sampler.start()
        out: multiprocessing.Queue = ctx.Queue()
        attacker = ctx.Process(target=_attack, args=(host, int(port), connections, 500, out))
        stop, counter = threading.Event(), [0]
        t = threading.Thread(target=_count_tasks, args=(ex, stop, counter))
        t0 = time.perf_counter()
        attacker.start()
        t.start()
        seconds, refused = out.get(timeout=3600)
        attacker.join()
        stop.set()
        t.join()
        rate = counter[0] / (time.perf_counter() - t0)
        # Let the handshake deadlines of the last connections pass.
        time.sleep(11)
        done.set()
        sampler.join()
        after = rss()
        assert list(ex.map(tiny, range(1000))) == list(range(1, 1001))
    return {
        "connections": connections,
        "attack_seconds": round(seconds, 1),
        "refused_connects": refused,
        "rss_growth_peak_mib": round((peak[0] - before) / MiB, 1),
        "rss_growth_after_mib": round((after - before) / MiB, 1),
        "tasks_per_s_without": round(base_rate),
        "tasks_per_s_during": round(rate),
    }


# --------------------------------------------------------------------------- payload
def _peak_rss_probe() -> tuple[threading.Event, list[int], threading.Thread]:
    done = threading.Event()
    peak = [rss()]

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    return done, peak, t


def _round_trip(ex, payload) -> tuple[float, int]:
    base = rss()
    done, peak, t = _peak_rss_probe()
    t0 = time.perf_counter()
    back = ex.submit(echo, payload).result()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    assert len(back) == len(payload)
    del back
    return wall, peak[0] - base


def _echo_server(listener: socket.socket) -> None:
    """Raw baseline (its own process): receive a length-prefixed message into new memory and
    send it back, as a task returning its argument would, without any library in between."""
    conn, _ = listener.accept()
    with conn:
        while True:
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                return
            (n,) = struct.unpack("!Q", head)
            buf = bytearray(n)
            view = memoryview(buf)
            got = 0
            while got < n:
                got += conn.recv_into(view[got:])
            conn.sendall(buf)
            del view, buf


class _RawEcho:
    """Client of _echo_server: the round trip of the bytes over loopback TCP and nothing else."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_echo_server, args=(listener,), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(listener.getsockname())
        listener.close()

    def round_trip(self, data) -> bytearray:
        view = memoryview(data).cast("B")
        self.sock.sendall(struct.pack("!Q", view.nbytes))
        out = bytearray(view.nbytes)
        target = memoryview(out)
        sender = threading.Thread(target=self.sock.sendall, args=(view,))
        sender.start()
        got = 0
        while got < view.nbytes:
            got += self.sock.recv_into(target[got:])
        sender.join()
        return out

    def close(self) -> None:
        self.sock.close()
        self.proc.join(10)


def _raw_round_trip(echo_client: _RawEcho, payload) -> tuple[float, int]:
    base = rss()
    stop, peak, sampler = _peak_rss_probe()
    start = time.perf_counter()
    out = echo_client.round_trip(payload)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    del out
    return wall, max(peak[0] - base, 0)


def payload(repeat: int, sizes: list[int]) -> list[dict]:
    try:
        import numpy as np
    except ImportError:
        np = None
    rows = []
    kinds = ["bytes"] + (["ndarray"] if np is not None else [])
    raw = _RawEcho()
    with DistributedExecutor(max_workers=1) as dx, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pp:
        dx.submit(tiny, 1).result()
        pp.submit(tiny, 1).result()
        runners = (("distexec", lambda data: _round_trip(dx, data)),
                   ("ppe", lambda data: _round_trip(pp, data)),
                   ("raw", lambda data: _raw_round_trip(raw, data)))
        for kind in kinds:
            for size in sizes:
                data = (os.urandom(size) if kind == "bytes"
                        else np.frombuffer(os.urandom(size), dtype=np.float64).copy())
                row: dict = {"kind": kind, "size_mib": size // MiB}
                walls: dict[str, list[float]] = {name: [] for name, _ in runners}
                peaks: dict[str, list[int]] = {name: [] for name, _ in runners}
                # One untimed round first (the memory it touches is then warm for all three),
                # then interleaved rounds.
                for i in range(repeat + 1):
                    for name, run in runners:
                        w, p = run(data)
                        if i:
                            walls[name].append(w)
                            peaks[name].append(p)
                for name, _ in runners:
                    row[f"{name}_MBps"] = round(2 * size / statistics.median(walls[name]) / 1e6)
                    row[f"{name}_peak_rss_above_input_mib"] = round(max(peaks[name]) / MiB)
                row["ratio_vs_ppe"] = round(row["distexec_MBps"] / row["ppe_MBps"], 2)
                row["fraction_of_raw"] = round(row["distexec_MBps"] / row["raw_MBps"], 2)
                rows.append(row)
                del data
    raw.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", nargs="?", choices=["junk", "payload", "all"], default="all")
    ap.add_argument("--connections", type=int, default=50000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--json")
    args = ap.parse_args()
    results: dict = {"python": sys.version.split()[0]}
    if args.case in ("junk", "all"):
        results["junk"] = junk(args.connections)
        print(json.dumps(results["junk"]), flush=True)
    if args.case in ("payload", "all"):
        results["payload"] = payload(args.repeat, [s * MiB for s in args.sizes_mib])
        for row in results["payload"]:
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
