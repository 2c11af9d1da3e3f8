"""Workers on other machines, started over SSH with paramiko (imported here only, lazily).

One :class:`SSHHost` per host in the hosts list. Its ``distexec-launch-<host>`` thread does
everything that blocks: it connects (honouring ``~/.ssh/config``, the agent and
``known_hosts``), checks the remote interpreter and package versions, copies distexec and its
pure-Python dependencies over SFTP when they are missing or of another version there, asks
sshd for a *remote port forward*, and then executes the task manager's requests: start a
worker, kill a worker. Its ``distexec-tunnel-<host>`` thread moves bytes: each connection a
worker opens to the forwarded port on its host arrives here as an SSH channel and is joined to
a TCP connection to the task manager's loopback listener; the workers' stdout and stderr come
back on their exec channels and go to the ``distexec.remote`` logger, line by line, prefixed
with the worker and host.

So nothing listens anywhere but on loopback: the task manager on this machine's 127.0.0.1 and
sshd's forward on the remote host's 127.0.0.1. (With ``tunnel=False`` workers connect straight
to the task manager's ``listen`` address instead.) Either way the distexec handshake
authenticates both ends with the executor's key; the tunnel adds SSH's encryption.

Cleanup: every worker runs with no pty and reads its key from stdin, then watches stdin: when
the channel closes (executor shut down, SSH connection lost, this process killed) the worker
exits. A worker that stops hearing from the task manager (a partition sshd does not notice)
exits on its own after ``heartbeat_timeout``. A kill request runs ``kill -KILL PID`` on the host
and closes the channel.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import selectors
import shlex
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._version import mismatches, versions
from .base import Launcher, WorkerProcess
from .hosts import HostSpec, resources_from_settings

logger = logging.getLogger(__name__)
remote_logger = logging.getLogger("distexec.remote")

__all__ = ["HostError", "SSHHost", "SSHOptions", "SSHProcess", "check_hosts", "probe_host"]

# The remote side's Python must run this to describe itself (one JSON line on stdout).
_PROBE = r"""
import json, os, socket, sys
out = {"python": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable,
       "host": socket.gethostname(), "cpus": len(os.sched_getaffinity(0))
       if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)}
for name in ("cloudpickle", "tblib", "distexec"):
    try:
        module = __import__(name)
        out[name] = getattr(module, "__version__", "unknown")
    except Exception as exc:
        out[name] = None
print(json.dumps(out))
"""
# Seconds without any answer from a host's TCP connection before the connection is given up
# (TCP_USER_TIMEOUT): how fast a partitioned or powered-off host is noticed.
DEAD_PEER_TIMEOUT = 15.0
KEEPALIVE_INTERVAL = 5


class HostError(Exception):
    """A host cannot be used; the message names the host, what went wrong and what to do."""


@dataclass(frozen=True)
class SSHOptions:
    """How to reach the hosts (constructor arguments of the executor)."""

    ssh_config: str | None = None  # default ~/.ssh/config when it exists
    known_hosts: str | None = None  # extra known_hosts file
    accept_new_host_keys: bool = False
    connect_timeout: float = 15.0
    tunnel: bool = True
    python: str | None = None  # default interpreter on every host (default: ours)
    install: bool = True  # copy distexec & co. over SFTP when missing or of another version


def check_hosts(specs: list[HostSpec], options: SSHOptions,
                timeout: float = 30.0) -> list[dict[str, Any]]:
    """Check every host in parallel, as the executor would before starting workers there.

    Returns one row per host: ``host``, ``ok``, ``python``, ``cloudpickle``, ``tblib``,
    ``distexec`` (what the host's interpreter imports; None if missing), ``slots``, ``rtt_ms``
    (an SSH round trip), ``problem`` (what is wrong and what to do, or "").
    """
    here = versions()
    rows: list[dict[str, Any]] = [{} for _ in specs]

    def check(index: int, spec: HostSpec) -> None:
        row: dict[str, Any] = {"host": spec.label, "ok": False, "python": None,
                               "cloudpickle": None, "tblib": None, "distexec": None,
                               "slots": spec.slots, "rtt_ms": None,
                               "problem": "no answer in time"}
        rows[index] = row
        client = None
        try:
            client = connect(spec, options)
            transport = client.get_transport()
            start = time.perf_counter()
            transport.open_session(timeout=timeout).close()  # one round trip: open, confirm
            row["rtt_ms"] = (time.perf_counter() - start) * 1000
            python = spec.python or options.python or sys.executable
            info = probe_host(client, python, None, timeout)
            for name in ("python", "cloudpickle", "tblib", "distexec"):
                row[name] = info.get(name)
            row["slots"] = spec.slots or info.get("cpus")
            problems = mismatches(here, info)
            row["problem"] = ""
            if any(p.startswith("Python") for p in problems):
                row["problem"] = (f"{problems[0]}: set python=/path/to/python"
                                  f"{here['python'].rsplit('.', 1)[0]} for this host")
            else:
                row["ok"] = True
                if problems:
                    row["problem"] = ("; ".join(problems) + " (fine: copied into "
                                      "~/.cache/distexec there at start)")
        except HostError as exc:
            row["problem"] = str(exc).removeprefix(f"{spec.label}: ")
        except Exception as exc:
            row["problem"] = f"{type(exc).__name__}: {exc}"
        finally:
            if client is not None:
                close_client(client)

    threads = [threading.Thread(target=check, args=(i, spec), daemon=True,
                                name=f"distexec-check-{spec.label}")
               for i, spec in enumerate(specs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + options.connect_timeout + 5)
    return rows


class _RecordingPolicy:
    """Missing host key policy: remember the key (for the message), then refuse or accept."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.seen: Any = None

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        self.seen = key
        if self.accept:
            logger.warning("accepting the unknown host key of %s: %s %s", hostname,
                           key.get_name(), key.fingerprint)
            client.get_host_keys().add(hostname, key.get_name(), key)
            return
        import paramiko

        raise paramiko.SSHException(f"unknown host key for {hostname}")


def _host_config(spec: HostSpec, options: SSHOptions) -> dict[str, Any]:
    import paramiko

    path = options.ssh_config or os.path.expanduser("~/.ssh/config")
    config = paramiko.SSHConfig()
    if os.path.exists(path):
        config = paramiko.SSHConfig.from_path(path)
    found = dict(config.lookup(spec.host))
    if spec.user:
        found["user"] = spec.user
    if spec.port is not None:
        found["port"] = str(spec.port)
    if "user" not in found:
        import getpass

        found["user"] = getpass.getuser()
    found.setdefault("port", "22")
    return found


def _open_socket(hostname: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((hostname, port), timeout=timeout)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        int(DEAD_PEER_TIMEOUT * 1000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Small messages (a task, a result) must not wait for Nagle's algorithm: 40 ms otherwise.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(spec: HostSpec, options: SSHOptions, _depth: int = 0) -> Any:
    """Log in to a host; return a connected ``paramiko.SSHClient``. Raises :class:`HostError`."""
    import paramiko

    cfg = _host_config(spec, options)
    hostname, port, user = cfg.get("hostname", spec.host), int(cfg["port"]), cfg["user"]
    where = f"{spec.label} ({user}@{hostname}:{port})"
    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys()
    except OSError:
        pass
    for path in (cfg.get("userknownhostsfile", "").split() + [options.known_hosts or ""]):
        path = os.path.expanduser(path)
        if path and os.path.exists(path):
            client.load_host_keys(path)
    policy = _RecordingPolicy(options.accept_new_host_keys)
    client.set_missing_host_key_policy(policy)
    sock: Any = None
    jumper: Any = None
    try:
        if "proxyjump" in cfg and _depth < 4:
            jump = cfg["proxyjump"].split(",")[0].strip()
            from .hosts import parse_host

            jump_spec = parse_host(jump) or HostSpec(jump)
            jumper = connect(jump_spec, options, _depth + 1)
            try:
                sock = jumper.get_transport().open_channel("direct-tcpip", (hostname, port),
                                                           ("127.0.0.1", 0))
            except Exception as exc:
                close_client(jumper)
                raise HostError(f"{where}: the jump host {jump} cannot reach it: {exc}") from exc
        elif "proxycommand" in cfg:
            sock = paramiko.ProxyCommand(cfg["proxycommand"])
        else:
            sock = _open_socket(hostname, port, options.connect_timeout)
    except HostError:
        raise
    except OSError as exc:
        raise HostError(f"{where}: cannot connect: {exc}. Check that the host is up and "
                        "reachable and that sshd listens on that port") from exc
    def transport_factory(sock: Any, **kwargs: Any) -> Any:
        # Prefer AES-GCM (one pass for encryption and integrity: measurably faster for large
        # payloads through paramiko); the others stay as fallbacks.
        transport = paramiko.Transport(sock, **kwargs)
        options = transport.get_security_options()
        gcm = [c for c in options.ciphers if "gcm" in c]
        options.ciphers = tuple(gcm + [c for c in options.ciphers if c not in gcm])
        return transport

    identities = [os.path.expanduser(p) for p in cfg.get("identityfile", [])]
    only = cfg.get("identitiesonly", "no").lower() == "yes"
    try:
        client.connect(
            hostname, port, username=user, sock=sock, timeout=options.connect_timeout,
            banner_timeout=options.connect_timeout, auth_timeout=options.connect_timeout,
            key_filename=[p for p in identities if os.path.exists(p)] or None,
            allow_agent=not only, look_for_keys=not only and not identities,
            transport_factory=transport_factory)
    except paramiko.AuthenticationException as exc:
        client.close()
        if jumper is not None:
            close_client(jumper)
        raise HostError(f"{where}: login refused ({exc}). Check the user name and that your "
                        "key (ssh-agent or IdentityFile) is in the host's authorized_keys; "
                        f"'ssh {user}@{hostname} -p {port} true' must work without a "
                        "password") from exc
    except paramiko.SSHException as exc:
        client.close()
        if jumper is not None:
            close_client(jumper)
        if "No authentication methods" in str(exc):
            raise HostError(f"{where}: no key to log in with: load one into ssh-agent, or name "
                            "it with IdentityFile in ~/.ssh/config for this host") from exc
        if policy.seen is not None and not options.accept_new_host_keys:
            key = policy.seen
            raise HostError(
                f"{where}: unknown host key ({key.get_name()} {key.fingerprint}). If that is "
                f"the right key, add it with 'ssh-keyscan -p {port} {hostname} >> "
                "~/.ssh/known_hosts', or pass accept_new_host_keys=True") from exc
        raise HostError(f"{where}: SSH failed: {exc}") from exc
    except OSError as exc:
        client.close()
        if jumper is not None:
            close_client(jumper)
        raise HostError(f"{where}: connection failed: {exc}") from exc
    transport = client.get_transport()
    transport.set_keepalive(KEEPALIVE_INTERVAL)
    client._distexec_jumper = jumper  # closed with it (close_client)
    return client


def close_client(client: Any) -> None:
    """Close an SSH client and the jump host connection it went through, if any."""
    try:
        client.close()
    finally:
        jumper = getattr(client, "_distexec_jumper", None)
        if jumper is not None:
            close_client(jumper)


def _run(client: Any, command: str, timeout: float, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run a command; return (exit status, stdout, stderr). Raises HostError on a timeout."""
    channel = client.get_transport().open_session(timeout=timeout)
    channel.settimeout(timeout)
    channel.exec_command(command)
    if stdin:
        channel.sendall(stdin)
    channel.shutdown_write()
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()  # not select(): descriptors may exceed 1024
    selector.register(channel, selectors.EVENT_READ)
    try:
        while True:
            if time.monotonic() > deadline:
                raise HostError(f"the command {command[:60]!r} did not finish in {timeout:g} s")
            selector.select(0.5)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            if channel.recv_ready():
                out += channel.recv(65536)
            elif channel.eof_received or channel.closed:
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if channel.status_event.wait(max(0.0, deadline - time.monotonic())):
                    return channel.exit_status, out.decode(errors="replace"), \
                        err.decode(errors="replace")
    except TimeoutError as exc:
        raise HostError(f"the command {command[:60]!r} timed out") from exc
    finally:
        selector.close()
        channel.close()


def probe_host(client: Any, python: str, pythonpath: str | None, timeout: float) -> dict[str, Any]:
    """Run the probe with ``python`` on the host; return what it printed. Raises HostError."""
    prefix = f"exec env PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else "exec "
    status, out, err = _run(client, prefix + f"{shlex.quote(python)} -c {shlex.quote(_PROBE)}",
                            timeout)
    if status != 0:
        detail = err.strip().splitlines()[-1] if err.strip() else f"exit status {status}"
        if status == 127 or "No such file" in err or "not found" in err:
            raise HostError(f"python {python} not found there ({detail}): set python=/path/to/"
                            "python3 for this host (the same minor version as here)")
        raise HostError(f"python {python} failed to run there: {detail}")
    try:
        info: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise HostError(f"python {python} printed something unexpected: {out[:200]!r}") from exc
    return info


def _package_files() -> list[tuple[str, str]]:
    """(local path, relative path) of every file of distexec, cloudpickle and tblib to copy."""
    import cloudpickle
    import tblib

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../distexec
    files = []
    for root in (ours, os.path.dirname(os.path.abspath(cloudpickle.__file__)),
                 os.path.dirname(os.path.abspath(tblib.__file__))):
        base = os.path.dirname(root)
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                if name.endswith((".py", ".typed")):
                    path = os.path.join(folder, name)
                    files.append((path, os.path.relpath(path, base)))
    return files


def install_packages(client: Any, here: dict[str, str]) -> str:
    """Copy distexec, cloudpickle and tblib into a per-user cache on the host, keyed by their
    versions; return the directory to put on PYTHONPATH. Reuses a complete earlier copy."""
    sftp = client.open_sftp()
    try:
        home = sftp.normalize(".")
        files = _package_files()
        digest = hashlib.sha256()
        for local, relative in files:
            digest.update(relative.encode() + b"\0")
            with open(local, "rb") as fh:
                digest.update(fh.read())
        # Versions for people, a digest of the files so that edited code is copied again.
        tag = (f"distexec-{here['distexec']}-cloudpickle-{here['cloudpickle']}-tblib-"
               f"{here['tblib']}-{digest.hexdigest()[:12]}")
        cache = posixpath.join(home, ".cache", "distexec", tag)
        try:
            sftp.stat(posixpath.join(cache, ".complete"))
            return cache
        except OSError:
            pass
        parent = posixpath.dirname(cache)
        for path in (posixpath.join(home, ".cache"), posixpath.dirname(parent), parent):
            try:
                sftp.mkdir(path)
            except OSError:
                pass
        staging = f"{cache}.tmp-{os.getpid()}-{threading.get_ident()}"
        made: set[str] = set()
        for local, relative in files:
            target = posixpath.join(staging, *relative.split(os.sep))
            folder = posixpath.dirname(target)
            chain = []
            while folder not in made and folder != parent:
                chain.append(folder)
                folder = posixpath.dirname(folder)
            for folder in reversed(chain):
                try:
                    sftp.mkdir(folder)
                except OSError:
                    pass
                made.add(folder)
            sftp.put(local, target)
        with sftp.open(posixpath.join(staging, ".complete"), "w") as fh:
            fh.write(json.dumps(here))
        try:
            sftp.posix_rename(staging, cache)
        except OSError:
            # Another executor installed the same versions meanwhile: use theirs.
            _run(client, f"rm -rf {shlex.quote(staging)}", 30)
        return cache
    finally:
        sftp.close()


class SSHProcess(WorkerProcess):
    """The task manager's handle on one remote worker, started on an SSH channel."""

    def __init__(self, host: SSHHost, worker_id: int) -> None:
        super().__init__(worker_id)  # pid: set from the worker's handshake
        self.host = host
        self.channel: Any = None
        self._code: int | None = None
        self._reason: str | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[SSHProcess], None]] = []
        self._lock = threading.Lock()
        self.lines = {False: bytearray(), True: bytearray()}  # partial stdout/stderr lines

    def poll(self) -> int | None:
        return self._code if self._done.is_set() else None

    def describe_exit(self, code: int | None) -> str:
        if self._reason:
            return self._reason
        if code == -1:
            return (f"it ended with no exit status (killed by a signal, or the SSH connection "
                    f"to {self.host.spec.label} was lost)")
        return super().describe_exit(code) + f" on {self.host.spec.label}"

    def finish(self, code: int, reason: str | None = None) -> None:
        """The worker is over (any thread). Calls the watcher once."""
        with self._lock:
            if self._done.is_set():
                return
            self._code = code
            self._reason = reason
            self._done.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(self)

    def watch(self, on_exit: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(on_exit)
                return
        on_exit(self)

    def kill(self) -> None:
        if not self._done.is_set():
            self.host.submit(functools.partial(self.host.kill_now, self))

    def wait(self, timeout: float | None = None) -> int | None:
        self._done.wait(timeout)
        return self.poll()

    def close(self) -> None:
        if self.channel is not None and not self._done.is_set():
            self.host.submit(functools.partial(self.host.kill_now, self))


class SSHHost(Launcher):
    """One host: its SSH connection, tunnel and workers. See the module docstring.

    The :class:`~distexec.launchers.base.Launcher` fields (``state``, ``wanted``, ``info``,
    ``error``, ``not_before``) belong to the manager thread: the host's own thread reports what
    it found through ``on_ready(host, info, slots)`` and ``on_failed(host, error)``, which post
    events, and keeps its findings in private fields.
    """

    def __init__(self, spec: HostSpec, options: SSHOptions, manager_address: str,
                 on_ready: Callable[[SSHHost, dict[str, Any], int], None],
                 on_failed: Callable[[SSHHost, str], None]):
        super().__init__(spec.label, spec.slots or 0, state="starting")
        self.spec = spec
        self.options = options
        self.manager_address = manager_address
        self.python = spec.python or options.python or sys.executable
        self._slots = spec.slots or 0  # known after the check (host thread)
        self.pythonpath: str | None = None
        self.client: Any = None
        self.forward_port: int | None = None
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._jobs: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._pump = _Pump(self)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"distexec-launch-{spec.label}")

    def resources(self) -> tuple[dict[str, float | str] | None, int | None]:
        return resources_from_settings(self.spec.settings), self.wanted or None

    def describe_start(self) -> str:
        return f"{self.python} on {self.label}"

    def open(self) -> None:
        """Start the host's thread: connect, check, then start workers as asked."""
        self.thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Stop everything on this host (any thread; does not wait)."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def join(self, timeout: float) -> None:
        if self.thread.ident is not None:
            self.thread.join(timeout)

    # ---------------------------------------------------------------- host thread
    def _run(self) -> None:
        try:
            info = self._setup()
        except HostError as exc:
            self._shutdown()
            self._on_failed(self, str(exc))
            return
        except Exception as exc:  # paramiko raises many types; all mean "unusable"
            self._shutdown()
            self._on_failed(self, f"{self.spec.label}: {type(exc).__name__}: {exc}")
            return
        self._on_ready(self, info, self._slots)
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if self._closing and not self._jobs:
                    break
                job = self._jobs.popleft()
            try:
                job()
            except Exception:
                logger.exception("host %s: a launcher job failed", self.spec.label)
        self._shutdown()

    def _setup(self) -> dict[str, Any]:
        here = versions()
        self.client = connect(self.spec, self.options)
        timeout = max(30.0, self.options.connect_timeout)
        try:
            info = probe_host(self.client, self.python, None, timeout)
        except HostError as exc:
            raise HostError(f"{self.spec.label}: {exc}") from None
        problems = mismatches(here, info)
        python_problem = [p for p in problems if p.startswith("Python")]
        if python_problem:
            raise HostError(f"{self.spec.label}: {python_problem[0]} ({self.python}); set "
                            f"python=/path/to/python{here['python'].rsplit('.', 1)[0]} for "
                            "this host")
        if problems:
            if not self.options.install:
                raise HostError(f"{self.spec.label}: {'; '.join(problems)}; install matching "
                                "versions there, or allow installing (install=True)")
            logger.info("%s: %s; copying them into its cache", self.spec.label,
                        "; ".join(problems))
            self.pythonpath = install_packages(self.client, here)
            info = probe_host(self.client, self.python, self.pythonpath, timeout)
            problems = mismatches(here, info)
            if problems:
                raise HostError(f"{self.spec.label}: still {'; '.join(problems)} after "
                                f"installing into {self.pythonpath}")
        if not self._slots:
            self._slots = int(info.get("cpus") or 1)
        transport = self.client.get_transport()
        if self.options.tunnel:
            self.forward_port = transport.request_port_forward("127.0.0.1", 0,
                                                               self._pump.incoming)
        logger.info("host %s ready: Python %s, %d slot(s)%s", self.spec.label, info["python"],
                    self._slots, ", through an SSH tunnel" if self.options.tunnel else "")
        return info

    def worker_command(self, worker_id: int, connect: str) -> str:
        env = f"env PYTHONPATH={shlex.quote(self.pythonpath)} " if self.pythonpath else ""
        args = [self.python, "-u", "-m", "distexec.worker", "--connect", connect,
                "--worker-id", str(worker_id), "--key-stdin"]
        return "exec " + env + " ".join(shlex.quote(a) for a in args)

    def start(self, worker_id: int, address: str, key: bytes) -> SSHProcess:
        """Start a worker (returns its handle at once). Each start is a few round trips on the
        SSH connection, so starts run in threads of their own, side by side. ``address`` is
        not used: the worker connects through the tunnel, or to the address of this machine
        as the host sees it."""
        proc = SSHProcess(self, worker_id)
        threading.Thread(target=self._launch_now, args=(proc, key), daemon=True,
                         name=f"distexec-launch-{self.spec.label}-{worker_id}").start()
        return proc

    def _connect_address(self) -> str:
        if self.forward_port is not None:
            return f"127.0.0.1:{self.forward_port}"
        host, _, port = self.manager_address.rpartition(":")
        if host in ("0.0.0.0", "[::]", "::"):
            # The address of this machine as the host sees it: our end of the SSH connection.
            sock = self.client.get_transport().sock
            if not hasattr(sock, "getsockname"):
                raise HostError("tunnel=False cannot tell which address of this machine the "
                                "host reaches through a ProxyJump or ProxyCommand: use the "
                                "tunnel, or listen on a specific address")
            host = sock.getsockname()[0]
        return f"{host}:{port}"

    def _launch_now(self, proc: SSHProcess, key: bytes) -> None:
        if self._closing:
            proc.finish(-1, "the executor is shutting down")
            return
        try:
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                raise HostError("the SSH connection is gone")
            channel = transport.open_session(timeout=self.options.connect_timeout)
            channel.exec_command(self.worker_command(proc.worker_id, self._connect_address()))
            channel.sendall(key.hex().encode() + b"\n")  # stdin stays open: the lifeline
        except Exception as exc:
            proc.finish(-1, f"could not start a worker on {self.spec.label}: {exc}")
            return
        proc.channel = channel
        self._pump.watch_process(proc)

    def kill_now(self, proc: SSHProcess) -> None:
        """Host thread: kill a worker (by pid on the host when known) and close its channel."""
        if proc.pid is not None and not proc._done.is_set():
            try:
                _run(self.client, f"kill -KILL {int(proc.pid)} 2>/dev/null", 10)
            except Exception as exc:
                logger.debug("kill of pid %s on %s failed: %s", proc.pid, self.spec.label, exc)
        if proc.channel is not None:
            try:
                proc.channel.close()
            except Exception:
                pass

    def _shutdown(self) -> None:
        self._pump.stop()
        for proc in self._pump.processes():
            try:
                proc.channel.close()
            except Exception:
                pass
        if self.client is not None:
            try:
                close_client(self.client)
            except Exception:
                pass
        for proc in self._pump.processes():
            proc.finish(-1, "the executor closed the SSH connection")


class _Pump:
    """The tunnels and output relays of one host.

    Each connection a worker opens to the forwarded port arrives as a channel (on paramiko's
    transport thread, which must not block: it only hands the channel over) and is joined to a
    TCP connection to the task manager by two threads, one per direction, with blocking I/O:
    a connection whose reader is slow (a busy worker, a busy task manager) holds up only itself,
    never its neighbours or their heartbeats. EOF travels as a half-close. One more thread per
    worker relays its stdout and stderr to logging, line by line.
    """

    def __init__(self, host: SSHHost) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._procs: dict[Any, SSHProcess] = {}  # exec channel -> process
        self._open: set[Any] = set()  # channels and sockets of live tunnels
        self._stopping = False
        self._count = 0

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            items = list(self._open)
        for item in items:
            try:
                item.close()
            except Exception:
                pass

    def processes(self) -> list[SSHProcess]:
        with self._lock:
            return list(self._procs.values())

    def _name(self, what: str) -> str:
        self._count += 1
        return f"distexec-tunnel-{self.host.spec.label}-{what}{self._count}"

    def incoming(self, channel: Any, origin: Any, server: Any) -> None:
        # Runs on paramiko's transport thread: hand over and return at once.
        threading.Thread(target=self._join, args=(channel,), daemon=True,
                         name=self._name("c")).start()

    def _join(self, channel: Any) -> None:
        host, port = self.host.manager_address.rsplit(":", 1)
        address = (host.strip("[]"), int(port))
        if address[0] in ("0.0.0.0", "::"):
            address = ("127.0.0.1", address[1])
        try:
            sock = socket.create_connection(address, timeout=5)
            sock.settimeout(None)  # blocking from now on: slowness is not an error here
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            logger.warning("tunnel from %s: cannot reach the task manager: %s",
                           self.host.spec.label, exc)
            channel.close()
            return
        with self._lock:
            if self._stopping:
                sock.close()
                channel.close()
                return
            self._open.update((channel, sock))
        done = threading.Event()
        upstream = threading.Thread(target=self._copy, args=(channel, sock, done), daemon=True,
                                    name=self._name("up"))
        upstream.start()
        self._copy(sock, channel, done)
        upstream.join()
        with self._lock:
            self._open.discard(channel)
            self._open.discard(sock)
        for item in (sock, channel):
            try:
                item.close()
            except Exception:
                pass

    @staticmethod
    def _copy(src: Any, dst: Any, other_done: threading.Event) -> None:
        """Copy until EOF, then half-close the destination; on an error close both ends."""
        try:
            while True:
                data = src.recv(262144)
                if not data:
                    break
                dst.sendall(data)
            if hasattr(dst, "shutdown_write"):
                dst.shutdown_write()
            else:
                dst.shutdown(socket.SHUT_WR)
        except Exception:
            for item in (src, dst):
                try:
                    item.close()
                except Exception:
                    pass
        other_done.set()

    def watch_process(self, proc: SSHProcess) -> None:
        with self._lock:
            self._procs[proc.channel] = proc
        threading.Thread(target=self._relay_output, args=(proc,), daemon=True,
                         name=self._name("out")).start()

    def _relay_output(self, proc: SSHProcess) -> None:
        channel = proc.channel
        selector = selectors.DefaultSelector()  # not select(): descriptors may exceed 1024
        try:
            selector.register(channel, selectors.EVENT_READ)
            while True:
                selector.select(5.0)
                while channel.recv_stderr_ready():
                    self._emit(proc, channel.recv_stderr(65536), True)
                if channel.recv_ready():
                    self._emit(proc, channel.recv(65536), False)
                    continue
                if channel.eof_received or channel.closed:
                    break
            while channel.recv_stderr_ready():
                self._emit(proc, channel.recv_stderr(65536), True)
            self._emit(proc, b"", False, flush=True)
            self._emit(proc, b"", True, flush=True)
            # The status follows the end of output, unless the connection is gone.
            transport = channel.get_transport()
            alive = transport is not None and transport.is_active()
            code = channel.exit_status if channel.status_event.wait(5 if alive else 0) else -1
            channel.close()
            proc.finish(code)
        except Exception as exc:
            proc.finish(-1, f"lost the SSH channel of the worker on {self.host.spec.label}: "
                            f"{exc}")
        finally:
            selector.close()
            with self._lock:
                self._procs.pop(channel, None)

    def _emit(self, proc: SSHProcess, data: bytes, stderr: bool, flush: bool = False) -> None:
        buf = proc.lines[stderr]
        buf += data
        *lines, rest = bytes(buf).split(b"\n")
        if flush and rest:
            lines.append(rest)
            rest = b""
        buf[:] = rest
        level = logging.WARNING if stderr else logging.INFO
        for line in lines:
            remote_logger.log(level, "[worker %d on %s] %s", proc.worker_id,
                              self.host.spec.label, line.decode(errors="replace").rstrip("\r"))
