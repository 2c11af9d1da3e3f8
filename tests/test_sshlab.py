"""The SSH lab itself (tests/sshlab.py): its hosts answer real SSH logins, and its faults do what
they claim. paramiko is used directly; every network wait here has a short, explicit bound."""

from __future__ import annotations

import json
import queue
import shlex
import shutil
import socket
import subprocess
import sys

import paramiko
import pytest

import sshlab

pytestmark = pytest.mark.timeout(60)

FAIL_FAST = 1.5  # seconds a connect attempt to an unreachable host may take


def connect(lab: sshlab.Lab, host: sshlab.Host, timeout: float = 10.0) -> paramiko.SSHClient:
    """Log in as the lab user, trusting only the lab's known_hosts."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(lab.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(host.ip, host.port, username=lab.user, key_filename=str(lab.key),
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=False, look_for_keys=False)
    except BaseException:
        client.close()
        raise
    return client


def run(client: paramiko.SSHClient, command: str, timeout: float = 20.0) -> tuple[int, str, str]:
    stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    stdin.close()
    out, err = stdout.read(), stderr.read()
    assert stdout.channel.status_event.wait(timeout)
    return stdout.channel.exit_status, out.decode(), err.decode()


def python(code: str) -> str:
    """A remote command running ``code`` with this test's interpreter (shared filesystem)."""
    return shlex.join([sys.executable, "-c", code])


def assert_unreachable(lab: sshlab.Lab, host: sshlab.Host) -> None:
    with pytest.raises((OSError, paramiko.SSHException)):
        connect(lab, host, timeout=FAIL_FAST).close()


@pytest.fixture
def lab(ssh_lab):
    """The session lab, with every host healed, allowed and running before and after the test."""
    ssh_lab.reset()
    yield ssh_lab
    ssh_lab.reset()


def test_every_host_is_a_separate_ssh_server(lab):
    assert [h.name for h in lab.hosts] == ["h1", "h2", "h3"]
    assert len({h.address for h in lab.hosts}) == 3
    for host in lab.hosts:
        with connect(lab, host) as client:
            status, out, _ = run(client, "cat /proc/sys/kernel/hostname")
            assert status == 0
            if lab.distinct_hostnames:
                assert out.strip() == host.name
            code = ("import os, sys; print(sys.executable); "
                    "print(os.environ['SSH_CONNECTION'].split()[2])")
            status, out, err = run(client, python(code))
            assert (status, err) == (0, "")
            assert out.split() == [sys.executable, host.ip]
            assert run(client, "echo oops >&2; exit 3") == (3, "", "oops\n")


def test_lab_files(lab):
    lines = lab.hosts_file.read_text().splitlines()
    assert lines == [f"{lab.user}@{h.ip}:{h.port}" for h in lab.hosts]
    state = json.loads(lab.state_file.read_text())
    assert state["mode"] == lab.mode and [h["netns"] for h in state["hosts"]] == [
        h.netns for h in lab.hosts]
    known = paramiko.HostKeys(str(lab.known_hosts))
    for host in lab.hosts:  # the same key under the address and under the name
        key = host.ip if host.port == 22 else f"[{host.ip}]:{host.port}"
        alias = host.name if host.port == 22 else f"[{host.name}]:{host.port}"
        assert known.lookup(key) is not None and known.lookup(key) == known.lookup(alias)
    if shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client to try ssh_config with")
    proc = subprocess.run(["ssh", "-F", str(lab.ssh_config), "h2", "echo", "ok"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


def test_remote_forward_binds_on_the_hosts_loopback(lab):
    """A process on the host reaches us through 127.0.0.1:<port> of its own host."""
    accepted: queue.Queue[paramiko.Channel] = queue.Queue()
    with connect(lab, lab.hosts[1]) as client:
        transport = client.get_transport()
        port = transport.request_port_forward(
            "127.0.0.1", 0, lambda channel, origin, server: accepted.put(channel))
        code = ("import socket, sys\n"
                f"s = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n"
                "s.sendall(b'ping'); s.shutdown(socket.SHUT_WR)\n"
                "print(s.makefile('rb').read().decode())\n")
        if lab.mode == "netns":  # the host's own sshd also listens on its 127.0.0.1
            code += "print(socket.create_connection(('127.0.0.1', 22), timeout=10).recv(8))\n"
        stdin, stdout, stderr = client.exec_command(python(code), timeout=20)
        channel = accepted.get(timeout=10)
        channel.settimeout(10)
        assert channel.makefile("rb").read() == b"ping"
        channel.sendall(b"pong")
        channel.close()
        out = stdout.read().decode()
        assert stdout.channel.status_event.wait(10)
        assert stdout.channel.exit_status == 0, stderr.read()
        assert out.split() == (["pong", "b'SSH-2.0-'"] if lab.mode == "netns" else ["pong"])


def test_crash_kills_everything_and_refuses_logins(lab):
    host = lab.hosts[2]
    client = connect(lab, host)
    try:
        # a silent remote process: it would outlive a mere disconnect
        code = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
        _, stdout, _ = client.exec_command(python(code), timeout=10)
        remote_pid = int(stdout.readline())
        assert remote_pid in lab.pids(host)
        lab.crash(host)
        assert lab.pids(host) == [] and not lab.alive(host)
        assert not sshlab._alive(remote_pid)
        assert stdout.read() == b""  # the open connection sees EOF
        transport = client.get_transport()
        transport.join(10)
        assert not transport.is_active()
    finally:
        client.close()
    with pytest.raises(OSError):  # nothing listens: refused at once
        connect(lab, host, timeout=FAIL_FAST)
    lab.restart(host)
    with connect(lab, host) as client:
        assert run(client, "true")[0] == 0


def test_deny_refuses_the_login_and_allow_restores_it(lab):
    host = lab.hosts[0]
    lab.deny(host)
    with pytest.raises(paramiko.AuthenticationException):
        connect(lab, host)
    with connect(lab, lab.hosts[1]) as client:  # other hosts are not affected
        assert run(client, "true")[0] == 0
    lab.allow(host)
    with connect(lab, host) as client:
        assert run(client, "true")[0] == 0


@pytest.mark.parametrize("how", sshlab.PARTITION_KINDS)
def test_partition_and_heal(lab, how):
    host, other = lab.hosts[1], lab.hosts[0]
    with connect(lab, host) as before:
        lab.partition(host, how)
        assert lab.host(host.name).partitioned == (how if lab.mode == "netns" else "stop")
        try:
            assert_unreachable(lab, host)
            with connect(lab, other) as client:
                assert run(client, "true")[0] == 0
            if lab.mode == "netns":  # the host still reaches itself
                out = subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, "-c",
                                      "import socket; print(socket.create_connection("
                                      "('127.0.0.1', 22), timeout=5).recv(8).decode())"],
                                     capture_output=True, text=True, timeout=20,
                                     stdin=subprocess.DEVNULL)
                assert out.stdout.strip() == "SSH-2.0-", out.stderr
        finally:
            lab.heal(host)
        with connect(lab, host) as client:
            assert run(client, "true")[0] == 0
        if how == "link" or lab.mode == "loopback":  # a short cut: the old connection survives
            assert run(before, "echo still", timeout=15) == (0, "still\n", "")


def test_a_second_lab_gets_its_own_addresses_and_leaves_nothing(ssh_lab, tmp_path):
    lab = sshlab.Lab.up(2, tmp_path / "second")
    try:
        assert lab.mode == ssh_lab.mode
        assert not {h.ip for h in lab.hosts} & {h.ip for h in ssh_lab.hosts}
        if lab.mode == "netns":
            assert lab.subnet != ssh_lab.subnet
            assert not {h.netns for h in lab.hosts} & {h.netns for h in ssh_lab.hosts}
        with connect(lab, lab.hosts[1]) as client:
            assert run(client, "true")[0] == 0
        sshd_pids = [h.sshd_pid for h in lab.hosts]
    finally:
        lab.down()
    assert_gone(lab, sshd_pids)
    lab.down()  # idempotent
    with connect(ssh_lab, ssh_lab.hosts[0]) as client:  # the other lab is untouched
        assert run(client, "true")[0] == 0


@pytest.mark.usefixtures("ssh_lab")  # skipped or failed like the other SSH tests
def test_failed_up_leaves_nothing(tmp_path):
    with pytest.raises(sshlab.LabError) as info:
        sshlab.Lab.up(2, tmp_path, sshd_extra=["NoSuchOption yes"])
    lab = info.value.lab
    assert lab is not None and lab.hosts
    assert_gone(lab, [h.sshd_pid for h in lab.hosts])
    assert "NoSuchOption" in (tmp_path / "h1" / "sshd.log").read_text() + (
        tmp_path / "h1" / "start.log").read_text()


@pytest.mark.usefixtures("ssh_lab")  # skipped or failed like the other SSH tests
def test_loopback_mode(tmp_path, monkeypatch):
    monkeypatch.setenv(sshlab.MODE_ENV, "loopback")
    lab = sshlab.Lab.up(2, tmp_path)
    try:
        assert lab.mode == "loopback" and all(h.ip.startswith("127.77.") for h in lab.hosts)
        h1, h2 = lab.hosts
        for host in lab.hosts:
            with connect(lab, host) as client:
                assert run(client, "true")[0] == 0
        lab.partition(h1)  # frozen: TCP still connects, the banner never comes
        try:
            assert_unreachable(lab, h1)
            with connect(lab, h2) as client:
                assert run(client, "true")[0] == 0
        finally:
            lab.heal(h1)
        with connect(lab, h1) as client:
            assert run(client, "true")[0] == 0
        lab.crash(h2)
        with pytest.raises(OSError):
            connect(lab, h2, timeout=FAIL_FAST)
        lab.restart(h2)
        with connect(lab, h2) as client:
            assert run(client, "true")[0] == 0
        sshd_pids = [h.sshd_pid for h in lab.hosts]
    finally:
        lab.down()
    assert_gone(lab, sshd_pids)


def assert_gone(lab: sshlab.Lab, sshd_pids: list[int | None]) -> None:
    """Nothing of ``lab`` is left: namespaces, links, route, sshd processes, state files."""
    assert lab._leftovers() == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=10).stdout if lab.mode == "netns" else ""
    assert lab.id not in namespaces
    for pid in sshd_pids:
        assert pid is None or not sshlab._alive(pid)
    assert not lab.state_file.exists()
    registry = [p.name for p in sshlab._registry_dir().glob("*.json")]
    assert f"{lab.id}.json" not in registry
    with socket.socket() as s:  # its addresses are free again
        if lab.mode == "loopback":
            s.bind(lab.hosts[0].address)
