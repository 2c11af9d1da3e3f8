"""The fault matrix: every way a task's journey can go wrong, one case each.

Errors and exits at pickle and unpickle time, for the task (in the task manager, on the worker)
and for the result (on the worker, in the task manager); messages over the size limit both
ways; junk and slow peers on the port; workers killed at each stage of their life. Each case is
bounded in time, asserts the exact error the caller sees, and then that the executor still
works (and whether the worker survived). In the spirit of CPython's
test_concurrent_futures/test_deadlock.py, which does this for ProcessPoolExecutor.

Not in the matrix because no process can survive it: ``os._exit()`` (or a crash) while the
*calling* process pickles or unpickles, which ends the caller itself, with any executor.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from distexec import (DistributedExecutor, MessageTooLargeError, TaskPicklingError,
                      TaskUnpicklingError, WorkerLostError)
from helpers import Gate, getpid, identity, wait_gate

pytestmark = pytest.mark.timeout(90)

LIMIT = 1 << 20


# -------------------------------------------------------------- what the faults are made of
def misbehave(how: str, arg: Any = None) -> Any:
    """Runs where an object is pickled or unpickled: the fault itself."""
    if how == "raise":
        raise ValueError("broken state")
    if how == "exit":
        sys.exit(7)
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "os_exit":
        os._exit(9)
    if how == "block":
        return wait_gate(arg)  # a blocking socket read: interruptible
    if how == "block_hard":
        # A handler of the object's own for the watchdog's signal, which does not raise: the
        # read is retried after the signal and stays blocked.
        signal.signal(signal.SIGUSR1, lambda *a: None)
        return wait_gate(arg)
    raise AssertionError(how)


class OnUnpickle:
    """Pickles fine; misbehaves where it is unpickled."""

    def __init__(self, how: str, arg: Any = None) -> None:
        self.how, self.arg = how, arg

    def __reduce__(self) -> Any:
        return misbehave, (self.how, self.arg)


class OnPickle:
    """Misbehaves where it is pickled."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Any:
        misbehave(self.how)
        raise AssertionError("not reached")


class CallableWith:
    """A task function (pickled with every task) that carries ``state``."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self) -> int:
        return 1


def returns_on_pickle(how: str) -> OnPickle:
    return OnPickle(how)


def returns_on_unpickle(how: str) -> OnUnpickle:
    return OnUnpickle(how)


def returns_lock() -> Any:
    return threading.Lock()


def returns_bytes(n: int) -> bytes:
    return b"r" * n


def signal_and_wait(address: str) -> int:
    """Task: tell the test it runs (gate arrival), wait until released, return the pid."""
    wait_gate(address)
    return os.getpid()


def init_wait_gate(address: str) -> None:
    wait_gate(address)


# -------------------------------------------------------------------------- the cases
@dataclass
class Case:
    name: str
    submit: Callable[[DistributedExecutor, Gate], Any]  # returns a future
    error: type[BaseException] | None  # None: the task must succeed
    match: str | None = None  # a regular expression the error's message must contain
    worker_survives: bool = True
    options: dict[str, Any] = field(default_factory=dict)


def _unpickle_arg(how: str) -> Callable[[DistributedExecutor, Gate], Any]:
    return lambda ex, gate: ex.submit(identity, OnUnpickle(how, gate.address))


CASES = [
    # --- the task, pickled in the task manager
    Case("task: unpicklable argument", lambda ex, g: ex.submit(identity, threading.Lock()),
         TaskPicklingError, r"its arguments could not be pickled: TypeError"),
    Case("task: argument raises when pickled", lambda ex, g: ex.submit(identity,
                                                                        OnPickle("raise")),
         TaskPicklingError, r"its arguments could not be pickled: ValueError: broken state"),
    Case("task: argument exits when pickled", lambda ex, g: ex.submit(identity,
                                                                       OnPickle("exit")),
         TaskPicklingError, r"its arguments could not be pickled: SystemExit"),
    Case("task: argument raises KeyboardInterrupt when pickled",
         lambda ex, g: ex.submit(identity, OnPickle("interrupt")),
         TaskPicklingError, r"its arguments could not be pickled: KeyboardInterrupt"),
    Case("task: unpicklable function", lambda ex, g: ex.submit(CallableWith(threading.Lock())),
         TaskPicklingError, r"its function could not be pickled: TypeError"),
    # --- the task, unpickled on the worker
    Case("task: argument raises when unpickled", _unpickle_arg("raise"),
         ValueError, r"broken state"),
    Case("task: function raises when unpickled",
         lambda ex, g: ex.submit(CallableWith(OnUnpickle("raise"))), ValueError, r"broken state"),
    Case("task: argument exits when unpickled", _unpickle_arg("exit"), SystemExit, r"7"),
    Case("task: argument raises KeyboardInterrupt when unpickled", _unpickle_arg("interrupt"),
         KeyboardInterrupt),
    Case("task: argument kills the worker when unpickled", _unpickle_arg("os_exit"),
         WorkerLostError, r"exit code 9", worker_survives=False),
    Case("task: argument blocks when unpickled", _unpickle_arg("block"),
         TaskUnpicklingError, r"did not finish within unpickle_timeout=1 s.*Manager.*The "
         r"worker is replaced", worker_survives=False),
    Case("task: argument blocks uninterruptibly when unpickled", _unpickle_arg("block_hard"),
         TaskUnpicklingError, r"could not be interrupted there, so the worker was restarted",
         worker_survives=False),
    # --- the result, pickled on the worker
    Case("result: unpicklable", lambda ex, g: ex.submit(returns_lock),
         TaskPicklingError, r"the result of task \d+ .*could not be pickled: TypeError"),
    Case("result: raises when pickled", lambda ex, g: ex.submit(returns_on_pickle, "raise"),
         TaskPicklingError, r"could not be pickled: ValueError: broken state"),
    Case("result: exits when pickled", lambda ex, g: ex.submit(returns_on_pickle, "exit"),
         TaskPicklingError, r"could not be pickled: SystemExit"),
    Case("result: kills the worker when pickled",
         lambda ex, g: ex.submit(returns_on_pickle, "os_exit"),
         WorkerLostError, r"exit code 9", worker_survives=False),
    # --- the result, unpickled in the task manager
    Case("result: raises when unpickled", lambda ex, g: ex.submit(returns_on_unpickle, "raise"),
         TaskUnpicklingError, r"could not be unpickled here: ValueError: broken state"),
    Case("result: exits when unpickled", lambda ex, g: ex.submit(returns_on_unpickle, "exit"),
         TaskUnpicklingError, r"could not be unpickled here: SystemExit"),
    Case("result: raises KeyboardInterrupt when unpickled",
         lambda ex, g: ex.submit(returns_on_unpickle, "interrupt"),
         TaskUnpicklingError, r"could not be unpickled here: KeyboardInterrupt"),
    # --- over the size limit, both ways
    Case("task: argument over max_message_size", lambda ex, g: ex.submit(len, b"a" * 2 * LIMIT),
         MessageTooLargeError, rf"arguments .* max_message_size={LIMIT}"),
    Case("result: over max_message_size", lambda ex, g: ex.submit(returns_bytes, 2 * LIMIT),
         MessageTooLargeError, rf"the result of task \d+ .* max_message_size={LIMIT}"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case):
    with DistributedExecutor(max_workers=1, max_retries=1, unpickle_timeout=1,
                             max_message_size=LIMIT, **case.options) as ex, Gate() as gate:
        pid = ex.submit(getpid).result(timeout=30)
        future = case.submit(ex, gate)
        if case.error is None:
            future.result(timeout=60)
        else:
            with pytest.raises(case.error, match=case.match) as info:
                future.result(timeout=60)
            assert type(info.value) is case.error, repr(info.value)
        gate.open()
        # The executor still works, with the same worker unless the fault ended it.
        assert ex.submit(identity, 42).result(timeout=30) == 42
        after = ex.submit(getpid).result(timeout=30)
        assert (after == pid) is case.worker_survives, (pid, after)


def test_fault_notes_say_where_unpickling_failed():
    with DistributedExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError) as info:
            ex.submit(identity, OnUnpickle("raise")).result(timeout=30)
    notes = getattr(info.value, "__notes__", [])
    assert any("raised while unpickling task" in n for n in notes), notes


def test_fault_blocked_unpickling_shows_where_it_was_stuck():
    with DistributedExecutor(max_workers=1, unpickle_timeout=1) as ex, Gate() as gate:
        future = ex.submit(identity, OnUnpickle("block", gate.address))
        with pytest.raises(TaskUnpicklingError) as info:
            future.result(timeout=60)
    text = "".join(__import__("traceback").format_exception(info.value))
    assert "wait_gate" in text and "misbehave" in text, text


def test_fault_manager_proxy_of_a_frozen_manager_fails_instead_of_hanging():
    """The original report: a spawn-context Manager proxy hung its future. With the manager
    process stopped, rebuilding the proxy on the worker blocks on the manager's socket."""
    manager = multiprocessing.get_context("spawn").Manager()
    try:
        shared = manager.dict(a=1)
        with DistributedExecutor(max_workers=1, unpickle_timeout=1) as ex:
            assert ex.submit(len, shared).result(timeout=60) == 1  # a live manager: works
            os.kill(manager._process.pid, signal.SIGSTOP)
            try:
                with pytest.raises(TaskUnpicklingError, match="Manager proxy"):
                    ex.submit(len, shared).result(timeout=60)
            finally:
                os.kill(manager._process.pid, signal.SIGCONT)
            assert ex.submit(len, shared).result(timeout=60) == 1
    finally:
        manager.shutdown()


def worker_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


def test_fault_no_unpickle_timeout_means_no_watchdog():
    with DistributedExecutor(max_workers=1) as ex:
        assert "distexec-watchdog" in ex.submit(worker_threads).result(timeout=30)
    with DistributedExecutor(max_workers=1, unpickle_timeout=None) as ex, Gate() as gate:
        assert "distexec-watchdog" not in ex.submit(worker_threads).result(timeout=30)
        future = ex.submit(identity, OnUnpickle("block", gate.address))
        gate.wait_arrivals(1)
        assert not future.done()
        gate.open()  # released: unpickling completes and returns what wait_gate returned
        assert future.result(timeout=30) is None


# ------------------------------------------------------------- junk and slow peers on the port
def test_fault_junk_and_slow_peers_do_not_disturb_a_running_task():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        pid = ex.submit(getpid).result(timeout=30)
        future = ex.submit(signal_and_wait, gate.address)
        gate.wait_arrivals(1)
        host, _, port = ex.address.rpartition(":")
        slow = socket.create_connection((host, int(port)))  # half a handshake, then nothing
        slow.sendall(b"DXEW" + struct.pack("!HH", 1, 2000))
        for junk in (b"", os.urandom(300), b"GET / HTTP/1.0\r\n\r\n", b"\0" * 70000):
            with socket.create_connection((host, int(port))) as s:
                try:
                    s.sendall(junk)
                except OSError:
                    pass  # refused half way: fine
        gate.open()
        assert future.result(timeout=30) == pid
        assert ex.submit(getpid).result(timeout=30) == pid
        slow.close()


# -------------------------------------------------------- workers killed at each stage of life
def _worker() -> psutil.Process:
    (proc,) = [p for p in psutil.Process().children()
               if "distexec.worker" in " ".join(p.cmdline())]
    return proc


def test_fault_worker_killed_in_its_initializer():
    gate = Gate()
    try:
        with DistributedExecutor(max_workers=1, initializer=init_wait_gate,
                                 initargs=(gate.address,)) as ex:
            ex.start()
            gate.wait_arrivals(1)
            _worker().kill()
            gate.wait_arrivals(2)  # its replacement runs the initializer
            gate.open()
            assert ex.submit(identity, 1).result(timeout=60) == 1
    finally:
        gate.close()


def test_fault_worker_killed_while_idle():
    with DistributedExecutor(max_workers=1) as ex:
        pid = ex.submit(getpid).result(timeout=30)
        psutil.Process(pid).kill()
        assert ex.submit(getpid).result(timeout=60) != pid


def test_fault_worker_killed_while_running_a_task():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        future = ex.submit(signal_and_wait, gate.address)
        gate.wait_arrivals(1)
        first = _worker().pid
        gate.open()  # the re-run passes at once
        psutil.Process(first).kill()
        # Either the task finished before the kill landed, or it ran again on the replacement.
        assert future.result(timeout=60) in (first, ex.submit(getpid).result(timeout=60))


def test_fault_worker_killed_while_unpickling_a_task():
    with DistributedExecutor(max_workers=1) as ex, Gate() as gate:
        pid = ex.submit(getpid).result(timeout=30)
        future = ex.submit(identity, OnUnpickle("block", gate.address))
        gate.wait_arrivals(1)
        psutil.Process(pid).kill()
        gate.wait_arrivals(2)  # the replacement unpickles the task again
        gate.open()
        assert future.result(timeout=60) is None
        assert ex.submit(getpid).result(timeout=30) != pid


def test_fault_worker_killed_while_draining():
    """max_tasks_per_child=1: after its task the worker drains and is replaced; killed then,
    it costs nothing."""
    with DistributedExecutor(max_workers=1, max_tasks_per_child=1) as ex:
        first = ex.submit(getpid).result(timeout=60)
        try:
            psutil.Process(first).kill()
        except psutil.NoSuchProcess:
            pass  # already gone
        assert ex.submit(getpid).result(timeout=60) != first
        assert ex.submit(identity, 5).result(timeout=60) == 5
