"""Local worker processes: fresh interpreters started with :mod:`subprocess`, never forked.

Each worker gets the key as the first line of its stdin; the pipe then stays open as the
worker's *lifeline*: when this process dies, however it dies, the kernel closes the pipe and the
worker exits at once. On Linux the task manager learns of a worker's exit through a pidfd that it
waits on with its sockets; elsewhere a small thread per process waits for it.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import site
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..protocol import PROGRESS
from .base import Launcher, WorkerProcess

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Hints for exit signals, shown to users when a worker dies.
_SIGNAL_HINTS = {
    "SIGKILL": "possibly out of memory (the kernel's OOM killer sends SIGKILL), or killed by hand",
    "SIGSEGV": "a segmentation fault, usually a bug in a C extension or ctypes code",
    "SIGBUS": "a bus error, e.g. a truncated memory-mapped file",
    "SIGABRT": "the process aborted, e.g. a failed C assertion or a fatal Python error",
    "SIGFPE": "an arithmetic fault in native code",
    "SIGTERM": "terminated by another process",
}


def describe_exit(code: int | None) -> str:
    """Human description of a process exit code as :attr:`subprocess.Popen.returncode` gives it."""
    if code is None:
        return "exit status unknown"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    hint = _SIGNAL_HINTS.get(name)
    return f"killed by signal {-code} ({name}: {hint})" if hint else f"killed by {name}"


def _needs_pythonpath(python: str) -> bool:
    """Whether the worker interpreter needs our package root on PYTHONPATH to import distexec."""
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        return True
    try:
        installed = {os.path.realpath(p) for p in site.getsitepackages()}
        installed.add(os.path.realpath(site.getusersitepackages()))
    except Exception:
        return True
    return os.path.realpath(_PACKAGE_ROOT) not in installed


# The worker writes (task id, attempt) of the task it is running into a small shared memory
# region (laid out as protocol.PROGRESS), and zeros when it is between tasks. Reading it after a
# crash tells exactly which task was running, at the cost of one memory store per task.


class LocalProcess(WorkerProcess):
    """Handle on one local worker process (owned by the task manager thread)."""

    local_child = True

    def __init__(
        self, worker_id: int, popen: subprocess.Popen[bytes], progress: mmap.mmap | None = None
    ) -> None:
        super().__init__(worker_id)
        self.popen = popen
        self.pid = popen.pid
        self._progress = progress
        self.exit_fd: int | None = None  # a pidfd, where the kernel has them
        if hasattr(os, "pidfd_open"):
            try:
                self.exit_fd = os.pidfd_open(popen.pid)
            except OSError:
                self.exit_fd = None

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait (bounded) for the exit; the exit code, or None if it is still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def running_task(self) -> tuple[int, int] | None:
        """(task id, attempt) the worker was running last, or None if between tasks/unknown."""
        if self._progress is None:
            return None
        task_id, attempt = PROGRESS.unpack_from(self._progress, 0)
        return (task_id, attempt) if task_id else None

    @property
    def reports_progress(self) -> bool:  # type: ignore[override]
        return self._progress is not None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker unless it has been reaped."""
        if self.popen.returncode is None:
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def watch(self, on_exit: Callable[[Any], None]) -> None:
        """Fallback when there is no pidfd: call ``on_exit(self)`` from a thread at exit."""

        def wait() -> None:
            self.popen.wait()
            on_exit(self)

        threading.Thread(
            target=wait, name=f"distexec-reaper-{self.worker_id}", daemon=True
        ).start()

    def close(self) -> None:
        """Release the pidfd and the lifeline pipe (the worker exits when the pipe closes)."""
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass


class LocalLauncher(Launcher):
    """Starts worker interpreters on this machine (the origin "local").

    Every worker gets, on its stdin (never in argv, which other users can read), the executor's
    key and then this process's multiprocessing authkey, so that it can use the proxies of this
    process's ``multiprocessing`` managers as a multiprocessing child could
    (see :mod:`distexec.mpobjects`).

    Args:
        python: interpreter to run; defaults to :data:`sys.executable`.
        env: extra environment variables for the workers.
        pass_fds: descriptors every worker inherits at the same numbers (those of
            multiprocessing objects in ``initargs``).
    """

    essential = True

    def __init__(self, python: str | None = None, env: Mapping[str, str] | None = None,
                 pass_fds: Sequence[int] = (), wanted: int = 0,
                 resources: Mapping[str, float | str] | None = None) -> None:
        super().__init__("local", wanted)
        self.host = os.uname().nodename if hasattr(os, "uname") else "localhost"
        self._resources = dict(resources) if resources else None
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.pass_fds = tuple(pass_fds)

    def resources(self) -> tuple[dict[str, float | str] | None, int | None]:
        return self._resources, self.wanted

    def describe_start(self) -> str:
        return self.python

    def command(self, address: str, worker_id: int, extra: Sequence[str] = ()) -> list[str]:
        return [
            self.python, "-m", "distexec.worker",
            "--connect", address, "--worker-id", str(worker_id), "--key-stdin",
            "--mp-authkey-stdin", *extra,
        ]

    def start(self, worker_id: int, address: str, key: bytes) -> LocalProcess:
        """Start one worker that connects to ``address``; raises OSError if it cannot start."""
        env = dict(os.environ)
        env.update(self.env)
        if _needs_pythonpath(self.python):
            parts = [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join(parts)
        progress_fd = _progress_fd(worker_id)
        extra = ["--progress-fd", str(progress_fd)] if progress_fd is not None else []
        cmd = self.command(address, worker_id, extra)
        try:
            popen = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, env=env, close_fds=True, cwd=os.getcwd(),
                pass_fds=self.pass_fds + ((progress_fd,) if progress_fd is not None else ()),
            )
        except BaseException:
            if progress_fd is not None:
                os.close(progress_fd)
            raise
        progress = None
        if progress_fd is not None:
            try:
                progress = mmap.mmap(progress_fd, PROGRESS.size)
            finally:
                os.close(progress_fd)
        assert popen.stdin is not None
        try:
            popen.stdin.write(key.hex().encode() + b"\n" + _mp_authkey().hex().encode() + b"\n")
            popen.stdin.flush()
        except OSError:
            pass  # it died already; its exit will be reported like any other
        logger.debug("started worker %d: pid %d: %s", worker_id, popen.pid, " ".join(cmd))
        return LocalProcess(worker_id, popen, progress)


def _mp_authkey() -> bytes:
    """This process's multiprocessing authkey (multiprocessing is imported already, by
    concurrent.futures.process, for the exception types)."""
    from multiprocessing import current_process

    return bytes(current_process().authkey)


def _progress_fd(worker_id: int) -> int | None:
    """A small anonymous shared file for the worker's progress, or None where unsupported."""
    create = getattr(os, "memfd_create", None)
    if create is None:
        return None
    try:
        fd: int = create(f"distexec-progress-{worker_id}", 0)
        os.ftruncate(fd, PROGRESS.size)
    except OSError:
        return None
    return fd
