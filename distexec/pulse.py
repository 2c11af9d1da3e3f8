"""The pulse: heartbeats that need no GIL, and stack dumps taken with it.

A worker starts a tiny child interpreter (:func:`start_pulse`) that writes a NUL byte to the
control connection every heartbeat interval while the worker is not stopped, so that a task
holding the GIL in a C call keeps its worker alive, while a frozen (SIGSTOP) or unreachable
worker falls silent. :func:`stack_dump` is what the control thread sends when the task manager
asks where a task is (a time limit passed). Called by the worker's control thread.
"""

from __future__ import annotations

import logging
import os
import sys
import types

from . import protocol

logger = logging.getLogger("distexec.worker")

__all__ = ["PULSE_MARKER", "start_pulse", "stack_dump"]

# The pulse process (see _start_pulse). It runs with -I -S: no site, no user environment, only
# builtin and extension modules. fd 3 is the control socket, fd 4 the read end of a pipe that
# only this worker holds open (EOF: the worker is gone, even by SIGKILL or exec).
# argv: marker, worker pid, interval.
_PULSE_CODE = """\
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker (it leaves), not us
try:
    pid, interval = int(sys.argv[2]), float(sys.argv[3])
    stat = os.open("/proc/%d/stat" % pid, os.O_RDONLY)
    while not select.select([4], [], [], interval)[0]:
        if os.getppid() != pid:
            break
        state = os.pread(stat, 1024, 0).rpartition(b")")[2][1:2]
        if state in (b"T", b"t"):
            continue
        if not state or state in (b"Z", b"X"):
            break
        try:
            os.write(3, b"\\0")
        except (BlockingIOError, InterruptedError, TimeoutError):
            pass
except Exception:
    pass  # the worker notices that this process ended and says so
"""
PULSE_MARKER = "distexec-pulse"


def start_pulse(control_fd: int, interval: float, where: str) -> tuple[int, int] | None:
    """Start the pulse process that beats on ``control_fd`` every ``interval`` seconds while
    this process is not stopped; return its pid and the write end of its lifeline pipe (None if
    it could not start: heartbeats then come from the control thread alone, which needs the
    GIL)."""
    read_end, write_end = os.pipe()  # both close on exec: only this process holds write_end
    argv = [sys.executable, "-I", "-S", "-c", _PULSE_CODE, PULSE_MARKER, str(os.getpid()),
            repr(interval)]
    try:
        if not sys.executable:
            raise OSError("sys.executable is empty")
        pid = os.posix_spawn(sys.executable, argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, control_fd, 3), (os.POSIX_SPAWN_DUP2, read_end, 4)])
    except OSError as exc:
        os.close(write_end)
        logger.warning("%s: could not start its heartbeat process (%s); a task that holds the "
                       "GIL longer than heartbeat_timeout will be taken for a lost worker",
                       where, exc)
        return None
    finally:
        os.close(read_end)
    return pid, write_end


def stack_dump() -> bytes:
    """Every thread's stack, innermost call first, in faulthandler's text layout (ASCII, no NUL
    or ACK_MARK byte). Taken with the GIL held, through sys._current_frames(), which is safe
    where faulthandler's reading of running threads is not."""
    lines = []
    for ident, top in sys._current_frames().items():
        lines.append(f"Thread 0x{ident:016x} (most recent call first):")
        depth = 0
        frame: types.FrameType | None = top
        while frame is not None and depth < 100:
            code = frame.f_code
            line = frame.f_lineno if frame.f_lineno is not None else "???"
            lines.append(f'  File "{code.co_filename}", line {line} in {code.co_name}')
            frame = frame.f_back
            depth += 1
        lines.append("")
    text = "\n".join(lines) + "\n"
    return text.encode("ascii", "backslashreplace").replace(b"\0", b"?").replace(
        protocol.ACK_MARK, b"?")
