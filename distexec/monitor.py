"""Named executors and ``distexec status``: a per-user registry and a status client.

An executor created with ``name="..."`` registers itself when its task manager starts, so that
``distexec status NAME``, run by the same user in another terminal of the same machine, can
find it and print its live statistics::

    executor process                                  distexec status NAME
    ----------------                                  --------------------
    Manager.__init__ -> register(name, address, key)
                        writes <registry>/NAME.json   lookup(NAME) reads it -> (address, key)
    task manager thread  <---- TCP, normal HMAC handshake, info["channel"] = "status"
                         ----> one STATUS frame: (status dict,), then closes      query()
    Manager teardown  -> unregister(path)                                   format_status()

The registry is a directory readable by its owner only (mode ``0700``), chosen by
:func:`registry_dir`: ``$DISTEXEC_RUNTIME_DIR`` if set, else ``$XDG_RUNTIME_DIR/distexec``
when that runtime directory exists and belongs to this user, else ``~/.cache/distexec/run``. A
directory that other users could read, or that belongs to someone else, is refused rather than
used: each registration holds the executor's key, and other users must see nothing. Each
registration is one JSON file, ``NAME.json``, mode ``0600``::

    {"name": "fit", "address": "127.0.0.1:40123", "key": "<hex>", "pid": 1234,
     "started": 1767225600.0}

Files are written to a temporary name and moved into place with :func:`os.replace`, so a
reader never sees half a file. Writers (register, unregister, removing a stale entry) hold an
:func:`fcntl.flock` on ``<registry>/.lock`` while they check and change a file, so two executors
starting with the same name cannot both win. A registration whose process is gone (it was
killed before it could unregister) is *stale*: it is removed when found, and its name is free.

The status connection is authenticated exactly like a worker's: whoever does not hold the key
learns nothing, and the manager proves it holds the key before the client unpickles its answer.

This module never imports the manager, the executor, the launchers or paramiko (the worker
module, for its handshake, only inside :func:`query`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import protocol
from .errors import DistexecError, HandshakeError, ProtocolError

logger = logging.getLogger(__name__)

__all__ = [
    "ExecutorGoneError",
    "RegistryError",
    "StatusError",
    "check_name",
    "format_status",
    "list_executors",
    "lookup",
    "query",
    "register",
    "registry_dir",
    "unregister",
]

RUNTIME_DIR_ENV = "DISTEXEC_RUNTIME_DIR"
NAME_MAX = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
# A status report is a few hundred bytes per worker; this bounds what a peer can make us
# allocate (a pool of tens of thousands of workers still fits).
MAX_STATUS_SIZE = 64 * 1024**2
_LOCK_NAME = ".lock"

# Registrations made by this process and not yet removed: path -> address. A file holding
# this process's pid is live only if it is listed here (else a former process had our pid).
_mine: dict[pathlib.Path, str] = {}
_mine_lock = threading.Lock()


class RegistryError(DistexecError):
    """The registry cannot be used: its directory is not private to this user, or a
    registration cannot be written. Not an :class:`OSError`, so that it is not mistaken for a
    failure to listen."""


class StatusError(DistexecError):
    """``distexec status`` could not get a report: the executor refused the key, is not a
    distexec executor, or did not answer in time. The message says which and what to do."""


class ExecutorGoneError(StatusError):
    """Nothing answers at the executor's address any more: it has stopped (or never ran)."""


# ---------------------------------------------------------------------------- names
def check_name(name: str) -> str:
    """Validate an executor name.

    Args:
        name: 1 to 64 characters among letters, digits, ``.``, ``_`` and ``-``, not starting
            with ``.`` (names become file names in the registry).

    Returns:
        ``name``, unchanged.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is empty, too long, starts with ``.`` or has another character.
    """
    if not isinstance(name, str):
        raise TypeError(f"an executor name must be a str, not {type(name).__name__}")
    if _NAME_RE.fullmatch(name) is None:
        if not name:
            problem = "it is empty"
        elif len(name) > NAME_MAX:
            problem = f"it has {len(name)} characters"
        elif name.startswith("."):
            problem = "it starts with '.'"
        else:
            bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
            problem = "it contains " + ", ".join(repr(c) for c in bad)
        raise ValueError(
            f"invalid executor name {name!r}: {problem}. A name has 1 to {NAME_MAX} characters "
            "among ASCII letters, digits, '.', '_' and '-', and does not start with '.'")
    return name


# ---------------------------------------------------------------------------- registry
def registry_dir() -> pathlib.Path:
    """The directory of this user's registrations, created (mode ``0700``) if missing.

    Returns:
        ``$DISTEXEC_RUNTIME_DIR`` if set; else ``$XDG_RUNTIME_DIR/distexec`` if
        ``$XDG_RUNTIME_DIR`` is a directory owned by this user; else ``~/.cache/distexec/run``.

    Raises:
        RegistryError: the directory belongs to another user or other users may access it.
        OSError: it cannot be created.
    """
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        path = pathlib.Path(override).expanduser()
    else:
        path = pathlib.Path("~/.cache/distexec/run").expanduser()
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime:
            try:
                st = os.stat(runtime)
            except OSError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                path = pathlib.Path(runtime) / "distexec"
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    else:
        os.chmod(path, 0o700)  # whatever the umask took away, the owner needs all of it
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RegistryError(f"the distexec registry {path} is not a directory; remove it, or "
                            f"set {RUNTIME_DIR_ENV} to a directory of your own")
    if st.st_uid != os.getuid():
        raise RegistryError(
            f"refusing to use the distexec registry {path}: it belongs to user id {st.st_uid}, "
            f"not to you (user id {os.getuid()}). Remove it, or set {RUNTIME_DIR_ENV} to a "
            "directory of your own")
    if st.st_mode & 0o077:
        raise RegistryError(
            f"refusing to use the distexec registry {path}: other users may access it (mode "
            f"{stat.S_IMODE(st.st_mode):04o}) and it holds executors' keys. Run "
            f"'chmod 700 {path}', or set {RUNTIME_DIR_ENV} to a private directory")
    return path


@contextlib.contextmanager
def _locked(directory: pathlib.Path) -> Iterator[None]:
    """Hold the registry's writer lock (any thread; blocks while another writer holds it)."""
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read(path: pathlib.Path) -> dict[str, Any] | None:
    """A registration as stored, or None if missing or not a well-formed registration."""
    try:
        with open(path, encoding="utf-8") as fh:
            entry = json.load(fh)
    except (OSError, ValueError):
        return None
    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("address"), str) and isinstance(entry.get("key"), str)
            and isinstance(entry.get("pid"), int)):
        return None
    try:
        bytes.fromhex(entry["key"])
    except ValueError:
        return None
    return entry


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (any thread)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    except OSError:
        return False
    try:  # Linux: a zombie has exited, though its parent has not reaped it yet
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return True
    return state != [b"Z"]


def _is_live(path: pathlib.Path, entry: dict[str, Any] | None) -> bool:
    """Whether ``entry`` (read from ``path``) belongs to an executor still running."""
    if entry is None:
        return False
    pid: int = entry["pid"]
    if pid == os.getpid():
        with _mine_lock:
            ours = _mine.get(path)
        return ours is not None and ours == entry["address"]
    return _pid_alive(pid)


def _live_entry(directory: pathlib.Path, path: pathlib.Path) -> dict[str, Any] | None:
    """The registration at ``path`` if live; a stale one is removed (any thread)."""
    entry = _read(path)
    if _is_live(path, entry):
        return entry
    if not path.exists():
        return None
    with _locked(directory):
        entry = _read(path)  # it may have been replaced since
        if _is_live(path, entry):
            return entry
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        logger.debug("removed the stale registration %s", path)
    return None


def register(name: str, address: str, key: bytes) -> pathlib.Path:
    """Register a running executor under ``name`` (the task manager calls this at start).

    Args:
        name: the executor's name (see :func:`check_name`).
        address: where its task manager listens, ``HOST:PORT``.
        key: its key.

    Returns:
        The registration file, to pass to :func:`unregister`.

    Raises:
        ValueError: ``name`` is invalid, or a running executor already has it.
        RegistryError: the registry directory is not private (see :func:`registry_dir`), or
            the registration cannot be written there.
    """
    check_name(name)
    try:
        return _register(name, address, key)
    except OSError as exc:
        raise RegistryError(f"cannot register the executor {name!r}: {exc}. Set "
                            f"{RUNTIME_DIR_ENV} to a private directory you can write") from exc


def _register(name: str, address: str, key: bytes) -> pathlib.Path:
    """Write the registration under the registry's lock (the task manager's first thread)."""
    directory = registry_dir()
    path = directory / f"{name}.json"
    record = {"name": name, "address": address, "key": key.hex(), "pid": os.getpid(),
              "started": time.time()}
    with _locked(directory):
        entry = _read(path)
        with _mine_lock:
            ours = _mine.get(path)
        if ours is not None:  # one of ours, even if someone deleted its file meanwhile
            entry = {"pid": os.getpid(), "address": ours}
        elif not _is_live(path, entry):
            entry = None
        if entry is not None:
            raise ValueError(
                f"an executor named {name!r} is already running (pid {entry['pid']}, at "
                f"{entry['address']}); choose another name or stop it")
        tmp = directory / f".{name}.json.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with _mine_lock:
            _mine[path] = address
    logger.debug("registered executor %r (%s) in %s", name, address, path)
    return path


def unregister(path: pathlib.Path) -> None:
    """Remove a registration made by :func:`register` in this process, unless another process
    has taken the name over since. Never raises (called from the task manager's teardown)."""
    try:
        path = pathlib.Path(path)
        with _mine_lock:
            address = _mine.pop(path, None)
        if address is None:
            return
        with _locked(path.parent):
            entry = _read(path)
            if entry is not None and entry["pid"] == os.getpid() \
                    and entry["address"] == address:
                path.unlink()
        logger.debug("unregistered %s", path)
    except Exception as exc:  # teardown must go on
        logger.debug("could not remove the registration %s: %r", path, exc)


def list_executors() -> list[dict[str, Any]]:
    """The live registrations of this user on this machine, sorted by name.

    Returns:
        One dict per running named executor, as stored: ``name``, ``address``, ``key``
        (hexadecimal), ``pid`` and ``started`` (seconds since the epoch). Stale registrations
        found on the way are removed.

    Raises:
        RegistryError: the registry directory is not private (see :func:`registry_dir`).
        OSError: it cannot be created or read.
    """
    directory = registry_dir()
    found = []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("."):
            continue
        entry = _live_entry(directory, path)
        if entry is not None:
            found.append(entry)
    return found


def _describe(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "none are running"
    listed = ", ".join(f"{e['name']} (pid {e['pid']}, at {e['address']})" for e in entries)
    return f"running: {listed}"


def lookup(name: str) -> tuple[str, bytes]:
    """Find a running executor by name.

    Returns:
        Its ``(address, key)``.

    Raises:
        LookupError: no running executor has this name; the message lists those that run.
        ValueError: ``name`` is not a valid name.
        RegistryError: the registry directory is not private (see :func:`registry_dir`).
        OSError: it cannot be created or read.
    """
    check_name(name)
    directory = registry_dir()
    entry = _live_entry(directory, directory / f"{name}.json")
    if entry is None:
        raise LookupError(
            f"no executor named {name!r} is running on this machine for this user; "
            f"{_describe(list_executors())}")
    return entry["address"], bytes.fromhex(entry["key"])


# ---------------------------------------------------------------------------- status client
def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def query(address: str, key: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the executor whose task manager listens at ``address`` for its live statistics.

    Args:
        address: ``HOST:PORT`` (an IPv6 host in square brackets).
        key: the executor's key.
        timeout: bound, in seconds, on connecting and on each read.

    Returns:
        The status report, plain data: ``name``, ``address``, ``pid``, ``uptime``, ``state``,
        ``max_workers``, ``tags`` (rows of tag repr or None, waiting, running, finished,
        failed, cancelled) and ``workers`` (one dict per worker).

    Raises:
        ValueError: ``address`` is not ``HOST:PORT``.
        ExecutorGoneError: nothing listens at ``address`` (the executor has stopped), or it
            closed the connection before answering.
        StatusError: the key was refused, the peer is not a distexec executor, or it did not
            answer within ``timeout``.
    """
    from .worker_client import client_handshake, worker_info

    host, port = _split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise ExecutorGoneError(f"no executor answers at {address}: connection refused — "
                                "it may have stopped") from None
    except TimeoutError:
        raise StatusError(f"no executor answers at {address}: no connection within "
                          f"{timeout:g} s") from None
    except OSError as exc:
        raise StatusError(f"cannot reach {address}: {exc}") from None
    with sock:
        info = worker_info(None)
        info["channel"] = "status"
        try:
            client_handshake(sock, key, info)
            return _read_status(sock, address)
        except HandshakeError as exc:
            if "authentication failed" in str(exc):
                raise StatusError(
                    f"{address} refused the key: it is not the key of the executor listening "
                    "there (check --key-file or DISTEXEC_KEY)") from None
            raise StatusError(f"{address} refused the status request: {exc}") from None
        except ProtocolError as exc:
            raise StatusError(f"{address} is not a distexec executor of this version: "
                              f"{exc}") from None
        except TimeoutError:
            raise StatusError(f"the executor at {address} did not answer within "
                              f"{timeout:g} s") from None
        except ConnectionError as exc:
            raise ExecutorGoneError(f"the executor at {address} closed the connection before "
                                    f"answering ({exc}) — it may be stopping") from None
        except OSError as exc:
            raise StatusError(f"lost the connection to {address}: {exc}") from None


def _read_status(sock: socket.socket, address: str) -> dict[str, Any]:
    """Read the one STATUS frame the manager sends after the handshake (caller's thread)."""
    decoder = protocol.FrameDecoder(MAX_STATUS_SIZE)
    while True:
        n = sock.recv_into(decoder.recv_buffer())
        if n == 0:
            raise ConnectionError("end of stream")
        frames = decoder.feed(n)
        if frames:
            break
    frame = frames[0]
    if frame.kind != protocol.STATUS or not frame.meta or not isinstance(frame.meta[0], dict):
        raise ProtocolError(f"expected a STATUS frame, got {protocol.KIND_NAMES[frame.kind]}")
    report: dict[str, Any] = frame.meta[0]
    return report


# ---------------------------------------------------------------------------- formatting
def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell, separated by two spaces; ``right`` aligned right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_status(status: dict[str, Any]) -> str:
    """Render a status report (from :func:`query`) as text for a terminal.

    Returns:
        Lines, without colours and without a final newline: a header (name, address, pid,
        uptime, state, local worker target), a table of task counts per tag with a total row,
        and a table of workers (what each is running, how many tasks it finished, how long ago
        it was last heard from). The same report always gives the same text.
    """
    name = status.get("name")
    title = f"executor {name!r}" if name else "executor (unnamed)"
    lines = [
        f"{title} at {status.get('address', '?')}, pid {_cell(status.get('pid'))}, "
        f"up {_duration(status.get('uptime', 0.0))}, {status.get('state', '?')}, "
        f"max_workers {_cell(status.get('max_workers'))}",
        "",
    ]
    columns = ["waiting", "running", "finished", "failed", "cancelled"]
    tags = status.get("tags") or []
    if tags:
        totals = [0] * len(columns)
        rows = []
        for tag, *counts in tags:
            rows.append(["(no tag)" if tag is None else str(tag), *map(str, counts)])
            totals = [t + int(c) for t, c in zip(totals, counts, strict=False)]
        rows.append(["total", *map(str, totals)])
        lines += _table(["tag", *columns], rows, right=set(range(1, len(columns) + 1)))
    else:
        lines.append("no tasks yet")
    lines.append("")
    workers = status.get("workers") or []
    if workers:
        rows = []
        for w in workers:
            age = w.get("last_heartbeat_age")
            rows.append([
                _cell(w.get("worker_id")), _cell(w.get("origin")), _cell(w.get("host")),
                _cell(w.get("pid")), _cell(w.get("state")), _cell(w.get("running")),
                str(len(w.get("held") or ())), _cell(w.get("tasks_done")),
                "-" if age is None else f"{age:.1f} s ago",
            ])
        lines += _table(["worker", "origin", "host", "pid", "state", "running", "held", "done",
                         "heartbeat"], rows, right={0, 3, 5, 6, 7})
    else:
        lines.append("no workers")
    return "\n".join(lines)
