"""The task manager's cost as the fleet grows: a simulated fleet speaking the real protocol.

Usage::

    python benchmarks/fleet.py                          # 2, 8, 32, 128, 1000 workers
    python benchmarks/fleet.py --workers 1000,5000 --tasks 20000 --task-ms 20

One process (this one) runs a ``DistributedExecutor`` with no local workers, listening on
loopback. A second process, the *fleet*, opens N worker connections to it, each with its
control connection, and speaks the real protocol over real sockets: the handshake (HMAC with
the executor's key), CONFIG, READY, heartbeats (one NUL byte per heartbeat interval on the
control connection), and a RESULTS frame for every task it is sent, after ``--task-ms``
milliseconds (the simulated task sleeps; the fleet answers from one selector loop, so it costs
little CPU per task). Nothing is mocked on the task manager's side.

For each fleet size it reports, from the task manager thread's own CPU time (its POSIX thread
CPU clock, so the caller's and the fleet's CPU are not counted):

* connect: seconds until all N workers are ready, and the caller's RSS per connected worker;
* idle: task-manager CPU per second with N idle workers beating (as % of one core), and per
  heartbeat;
* tasks: tasks/s and task-manager CPU per task for ``--tasks`` no-op tasks submitted at once.

Each figure is the median of ``--repeat`` runs. The load average is printed with the table.
File descriptors: each worker costs two in each process; the soft limit is raised to the hard
limit (printed) and the largest fleet is capped to fit.
"""

from __future__ import annotations

import argparse
import heapq
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _noop(i: int) -> int:
    return i


# ----------------------------------------------------------------------------- the fleet
def fleet_main(address: str, key_hex: str, n: int, task_ms: float) -> int:
    """The simulated fleet: N workers in one process (run with --simulate)."""
    from distexec import protocol, serialization
    from distexec.worker_client import client_handshake, worker_info

    key = bytes.fromhex(key_hex)
    host, port = address.rsplit(":", 1)
    payload, _ = serialization.dumps(None)
    sel = selectors.DefaultSelector()
    mains: list[socket.socket] = []
    controls: list[socket.socket] = []
    interval = 5.0
    for _ in range(n):
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        welcome = client_handshake(sock, key, worker_info(None))
        worker_id = int(welcome["worker_id"])
        interval = float(welcome.get("heartbeat_interval") or interval)
        ctrl = socket.create_connection((host, int(port)))
        info = worker_info(worker_id)
        info.update(channel="control", main_thread=threading.main_thread().ident)
        client_handshake(ctrl, key, info)
        mains.append(sock)
        controls.append(ctrl)
    decoders = {}
    for sock in mains:
        decoder = protocol.FrameDecoder()
        decoders[sock] = decoder
        while True:  # CONFIG
            frames = decoder.feed(sock.recv_into(decoder.recv_buffer()))
            if frames:
                break
        protocol.send_all_blocking(sock, protocol.encode_frame(protocol.READY, (os.getpid(),)))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, "main")
    for ctrl in controls:
        ctrl.setblocking(False)
        sel.register(ctrl, selectors.EVENT_READ, "control")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    due: list[tuple[float, int, socket.socket, tuple]] = []  # (when, seq, sock, item)
    seq = 0
    next_beat = time.monotonic() + interval
    stdin_fd = sys.stdin.fileno()
    sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
    while True:
        now = time.monotonic()
        timeout = min(next_beat, due[0][0] if due else next_beat) - now
        for key_, _ in sel.select(max(0.0, timeout)):
            sock = key_.fileobj
            if key_.data == "stdin":
                if not os.read(stdin_fd, 64):
                    return 0  # the benchmark is done
                continue
            if key_.data == "control":
                try:
                    sock.recv(65536)  # PINGs
                except BlockingIOError:
                    pass
                continue
            decoder = decoders[sock]
            try:
                got = sock.recv_into(decoder.recv_buffer())
            except BlockingIOError:
                continue
            if not got:
                return 0
            for frame in decoder.feed(got):
                if frame.kind != protocol.TASKS:
                    continue
                for task_id, attempt, *_ in protocol.read_task_items(frame.meta[2],
                                                                     frame.buffers):
                    seq += 1
                    heapq.heappush(due, (now + task_ms / 1000, seq, sock, (task_id, attempt)))
        now = time.monotonic()
        replies: dict[socket.socket, list] = {}
        while due and due[0][0] <= now:
            _, _, sock, (task_id, attempt) = heapq.heappop(due)
            replies.setdefault(sock, []).append((task_id, attempt))
        for sock, done in replies.items():
            buffers: list = []
            items = [protocol.result_item(t, a, protocol.RESULT_OK, payload, [], task_ms / 1000,
                                          None, buffers) for t, a in done]
            sock.setblocking(True)
            protocol.send_all_blocking(sock, protocol.encode_frame(protocol.RESULTS, (items,),
                                                                   buffers))
            sock.setblocking(False)
        if now >= next_beat:
            for ctrl in controls:
                try:
                    ctrl.send(protocol.BEAT)
                except (BlockingIOError, OSError):
                    pass
            next_beat = now + interval


# ----------------------------------------------------------------------------- measuring
def _thread_cpu(ident: int) -> float:
    """CPU seconds (user + system) of one thread of this process, to the nanosecond."""
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(n: int, tasks: int, task_ms: float, idle_s: float, heartbeat_timeout: float
            ) -> dict[str, float]:
    from distexec import DistributedExecutor

    ex = DistributedExecutor(max_workers=0, listen="127.0.0.1:0", key=os.urandom(32),
                             heartbeat_timeout=heartbeat_timeout)
    ex.start()
    manager = ex._manager
    assert manager is not None
    tid = manager.thread.ident
    assert tid is not None
    rss0 = _rss()
    t0 = time.monotonic()
    fleet = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--simulate", ex.address, ex.key.hex(),
         str(n), str(task_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE)
    try:
        assert fleet.stdout is not None
        if fleet.stdout.readline().strip() != b"ready":
            raise RuntimeError("the fleet did not start")
        ex.wait_for_workers(n, timeout=600)
        connect_s = time.monotonic() - t0
        rss_per_worker = (_rss() - rss0) / n
        # Idle: heartbeats only.
        cpu0, w0 = _thread_cpu(tid), time.monotonic()
        time.sleep(idle_s)  # measuring a duration: nothing to wait for but time
        idle_cpu = (_thread_cpu(tid) - cpu0) / (time.monotonic() - w0)
        beats_per_s = n * 5 / heartbeat_timeout
        # Tasks.
        sys.path.insert(0, HERE)
        import bench_tasks

        cpu0, w0 = _thread_cpu(tid), time.monotonic()
        futures = [ex.submit(bench_tasks.noop) for _ in range(tasks)]
        for f in futures:
            f.result(timeout=600)
        wall = time.monotonic() - w0
        task_cpu = (_thread_cpu(tid) - cpu0) / tasks
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        if fleet.stdin is not None:
            fleet.stdin.close()
        fleet.wait(60)
        ex.shutdown(wait=True)
    return {"connect_s": connect_s, "rss_per_worker_kib": rss_per_worker / 1024,
            "idle_core_pct": idle_cpu * 100,
            "us_per_beat": idle_cpu / beats_per_s * 1e6 if beats_per_s else float("nan"),
            "tasks_per_s": tasks / wall, "us_per_task": task_cpu * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simulate", nargs=4, metavar=("ADDRESS", "KEY", "N", "TASK_MS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--workers", default="2,8,32,128,1000")
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--task-ms", type=float, default=20.0,
                        help="how long each simulated task takes (default 20)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measurement")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0,
                        help="the executor's heartbeat_timeout (beats every 1/5 of it)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.simulate:
        address, key, n, task_ms = args.simulate
        return fleet_main(address, key, int(n), float(task_ms))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    sizes = [int(s) for s in args.workers.split(",")]
    cap = max(1, (limit - 200) // 2)
    print(f"file descriptors: soft limit raised to {limit} (hard {hard}); at most {cap} "
          f"workers per process (2 descriptors each, in the caller and in the fleet)")
    print(f"load average {os.getloadavg()}; {args.tasks} tasks of {args.task_ms:g} ms; "
          f"heartbeat every {args.heartbeat_timeout / 5:g} s; median of {args.repeat}")
    header = ("workers", "connect s", "KiB/worker", "idle %core", "µs/beat", "tasks/s",
              "µs/task")
    print("  ".join(f"{h:>10}" for h in header))
    for n in sizes:
        if n > cap:
            print(f"{n}: skipped, over the descriptor limit")
            continue
        runs = [measure(n, args.tasks, args.task_ms, args.idle, args.heartbeat_timeout)
                for _ in range(args.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print("  ".join(f"{v:>10.4g}" for v in (n, med["connect_s"], med["rss_per_worker_kib"],
                                                 med["idle_core_pct"], med["us_per_beat"],
                                                 med["tasks_per_s"], med["us_per_task"])),
              flush=True)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
