"""Test helpers importable by workers too (tests/ is on the client's sys.path, which local
workers inherit; hand-started workers get it on PYTHONPATH). Functions here are pickled by
reference."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time


class Gate:
    """A barrier that tasks in other processes wait on, without sleeping.

    A task calls ``wait_gate(gate.address)``: it connects to the gate and blocks reading. The test
    learns that the task has arrived (:meth:`wait_arrivals`) and releases every waiting task
    (and any later one) with :meth:`open`.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = socket.create_server((host, 0))
        self.address = "%s:%d" % self._server.getsockname()[:2]
        self._cond = threading.Condition()
        self._held: list[socket.socket] = []
        self._arrived = 0
        self._open = False
        self._thread = threading.Thread(target=self._accept, name="test-gate", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._cond:
                self._arrived += 1
                if self._open:
                    conn.close()
                else:
                    self._held.append(conn)
                self._cond.notify_all()

    def wait_arrivals(self, n: int, timeout: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._arrived >= n, timeout):
                raise TimeoutError(f"only {self._arrived} of {n} tasks reached the gate")

    @property
    def arrived(self) -> int:
        with self._cond:
            return self._arrived

    def open(self) -> None:
        with self._cond:
            self._open = True
            for conn in self._held:
                conn.close()
            self._held.clear()

    def close(self) -> None:
        self.open()
        self._server.close()

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_gate(address: str, value: object = None) -> object:
    """Task: block until the gate opens, then return ``value``."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        while conn.recv(1):
            pass
    return value


def identity(x: object) -> object:
    return x


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def getpid(_: object = None) -> int:
    return os.getpid()


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


_init_value = None


def init_store(value: object) -> None:
    global _init_value
    _init_value = value


def init_read() -> object:
    return _init_value


def init_fail() -> None:
    raise ValueError("error in initializer")


def wait_for_pid_gone(pid: int, timeout: float) -> bool:
    """True once process ``pid`` is gone (bounded; uses psutil's event-driven wait)."""
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        pass
    return True


def now() -> float:
    return time.monotonic()


def hold_gil(seconds: float) -> int:
    """Task: block inside a C call *without releasing the GIL* (ctypes.PyDLL keeps it), so no
    Python thread of the worker can run meanwhile. Returns the worker's pid."""
    import ctypes

    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))
    return os.getpid()


def churn_threads(rounds: int) -> int:
    """Task: start and join short-lived threads and push deep Python call stacks, ``rounds``
    times; the mix under which reading other threads' frames without the GIL (as faulthandler's
    watchdog does) crashes a process. Returns the worker's pid."""
    import threading

    def down(n: int) -> int:
        return n if n < 1 else down(n - 1)

    for _ in range(rounds):
        thread = threading.Thread(target=down, args=(20,))
        thread.start()
        thread.join()
        for _ in range(100):
            down(30)
    return os.getpid()


def crash_once(marker: str, value: object) -> object:
    """Task: the first attempt kills its worker (and leaves a marker); a retry returns value."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def spin_square(x: int) -> int:
    """Task: about a millisecond of CPU, then x * x."""
    deadline = time.perf_counter() + 0.001
    while time.perf_counter() < deadline:
        pass
    return x * x


class LogWatch:
    """A logging handler that lets a test wait for a message (no sleeping, bounded)."""

    def __init__(self, logger_name: str = "distexec") -> None:
        import logging

        self._logging = logging
        self.records: list[str] = []
        self._cond = threading.Condition()
        self._handler = logging.Handler(level=logging.DEBUG)
        self._handler.emit = self._emit  # type: ignore[method-assign]
        self._logger = logging.getLogger(logger_name)
        self._old_level = self._logger.level

    def _emit(self, record) -> None:
        with self._cond:
            self.records.append(record.getMessage())
            self._cond.notify_all()

    def __enter__(self) -> "LogWatch":
        self._logger.addHandler(self._handler)
        self._logger.setLevel(self._logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._old_level)

    def matching(self, text: str) -> list[str]:
        with self._cond:
            return [r for r in self.records if text in r]

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: any(text in r for r in self.records), timeout):
                raise TimeoutError(f"no log message containing {text!r}; got {self.records}")
            return next(r for r in self.records if text in r)

    def wait_count(self, predicate, n: int, timeout: float = 30.0) -> list[str]:
        """Wait until at least ``n`` messages satisfy ``predicate``; return those messages."""
        with self._cond:
            if not self._cond.wait_for(lambda: sum(map(predicate, self.records)) >= n, timeout):
                raise TimeoutError(f"fewer than {n} matching log messages; got {self.records}")
            return [r for r in self.records if predicate(r)]


def worker_running(executor, future) -> object:
    """The WorkerInfo of the worker holding ``future``'s task (None if none)."""
    task_id = future._distexec_task_id
    for info in executor.workers():
        if task_id in info.held:
            return info
    return None


class Box:
    """A weak-referenceable result (to check that nothing keeps finished results alive)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


def make_box(n: int) -> Box:
    return Box(b"x" * n)


def occupy_local_and_hand_worker(executor, hand_workers, gate):
    """Start one hand worker next to the executor's one local worker and hold a task on each
    at ``gate``. Returns (the hand worker's Popen, the two futures, its WorkerInfo)."""
    executor.wait_for_workers(1, timeout=30)
    (proc,) = hand_workers(executor, 1)
    executor.wait_for_workers(2, timeout=30)
    futures = [executor.submit(wait_gate, gate.address, i) for i in range(2)]
    gate.wait_arrivals(2)
    remote = next(w for w in executor.workers() if not w.local)
    return proc, futures, remote


# -- issue 5: the task manager's toolbox ------------------------------------------------------
def count_calls(path: str) -> int:
    """Record one more call in ``path``; return how many calls came before this one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return os.path.getsize(path) - 1


def flaky(path: str, failures: int, exc_type: type = ConnectionError) -> int:
    """Raise ``exc_type`` on the first ``failures`` calls (counted in ``path``), then return
    the number of the call."""
    n = count_calls(path)
    if n < failures:
        raise exc_type(f"failure {n + 1}")
    return n


def log_run(path: str, label: object) -> object:
    """Append ``label`` to the run log ``path``; return it."""
    with open(path, "a") as fh:
        fh.write(f"{label}\n")
    return label


def read_log(path: str) -> list[str]:
    with open(path) as fh:
        return fh.read().split()


def where(_: object = None) -> tuple:
    import distexec

    w = distexec.current_worker()
    assert w is not None
    return (w.worker_id, w.origin, w.resources)


def decline_first(path: str) -> tuple:
    """Decline the first worker it lands on; return (declined worker, worker that ran it)."""
    import distexec

    me = distexec.current_worker()
    assert me is not None
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write(str(me.worker_id))
        distexec.decline(f"worker {me.worker_id} is not good enough")
    with open(path) as fh:
        return int(fh.read()), me.worker_id


def decline_always(reason: str) -> None:
    import distexec

    distexec.decline(reason)


def recover(exc: BaseException, *args: object) -> tuple:
    """A fallback: say what failed and with which arguments."""
    return ("recovered", type(exc).__name__, args)


def spin_until_killed(_: object = None) -> None:
    while True:
        pass


def failing_fallback(exc: BaseException, *args: object) -> None:
    raise ValueError(f"the fallback failed too (after {type(exc).__name__})")


def read_shared(name: str) -> object:
    import distexec

    return distexec.retrieve(name)


def shared_identity(table: object, i: int) -> tuple:
    """(worker pid, id of the table object, one item): the same id on one worker means the
    table came once, not with every task."""
    return (os.getpid(), id(table), table[i])  # type: ignore[index]


def fib(n: int) -> int:
    """Naive Fibonacci where every call above 1 is two child tasks: many nested waits."""
    if n < 2:
        return n
    import distexec

    ex = distexec.get_executor()
    a, b = ex.submit(fib, n - 1), ex.submit(fib, n - 2)
    return a.result() + b.result()


def children_map(n: int) -> list:
    import distexec

    return list(distexec.get_executor().options(tag="child").map(square, range(n)))


def child_raises(msg: str) -> None:
    import distexec

    distexec.get_executor().submit(raise_value_error, msg).result()


def parent_gated(address: str, marker: str) -> str:
    """Submit a child that waits at the gate; kill this worker on the first attempt once the
    child is submitted (the retry waits for the child normally)."""
    import distexec

    child = distexec.get_executor().submit(wait_gate, address, "child done")
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return child.result()


def outside_api() -> tuple:
    import distexec

    out = []
    for call in (lambda: distexec.retrieve("x"), distexec.get_executor):
        try:
            call()
        except RuntimeError as exc:
            out.append(str(exc))
    return tuple(out)


def decline_then_raise(path: str) -> None:
    """Decline the first worker; raise on the next one."""
    import distexec

    if not os.path.exists(path):
        with open(path, "w"):
            pass
        distexec.decline("first worker")
    raise ValueError("failed on the second worker")


def parent_of_poison(code: int) -> None:
    """Submit a child that kills its worker, and wait for it (runs inline with one worker)."""
    import distexec

    distexec.get_executor().submit(exit_now, code).result()
