"""A lab of real OpenSSH servers on this machine, for testing SSH launching.

``Lab.up(n, directory)`` starts hosts ``h1`` .. ``hN``. Each one is a real ``sshd`` with its own
host key, reachable at its own IP address, and the lab can inject faults into any of them:
network partitions, crashes, refused logins.

netns mode (the default; needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN)
    Every host is a network namespace joined by a veth pair to a bridge that exists only for this
    lab, with an address from an unused documentation/benchmark /24. Its sshd runs inside the
    namespace (in a UTS namespace of its own, so ``hostname`` prints ``hN``) and listens on
    ``IP:22`` and on ``127.0.0.1:22`` of the host. An ``unreachable`` route for the whole subnet,
    with a high metric, is added before anything else and removed last, so that no packet for
    a lab address can ever leave through the machine's default route (for example while the
    bridge does not exist yet, or any more).

loopback mode (automatic when ``ip netns add`` fails; forced with ``DISTEXEC_LAB_MODE=loopback``)
    One sshd per host on ``127.77.K.i:2222``. There is no network to cut, so a partition freezes
    the host instead (SIGSTOP on its sshd and everything below it). The kernel still completes TCP
    handshakes for a frozen listener: only application timeouts (the SSH banner) notice. The
    hostname is the machine's own.

Both modes share one filesystem, one PID space and one set of users with the test process: a
"remote" host can run ``sys.executable`` directly, and a test can look at a remote process in
``/proc``.

Files written to the lab directory: ``id_ed25519`` (+ ``.pub``, the client key, authorized for
the current user on every host), ``known_hosts`` (each host key under the IP and under ``hN``),
``ssh_config`` (``ssh -F DIR/ssh_config h2 ...``), ``hosts.txt`` (``user@IP:PORT`` per line),
``state.json`` (everything ``down`` needs) and a directory per host with its sshd_config, host
key, authorized_keys and sshd log.

Nothing must outlive the test run: ``down()`` removes every process, namespace, link and route of
the lab; an ``atexit`` hook downs labs left up; and every lab is also recorded under
``/run/distexec-sshlab`` so that a later ``Lab.up`` tears down labs whose creating process died
without cleaning up (for example a test run ended by ``os._exit`` from a timeout).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Host", "Lab", "LabError", "reap_stale"]

SSHD = "/usr/sbin/sshd"
MODE_ENV = "DISTEXEC_LAB_MODE"
PARTITION_KINDS = ("link", "drop", "reject")
LOOPBACK_PORT = 2222
# Candidate subnets, in order. 192.0.2.0/24 (TEST-NET-1) is deliberately absent: on the machines
# this was written on it is the real uplink. Every candidate is checked against the routes and
# addresses in use before it is taken.
SUBNETS = (
    ["198.51.100.0/24", "203.0.113.0/24"]
    + [f"198.18.{k}.0/24" for k in range(1, 255)]
    + [f"198.19.{k}.0/24" for k in range(1, 255)]
)
NFT_TABLE = "distexec_lab"
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
_CMD_TIMEOUT = 30.0
_READY_TIMEOUT = 15.0
_KILL_TIMEOUT = 10.0


class LabError(RuntimeError):
    """The lab could not be set up, changed or torn down. ``lab`` is the Lab concerned (if any)."""

    def __init__(self, message: str, lab: Lab | None = None) -> None:
        super().__init__(message)
        self.lab = lab


@dataclass
class Host:
    """One simulated machine. ``netns`` and ``veth`` (the bridge side of its link) are None in
    loopback mode. ``partitioned`` is None or how the host is cut off ("link", "drop", "reject",
    or "stop" in loopback mode)."""

    name: str
    ip: str
    port: int
    netns: str | None
    veth: str | None
    dir: Path
    partitioned: str | None = None
    sshd_pid: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "sshd.pid"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ip": self.ip, "port": self.port, "netns": self.netns,
                "veth": self.veth, "dir": str(self.dir), "partitioned": self.partitioned,
                "sshd_pid": self.sshd_pid}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Host:
        return cls(name=data["name"], ip=data["ip"], port=int(data["port"]), netns=data["netns"],
                   veth=data["veth"], dir=Path(data["dir"]), partitioned=data.get("partitioned"),
                   sshd_pid=data.get("sshd_pid"))


# --------------------------------------------------------------------------- small helpers


def _run(argv: list[str], *, input: str | None = None, check: bool = True,
         lab: Lab | None = None) -> subprocess.CompletedProcess[str]:
    stdin = None if input is not None else subprocess.DEVNULL
    proc = subprocess.run(argv, input=input, stdin=stdin, capture_output=True, text=True,
                          env=_ENV, timeout=_CMD_TIMEOUT)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}", lab)
    return proc


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _run(["ip", "-j", *args]).stdout.strip()
    return json.loads(out) if out else []


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # the command name may contain anything
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _alive(pid: int) -> bool:
    """True for a running (or stopped) process; False for a zombie or a missing one. A zombie
    passes ``kill -0``, and PID 1 here reaps orphans late, so /proc is the reliable answer."""
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _backoff(deadline: float) -> Iterator[None]:
    """Bounded polling: yields until ``deadline``, with waits growing from 1 ms to 20 ms."""
    delay = 0.001
    while True:
        yield
        if time.monotonic() >= deadline:
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[0] not in ("Z", "X"):
                children.setdefault(st[1], []).append(int(entry.name))
    return children


def _tree(root: int) -> set[int]:
    """``root`` and all its live descendants."""
    if not _alive(root):
        return set()
    children = _children_map()
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _stop_tree(root: int) -> set[int]:
    """SIGSTOP ``root`` and its descendants until no new process appears (a stopped process
    cannot fork), and return them all."""
    stopped: set[int] = set()
    for _ in range(100):
        new = _tree(root) - stopped
        if not new:
            break
        _kill(new, signal.SIGSTOP)
        stopped |= new
    return stopped


def _wait_reaped(pids: Iterable[int], until: float,
                 procs: Iterable[subprocess.Popen[bytes]] = ()) -> None:
    """Wait until the processes have disappeared from /proc (not just died), at most until
    ``until``. Our own children among them are reaped here."""
    pending = set(pids)
    for _ in _backoff(until):
        for proc in procs:
            proc.poll()
        pending = {p for p in pending if _proc_stat(p) is not None}
        if not pending:
            return


def _registry_dir() -> Path:
    for candidate in (Path("/run/distexec-sshlab"),
                      Path(tempfile.gettempdir()) / f"distexec-sshlab-{os.getuid()}"):
        try:
            candidate.mkdir(mode=0o700, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    raise LabError("no writable directory for the lab registry")


@contextlib.contextmanager
def _registry_lock() -> Iterator[Path]:
    """Serializes subnet/address choice and stale-lab reaping between concurrent labs."""
    reg = _registry_dir()
    with open(reg / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield reg
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _owner() -> dict[str, int]:
    st = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "start": st[2] if st else 0}


def _owner_alive(owner: dict[str, int]) -> bool:
    st = _proc_stat(int(owner.get("pid", 0)))
    return st is not None and st[0] not in ("Z", "X") and st[2] == owner.get("start")


def _check_path(path: Path) -> None:
    # sshd_config would need quoting for these, and expands %-tokens in some paths.
    bad = set(' \t\n"\'%#') & set(str(path))
    if bad:
        raise LabError(f"lab directory must not contain any of {sorted(bad)!r}: {path}")


_LIVE: set[Lab] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_DONE = False


def _down_all_at_exit() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.down()


def reap_stale() -> list[str]:
    """Tear down labs whose creating process is gone (it was killed, or left by ``os._exit``).
    Returns the ids of the labs removed. Called by every ``Lab.up``."""
    reaped = []
    with _registry_lock() as reg:
        for entry in reg.glob("*.json"):
            try:
                state = json.loads(entry.read_text())
            except (OSError, ValueError):
                continue
            if _owner_alive(state.get("owner", {})):
                continue
            try:
                Lab._from_state(state).down()  # removes the entry; kept (for a retry) on failure
            except (LabError, OSError, KeyError, ValueError):
                continue
            reaped.append(state.get("id", entry.stem))
    return reaped


# --------------------------------------------------------------------------- the lab


class Lab:
    """A set of SSH hosts; create it with :meth:`Lab.up`. Host arguments of the fault methods
    may be a name (``"h2"``), an IP, a namespace name or a :class:`Host`."""

    def __init__(self, directory: Path, mode: str, lab_id: str) -> None:
        self.dir = directory
        self.mode = mode
        self.id = lab_id
        self.hosts: list[Host] = []
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.bridge: str | None = None
        self.subnet: str | None = None
        self.route_metric: int | None = None
        self.distinct_hostnames = False
        self.fallback_reason: str | None = None
        self.owner = _owner()
        self._lock = threading.RLock()

    # paths
    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def hosts_file(self) -> Path:
        return self.dir / "hosts.txt"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def __repr__(self) -> str:
        where = self.subnet if self.mode == "netns" else "127.0.0.0/8"
        names = [h.name for h in self.hosts]
        return f"<Lab {self.id} {self.mode} {where} hosts={names} dir={self.dir}>"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __getitem__(self, ref: str | Host) -> Host:
        return self.host(ref)

    def host(self, ref: str | Host) -> Host:
        if isinstance(ref, Host):
            ref = ref.name
        for host in self.hosts:
            if ref in (host.name, host.ip, host.netns):
                return host
        raise KeyError(f"no host {ref!r} in {self!r}")

    # ------------------------------------------------------------------ bring-up

    @classmethod
    def up(cls, n: int, directory: str | os.PathLike[str], sshd_extra: Iterable[str] = (), *,
           mode: str | None = None) -> Lab:
        """Start ``n`` hosts with their files in ``directory``; return the running lab.

        ``mode`` is "netns", "loopback" or None (``$DISTEXEC_LAB_MODE``, else netns when the
        machine allows it, else loopback). ``sshd_extra`` lines are appended to every
        sshd_config. A failure part-way tears down whatever was created, then raises LabError.
        """
        if not 1 <= n <= 250:
            raise ValueError("a lab has 1 to 250 hosts")
        wanted = mode or os.environ.get(MODE_ENV) or "auto"
        if wanted not in ("auto", "netns", "loopback"):
            raise ValueError(f"unknown lab mode {wanted!r}")
        if not os.access(SSHD, os.X_OK):
            raise LabError(f"{SSHD} not found (install openssh-server)")
        if shutil.which("ssh-keygen", path=_ENV["PATH"]) is None:
            raise LabError("ssh-keygen not found (install openssh-client)")
        if wanted != "loopback" and shutil.which("ip", path=_ENV["PATH"]) is None:
            if wanted == "netns":
                raise LabError("ip not found (install iproute2)")
            wanted = "loopback"
        d = Path(directory).resolve()
        _check_path(d)
        d.mkdir(parents=True, exist_ok=True)
        reap_stale()
        with _LIVE_LOCK:
            earlier = [lab for lab in _LIVE if lab.dir == d]
        for lab in earlier:  # this process reuses the directory of a lab it did not down
            lab.down()
        if (d / "state.json").exists():
            try:
                previous = cls.attach(d)
            except (OSError, ValueError, KeyError):
                previous = None
            if previous is not None:
                if previous.owner != _owner() and _owner_alive(previous.owner):
                    raise LabError(f"{d} belongs to a running lab of process "
                                   f"{previous.owner.get('pid')}")
                previous.down()

        lab = cls(d, "netns" if wanted == "auto" else wanted, secrets.token_hex(3))
        with _LIVE_LOCK:
            global _ATEXIT_DONE
            _LIVE.add(lab)
            if not _ATEXIT_DONE:
                atexit.register(_down_all_at_exit)
                _ATEXIT_DONE = True
        try:
            lab._bring_up(n, list(sshd_extra), wanted == "auto")
        except BaseException as exc:
            try:
                lab.down()
            except Exception as cleanup_exc:  # report both; the original error comes first
                raise LabError(f"lab setup failed ({exc}); cleanup also failed: {cleanup_exc}",
                               lab) from exc
            if isinstance(exc, LabError):
                exc.lab = lab
            raise
        return lab

    def _bring_up(self, n: int, extra: list[str], may_fall_back: bool) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir("/run/sshd", 0o755)  # sshd's privilege separation directory
        for name in ("id_ed25519", "id_ed25519.pub"):
            (self.dir / name).unlink(missing_ok=True)
        keygens = [subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                     f"sshlab-{self.id}", "-f", str(self.key)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=_ENV)]
        hosts = []
        for i in range(1, n + 1):
            hdir = self.dir / f"h{i}"
            shutil.rmtree(hdir, ignore_errors=True)
            hdir.mkdir()
            hosts.append(Host(name=f"h{i}", ip="", port=0, netns=None, veth=None, dir=hdir))
            keygens.append(subprocess.Popen(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"h{i}", "-f",
                 str(hdir / "ssh_host_ed25519_key")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=_ENV))
        self.hosts = hosts
        try:
            self._build(extra, may_fall_back, keygens)
        finally:
            for proc in keygens:  # normally done already; after an error, do not leave them
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stderr:
                    proc.stderr.close()
            with contextlib.suppress(OSError):
                self._save()

    def _build(self, extra: list[str], may_fall_back: bool,
               keygens: list[subprocess.Popen[bytes]]) -> None:
        if self.mode == "netns":
            try:
                self._make_namespaces()
            except LabError as exc:
                if not may_fall_back:
                    raise
                self.fallback_reason = str(exc)
                self._delete_namespaces()
                self.mode = "loopback"
        if self.mode == "netns":
            self._make_network()
        else:
            self._pick_loopback_addresses()
        self._save()

        for proc in keygens:
            _, err = proc.communicate(timeout=_CMD_TIMEOUT)
            if proc.returncode != 0:
                raise LabError(f"ssh-keygen failed: {err.decode(errors='replace').strip()}", self)
        pub = self.key.with_suffix(".pub").read_text()
        for host in self.hosts:
            self._write_sshd_config(host, extra)
            (host.dir / "authorized_keys.allowed").write_text(pub)
            host.authorized_keys.write_text(pub)
        self._write_client_files()

        self.distinct_hostnames = self.mode == "netns" and all(
            shutil.which(tool, path=_ENV["PATH"]) for tool in ("unshare", "hostname"))
        for host in self.hosts:
            self._start_sshd(host)
        self._wait_ready(self.hosts)

    def _make_namespaces(self) -> None:
        for host in self.hosts:
            host.netns = f"dxlab-{self.id}-{host.name}"
        self._save()
        try:
            _run(["ip", "-b", "-"], input="".join(f"netns add {h.netns}\n" for h in self.hosts),
                 lab=self)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LabError(f"ip netns add: {exc}", self) from exc

    def _delete_namespaces(self) -> None:
        names = [h.netns for h in self.hosts if h.netns]
        if names:
            _run(["ip", "-force", "-b", "-"], input="".join(f"netns del {ns}\n" for ns in names),
                 check=False)
        for host in self.hosts:
            host.netns = None

    def _claim_subnet(self) -> ipaddress.IPv4Network:
        """Pick the first candidate /24 that no route or address touches, and claim it with an
        unreachable route (the safety net). Serialized between labs by the registry lock."""
        metric = 4000 + int(self.id, 16) % 60000  # one metric per lab: our route is unambiguous
        with _registry_lock():
            in_use = []
            for route in _ip_json("-4", "route", "show", "table", "all"):
                dst = route.get("dst", "default")
                if dst != "default":
                    net = ipaddress.ip_network(dst, strict=False)
                    if net.prefixlen >= 8:  # ignore catch-alls such as 0.0.0.0/1 of a VPN
                        in_use.append(net)
            for link in _ip_json("-4", "addr", "show"):
                for a in link.get("addr_info", []):
                    in_use.append(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network)
            for cand in SUBNETS:
                net = ipaddress.ip_network(cand)
                if net.overlaps(ipaddress.ip_network("192.0.2.0/24")):
                    continue
                if any(net.overlaps(u) for u in in_use):
                    continue
                self.subnet, self.route_metric = str(net), metric
                self._save()  # recorded before it exists: down() tolerates absent objects
                _run(["ip", "route", "add", "unreachable", str(net), "metric", str(metric)],
                     lab=self)
                return net
        raise LabError(f"no free subnet among {SUBNETS[0]}, {SUBNETS[1]}, 198.18-19.x.0/24", self)

    def _make_network(self) -> None:
        net = self._claim_subnet()
        probe = str(net.network_address + 1)
        # the safety route must already catch the subnet
        check = _run(["ip", "route", "get", probe], check=False)
        if check.returncode == 0:
            raise LabError(f"safety route for {net} is not in effect: {check.stdout.strip()}", self)
        self.bridge = f"dxb-{self.id}"
        for i, host in enumerate(self.hosts, 1):
            host.ip = str(net.network_address + i)
            host.port = 22
            host.veth = f"dxv-{self.id}-{i}"
        self._save()
        gateway = net.network_address + 254
        batch = [f"link add {self.bridge} type bridge stp_state 0",
                 f"link set {self.bridge} addrgenmode none",
                 f"addr add {gateway}/{net.prefixlen} dev {self.bridge}",
                 f"link set {self.bridge} up"]
        for host in self.hosts:
            batch += [f"link add {host.veth} type veth peer name eth0 netns {host.netns}",
                      f"link set {host.veth} addrgenmode none",
                      f"link set {host.veth} master {self.bridge} up"]
        _run(["ip", "-b", "-"], input="\n".join(batch) + "\n", lab=self)
        for host in self.hosts:
            assert host.netns is not None
            _run(["ip", "-n", host.netns, "-b", "-"], lab=self, input=(
                "link set eth0 addrgenmode none\n"
                f"addr add {host.ip}/{net.prefixlen} dev eth0\n"
                "link set eth0 up\nlink set lo up\n"))
        route = _ip_json("route", "get", probe)
        if not route or route[0].get("dev") != self.bridge:
            raise LabError(f"{probe} is not routed via {self.bridge}: {route}", self)

    def _pick_loopback_addresses(self) -> None:
        with _registry_lock() as reg:
            taken = set()
            for entry in reg.glob("*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                    for h in json.loads(entry.read_text())["hosts"]:
                        if h["ip"].startswith("127.77."):
                            taken.add(int(h["ip"].split(".")[2]))
            for k in random.sample(range(1, 255), 254):
                if k in taken:
                    continue
                ips = [f"127.77.{k}.{i}" for i in range(1, len(self.hosts) + 1)]
                if all(self._bindable(ip, LOOPBACK_PORT) for ip in ips):
                    for host, ip in zip(self.hosts, ips, strict=True):
                        host.ip, host.port = ip, LOOPBACK_PORT
                    self._save()
                    return
        raise LabError("no free 127.77.K.0/24 block for a loopback lab", self)

    @staticmethod
    def _bindable(ip: str, port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                return False
        return True

    def _write_sshd_config(self, host: Host, extra: list[str]) -> None:
        listen = [host.ip] + (["127.0.0.1"] if self.mode == "netns" else [])
        lines = [f"Port {host.port}", *(f"ListenAddress {a}" for a in listen),
                 f"HostKey {host.dir / 'ssh_host_ed25519_key'}",
                 f"PidFile {host.pidfile}",
                 f"AuthorizedKeysFile {host.authorized_keys}",
                 "UsePAM no",
                 "PubkeyAuthentication yes",
                 "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no",
                 "StrictModes no",
                 "UseDNS no",
                 "PrintMotd no",
                 "MaxStartups 200",
                 "MaxSessions 200",
                 "AllowTcpForwarding yes",
                 "AcceptEnv LANG LC_*",
                 "Subsystem sftp internal-sftp",
                 "LogLevel VERBOSE",
                 # Root's .bashrc may run `pyenv init` (and so `pyenv rehash`) for every SSH
                 # command; a session killed mid-rehash (a crashed host) leaves its lock file,
                 # and every later command would wait 60 s for it. One second is enough.
                 "SetEnv PYENV_REHASH_TIMEOUT=1",
                 *extra]
        host.config.write_text("\n".join(lines) + "\n")

    def _write_client_files(self) -> None:
        known, config, listing = [], [], []
        for host in self.hosts:
            key = " ".join((host.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
            if host.port == 22:
                known.append(f"{host.ip},{host.name} {key}")
            else:
                known.append(f"[{host.ip}]:{host.port},[{host.name}]:{host.port} {key}")
            config += [f"Host {host.name}",
                       f"    HostName {host.ip}",
                       f"    Port {host.port}",
                       f"    User {self.user}",
                       f"    IdentityFile {self.key}",
                       f"    UserKnownHostsFile {self.known_hosts}",
                       "    GlobalKnownHostsFile /dev/null",
                       "    StrictHostKeyChecking yes",
                       "    IdentitiesOnly yes",
                       "    BatchMode yes",
                       "    ConnectTimeout 5",
                       "    LogLevel ERROR",
                       ""]
            listing.append(f"{self.user}@{host.ip}:{host.port}")
        self.known_hosts.write_text("\n".join(known) + "\n")
        self.ssh_config.write_text("\n".join(config))
        self.hosts_file.write_text("\n".join(listing) + "\n")

    def _start_sshd(self, host: Host) -> None:
        host.pidfile.unlink(missing_ok=True)
        daemon = [SSHD, "-D", "-f", str(host.config), "-E", str(host.log)]
        if self.mode == "netns":
            assert host.netns is not None
            if self.distinct_hostnames:
                # own UTS namespace: set the hostname, then become sshd (same PID all along:
                # ip netns exec, unshare and sh all exec the next program)
                argv = ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--", "/bin/sh",
                        "-c", 'hostname "$0" && exec "$@"', host.name, *daemon]
            else:
                argv = ["ip", "netns", "exec", host.netns, *daemon]
        else:
            argv = daemon
        with open(host.dir / "start.log", "ab") as out:
            host._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                          env=_ENV, start_new_session=True)
        host.sshd_pid = host._proc.pid

    def _wait_ready(self, hosts: list[Host]) -> None:
        """Wait (bounded) until each sshd has written its pidfile, which it does only once its
        sockets listen; then check that its SSH banner comes back over the lab network."""
        deadline = time.monotonic() + _READY_TIMEOUT
        for host in hosts:
            assert host._proc is not None
            for _ in _backoff(deadline):
                if host._proc.poll() is not None:
                    raise LabError(f"sshd of {host.name} exited with {host._proc.returncode}: "
                                   f"{self._log_tail(host)}", self)
                with contextlib.suppress(OSError, ValueError):
                    if int(host.pidfile.read_text()) == host._proc.pid:
                        break
            else:
                raise LabError(f"sshd of {host.name} did not start: {self._log_tail(host)}", self)
            if host.partitioned is None:
                self._check_banner(host, deadline)

    def _check_banner(self, host: Host, deadline: float) -> None:
        error: Exception | None = None
        for _ in _backoff(deadline):
            try:
                with socket.create_connection(host.address, timeout=2) as s:
                    banner = s.recv(256)
                if banner.startswith(b"SSH-2.0-"):
                    return
                error = LabError(f"unexpected banner {banner!r}")
            except OSError as exc:
                error = exc
        raise LabError(f"{host.name} ({host.ip}:{host.port}) does not answer: {error}", self)

    @staticmethod
    def _log_tail(host: Host) -> str:
        text = ""
        for name in ("start.log", "sshd.log"):
            with contextlib.suppress(OSError):
                text += (host.dir / name).read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-5:]) or "(no log)"

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        return {"version": 1, "id": self.id, "mode": self.mode, "dir": str(self.dir),
                "owner": self.owner, "user": self.user, "bridge": self.bridge,
                "subnet": self.subnet, "route_metric": self.route_metric,
                "distinct_hostnames": self.distinct_hostnames,
                "hosts": [h.to_json() for h in self.hosts]}

    def _save(self) -> None:
        """state.json in the lab directory, and a copy in the registry (the directory may be
        deleted by tmp-dir cleanup before anyone reaps the lab)."""
        data = json.dumps(self._state(), indent=1)
        for path in (self.state_file, _registry_dir() / f"{self.id}.json"):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(data)
            os.replace(tmp, path)

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Lab:
        lab = cls(Path(state["dir"]), state["mode"], state["id"])
        lab.owner = state.get("owner", lab.owner)
        lab.user = state.get("user", lab.user)
        lab.bridge, lab.subnet = state.get("bridge"), state.get("subnet")
        lab.route_metric = state.get("route_metric")
        lab.distinct_hostnames = bool(state.get("distinct_hostnames"))
        lab.hosts = [Host.from_json(h) for h in state.get("hosts", [])]
        return lab

    @classmethod
    def attach(cls, directory: str | os.PathLike[str]) -> Lab:
        """A Lab object for a lab started elsewhere, from its state.json (to inspect or down it)."""
        return cls._from_state(json.loads((Path(directory) / "state.json").read_text()))

    # ------------------------------------------------------------------ processes

    def pids(self, ref: str | Host) -> list[int]:
        """Live processes of a host: everything in its namespace (netns mode), or its sshd and
        all descendants (loopback mode; a process that daemonizes away escapes this)."""
        return sorted(self._host_pids(self.host(ref)))

    def alive(self, ref: str | Host) -> bool:
        """Whether the host's sshd listener runs."""
        host = self.host(ref)
        if host._proc is not None:
            return host._proc.poll() is None and _alive(host._proc.pid)
        return host.sshd_pid is not None and self._is_our_sshd(host, host.sshd_pid)

    @staticmethod
    def _is_our_sshd(host: Host, pid: int) -> bool:
        return _alive(pid) and str(host.config) in _cmdline(pid)

    def _host_pids(self, host: Host) -> set[int]:
        if host.netns:
            own = os.stat("/proc/self/ns/net")
            try:
                theirs = os.stat(f"/run/netns/{host.netns}")
            except OSError:
                return set()
            if (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino):
                raise LabError(f"{host.netns} is this process's own network namespace", self)
            out = _run(["ip", "netns", "pids", host.netns], check=False).stdout.split()
            return {int(p) for p in out if _alive(int(p)) and int(p) != os.getpid()}
        pid = host.sshd_pid
        if pid is None or not self._is_our_sshd(host, pid):
            return set()
        return _tree(pid)

    def _kill_hosts(self, hosts: list[Host]) -> None:
        """SIGKILL every process of the given hosts and return once none is left (bounded).

        Deepest processes go first, each round waiting briefly until their (still living)
        parents have reaped them. Killing a whole tree at once would orphan its lower levels,
        and PID 1 on some machines reaps orphans seconds later, which leaves ``<defunct>``
        entries behind.
        """
        deadline = time.monotonic() + _KILL_TIMEOUT
        procs = [h._proc for h in hosts if h._proc is not None]
        first = True
        while True:
            victims: set[int] = set()
            for host in hosts:
                victims |= self._host_pids(host)
            if not victims:
                break
            if time.monotonic() > deadline:
                raise LabError(f"processes survive SIGKILL: {sorted(victims)}", self)
            if first:  # a frozen (loopback-partitioned) parent could not reap its children
                _kill(victims, signal.SIGCONT)
                first = False
            parents = {st[1] for st in map(_proc_stat, victims) if st is not None}
            leaves = (victims - parents) or victims
            _kill(leaves, signal.SIGKILL)
            _wait_reaped(leaves, min(deadline, time.monotonic() + 0.25), procs)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))

    # ------------------------------------------------------------------ faults

    def partition(self, ref: str | Host, how: str = "link") -> None:
        """Cut the host off the network. netns mode: "link" sets the bridge side of its veth
        down (packets vanish; ARP fails after a few seconds, then connects get "no route to
        host"), "drop" drops everything on its eth0 with nftables (timeouts only), "reject"
        answers TCP with a reset (connections fail at once). Its 127.0.0.1 keeps working.
        loopback mode: every kind freezes the host's sshd and all below it (SIGSTOP)."""
        if how not in PARTITION_KINDS:
            raise ValueError(f"partition kind must be one of {PARTITION_KINDS}")
        with self._lock:
            host = self.host(ref)
            if host.partitioned:
                self.heal(host)
            if host.netns is None:
                if host.sshd_pid is not None and self._is_our_sshd(host, host.sshd_pid):
                    _stop_tree(host.sshd_pid)
                host.partitioned = "stop"
            elif how == "link":
                assert host.veth is not None
                _run(["ip", "link", "set", host.veth, "down"], lab=self)
                host.partitioned = how
            else:
                if how == "drop":
                    rules = ('  chain input { type filter hook input priority 0; policy accept;'
                             ' iifname "eth0" drop; }\n'
                             '  chain output { type filter hook output priority 0; policy accept;'
                             ' oifname "eth0" drop; }\n')
                else:
                    rules = ('  chain input { type filter hook input priority 0; policy accept;'
                             ' iifname "eth0" meta l4proto tcp reject with tcp reset;'
                             ' iifname "eth0" reject with icmpx type admin-prohibited; }\n')
                script = (f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
                          f"table inet {NFT_TABLE} {{\n{rules}}}\n")
                _run(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input=script, lab=self)
                host.partitioned = how
            self._save()

    def heal(self, ref: str | Host) -> None:
        """Undo :meth:`partition` (whatever kind; a no-op on a connected host)."""
        with self._lock:
            host = self.host(ref)
            if host.netns is None:
                if host.sshd_pid is not None and self._is_our_sshd(host, host.sshd_pid):
                    _kill(_tree(host.sshd_pid), signal.SIGCONT)
            else:
                assert host.veth is not None
                _run(["ip", "link", "set", host.veth, "up"], lab=self)
                if host.partitioned in ("drop", "reject"):
                    _run(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], lab=self,
                         input=f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
            host.partitioned = None
            self._save()

    def crash(self, ref: str | Host) -> None:
        """SIGKILL everything on the host: its sshd, every session, and whatever the sessions
        started. Returns once they are all gone. New connections are then refused (unless the
        host is also partitioned) until :meth:`restart`."""
        with self._lock:
            self._kill_hosts([self.host(ref)])

    def restart(self, ref: str | Host) -> None:
        """Start the host's sshd again if it is not running (after :meth:`crash`)."""
        with self._lock:
            host = self.host(ref)
            if self.alive(host):
                return
            self._start_sshd(host)
            self._wait_ready([host])
            if host.partitioned == "stop" and host.sshd_pid is not None:
                _stop_tree(host.sshd_pid)  # still frozen, as before the crash
            self._save()

    def deny(self, ref: str | Host) -> None:
        """Refuse logins to the host (its authorized_keys becomes empty). Open connections stay."""
        self._set_authorized(self.host(ref), "")

    def allow(self, ref: str | Host) -> None:
        """Undo :meth:`deny`."""
        host = self.host(ref)
        self._set_authorized(host, (host.dir / "authorized_keys.allowed").read_text())

    @staticmethod
    def _set_authorized(host: Host, text: str) -> None:
        tmp = host.dir / "authorized_keys.tmp"
        tmp.write_text(text)
        os.replace(tmp, host.authorized_keys)  # sshd never sees a half-written file

    def reset(self) -> None:
        """Heal, allow and restart every host that needs it (cheap when nothing is faulted)."""
        with self._lock:
            for host in self.hosts:
                if host.partitioned:
                    self.heal(host)
                self.allow(host)
                self.restart(host)

    # ------------------------------------------------------------------ teardown

    def down(self) -> None:
        """Kill every process of the lab and remove its namespaces, links and route. Idempotent,
        works on a half-built lab, and raises LabError if something could not be removed."""
        with self._lock:
            problems = []
            try:
                self._kill_hosts(self.hosts)
            except (LabError, OSError) as exc:
                problems.append(str(exc))
            if self.mode == "netns":
                batch = [f"link del {h.veth}" for h in self.hosts if h.veth]
                batch += [f"netns del {h.netns}" for h in self.hosts if h.netns]
                if self.bridge:
                    batch.append(f"link del {self.bridge}")
                if self.subnet and self.route_metric is not None:
                    # last: until the bridge is gone, the safety route keeps the subnet local
                    batch.append(f"route del unreachable {self.subnet} metric {self.route_metric}")
                if batch:
                    _run(["ip", "-force", "-b", "-"], input="\n".join(batch) + "\n", check=False)
                problems += self._leftovers()
            if problems:
                raise LabError(f"lab {self.id} not fully removed: {'; '.join(problems)}", self)
            for host in self.hosts:
                host._proc = None
                host.partitioned = None
            with contextlib.suppress(OSError, LabError):
                (_registry_dir() / f"{self.id}.json").unlink(missing_ok=True)
            self.state_file.unlink(missing_ok=True)
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def _leftovers(self) -> list[str]:
        left = []
        namespaces = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        left += [f"netns {h.netns}" for h in self.hosts if h.netns in namespaces]
        links = {link.get("ifname") for link in _ip_json("link", "show")}
        left += [f"link {name}" for name in [self.bridge] + [h.veth for h in self.hosts]
                 if name and name in links]
        if self.subnet:
            for route in _ip_json("-4", "route", "show", "table", "all"):
                if route.get("dst") == self.subnet and route.get("metric") == self.route_metric:
                    left.append(f"route {self.subnet} metric {self.route_metric}")
        return left


def _main(argv: list[str]) -> int:
    """``python tests/sshlab.py up N DIR``: run a lab in the foreground until Ctrl-C or SIGTERM
    (for trying things by hand, e.g. ``ssh -F DIR/ssh_config h1``); ``down DIR``: tear down a
    lab from its state.json; ``reap``: tear down labs whose creating process is gone."""
    if len(argv) == 3 and argv[0] == "up" and argv[1].isdigit():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with Lab.up(int(argv[1]), argv[2]) as lab:
            print(f"{lab!r}\nssh -F {lab.ssh_config} h1    (Ctrl-C ends the lab)", flush=True)
            for host in lab.hosts:
                print(f"{host.name} {host.ip} {host.port} {host.netns or '-'}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    signal.pause()
        return 0
    if len(argv) == 2 and argv[0] == "down":
        if (Path(argv[1]) / "state.json").exists():
            Lab.attach(argv[1]).down()
        return 0
    if argv == ["reap"]:
        print("reaped:", " ".join(reap_stale()) or "nothing")
        return 0
    print(_main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
