"""Nothing is left behind: not after a with block, a shutdown, garbage collection, interpreter
exit, or a SIGKILL of the user's process. (The autouse leak check in conftest.py also applies.)"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from distexec import DistributedExecutor
from helpers import Gate, getpid, wait_for_pid_gone, wait_gate

pytestmark = pytest.mark.timeout(90)


def worker_pids(ex, n):
    """PIDs of the executor's workers (asks until n distinct ones answered)."""
    with Gate() as gate:
        futures = [ex.submit(_pid_after_gate, gate.address) for _ in range(n)]
        gate.wait_arrivals(n)
        gate.open()
        return {f.result() for f in futures}


def _pid_after_gate(address):
    wait_gate(address)
    return os.getpid()


def test_with_block_leaves_nothing():
    with DistributedExecutor(max_workers=2) as ex:
        pids = worker_pids(ex, 2)
    assert all(wait_for_pid_gone(p, 10) for p in pids)
    assert not [t for t in threading.enumerate() if t.name.startswith("distexec-")]


def test_exception_in_with_block_leaves_nothing():
    with pytest.raises(ZeroDivisionError):
        with DistributedExecutor(max_workers=2) as ex:
            pids = worker_pids(ex, 2)
            1 / 0
    assert all(wait_for_pid_gone(p, 10) for p in pids)


def test_keyboard_interrupt_in_with_block_stops_running_tasks():
    with Gate() as gate:
        with pytest.raises(KeyboardInterrupt):
            with DistributedExecutor(max_workers=1) as ex:
                running = ex.submit(wait_gate, gate.address)
                queued = ex.submit(getpid)
                gate.wait_arrivals(1)
                raise KeyboardInterrupt
        # The with block returned although the gate never opened: the task was stopped.
        assert running.cancelled() and queued.cancelled()


def test_shutdown_without_wait_then_exit_leaves_nothing():
    ex = DistributedExecutor(max_workers=2)
    pids = worker_pids(ex, 2)
    ex.shutdown(wait=False)
    assert all(wait_for_pid_gone(p, 10) for p in pids)


def test_garbage_collected_executor_leaves_nothing():
    ex = DistributedExecutor(max_workers=2)
    pids = worker_pids(ex, 2)
    del ex
    gc.collect()
    assert all(wait_for_pid_gone(p, 10) for p in pids)


SCRIPT_EXIT = """
import sys
from distexec import DistributedExecutor
ex = DistributedExecutor(max_workers=2)
pids = set(ex.map(lambda _: __import__("os").getpid(), range(50)))
futures = [ex.submit(pow, 2, i) for i in range(100)]
print(" ".join(map(str, sorted(pids))), flush=True)
# no shutdown: the interpreter must finish the work and stop the workers at exit
"""


def test_interpreter_exit_finishes_work_and_stops_workers(python_env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT_EXIT], env=python_env, timeout=60,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert pids
    assert all(wait_for_pid_gone(p, 10) for p in pids)


SCRIPT_KILLED = """
import os, sys
from distexec import DistributedExecutor
ex = DistributedExecutor(max_workers=2)
pids = set()
while len(pids) < 2:
    pids |= set(ex.map(lambda _: os.getpid(), range(200)))
print(" ".join(map(str, sorted(pids))), flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_workers_exit_when_the_client_is_sigkilled(python_env):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT_KILLED], env=python_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # Orphaned workers notice their lifeline closing and exit on their own.
        assert all(wait_for_pid_gone(p, 5) for p in pids)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()


SCRIPT_MAIN = textwrap.dedent("""
    from distexec import DistributedExecutor

    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    def norm2(p):
        return p.x * p.x + p.y * p.y

    scale = 10

    with DistributedExecutor(max_workers=2) as ex:
        print(list(ex.map(norm2, [Point(1, 2), Point(3, 4)])))
        print(ex.submit(lambda: Point(scale, 1)).result().x)
""")


def test_functions_and_classes_from_main_work_without_guard(python_env, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_MAIN)
    proc = subprocess.run([sys.executable, str(script)], env=python_env, timeout=60,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[5, 25]", "10"]
