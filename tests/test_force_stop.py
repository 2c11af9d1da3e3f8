"""terminate_workers() and kill_workers(): Python 3.14's ProcessPoolExecutor methods."""

from __future__ import annotations

import concurrent.futures

import pytest
from helpers import Gate, LogWatch, wait_gate, wait_for_pid_gone

from distexec import DistributedExecutor

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("method, exit_text", [("terminate_workers", "exit code 4"),
                                               ("kill_workers", "(SIGKILL")])
def test_stops_running_tasks_at_once_and_shuts_down(method, exit_text):
    with Gate() as gate, LogWatch("distexec") as log:
        ex = DistributedExecutor(max_workers=2)
        running = [ex.submit(wait_gate, gate.address, i) for i in range(2)]
        queued = [ex.submit(wait_gate, gate.address, i) for i in range(3)]
        gate.wait_arrivals(2)
        pids = [w.pid for w in ex.workers()]
        getattr(ex, method)()
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            ex.submit(pow, 2, 2)
        # The gate stays closed: only stopping the running tasks lets shutdown return.
        ex.shutdown(wait=True)
        assert all(wait_for_pid_gone(pid, 10) for pid in pids)
        done, _ = concurrent.futures.wait(running + queued, timeout=10)
        assert len(done) == 5 and all(f.cancelled() for f in running + queued)
        assert gate.arrived == 2
        exits = log.matching("left (")
        assert len(exits) == 2 and all(exit_text in m for m in exits), log.records


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_harmless_before_start_and_after_shutdown(method):
    ex = DistributedExecutor(max_workers=1)
    getattr(ex, method)()  # no worker was ever started
    with pytest.raises(RuntimeError):
        ex.submit(pow, 2, 2)
    ex.shutdown()
    with DistributedExecutor(max_workers=1) as ex:
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8
        ex.shutdown()
        getattr(ex, method)()
