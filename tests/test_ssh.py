"""Workers on other machines over SSH, against real OpenSSH servers (tests/sshlab.py): each
"host" is an sshd in its own network namespace with its own address (or on its own loopback
address where namespaces are not allowed). Under CI=true these run; they never skip there."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import textwrap
import venv

import psutil
import pytest

from distexec import BrokenDistributedExecutor, DistributedExecutor

from helpers import Gate, LogWatch, square, wait_for_pid_gone, wait_gate

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def pickle_test_code_by_value():
    """Remote workers cannot import this directory: send its functions by value."""
    import cloudpickle

    import helpers

    modules = [helpers, sys.modules[__name__]]
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    yield
    for module in modules:
        cloudpickle.unregister_pickle_by_value(module)


def gate_host(lab) -> str:
    """An address of this machine that the lab's hosts can reach."""
    if lab.mode == "netns":
        return str(ipaddress.ip_network(lab.subnet).network_address + 254)
    return "127.0.0.1"


def names(lab, n=None):
    return [h.name for h in lab.hosts[:n]]


def worker_processes() -> list[psutil.Process]:
    """Every distexec worker process on this machine (the lab's hosts share its PID space)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "distexec.worker" in " ".join(proc.info["cmdline"] or ()):
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return out


def hostname(_: object = None) -> str:
    import socket

    return socket.gethostname()


def echo(text: str) -> str:
    print(text, flush=True)
    return text


def where_is_distexec(_: object = None) -> str:
    import distexec

    return distexec.__file__


@pytest.fixture
def own_lab(tmp_path):
    """A fresh 2-host lab for tests that break hosts."""
    import sshlab

    if not os.access(sshlab.SSHD, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("sshd is missing under CI=true")
        pytest.skip("sshd is missing")
    lab = sshlab.Lab.up(2, tmp_path / "lab")
    try:
        yield lab
    finally:
        lab.down()


def test_map_over_several_hosts(ssh_lab):
    with DistributedExecutor(hosts=[f"{n} slots=2" for n in names(ssh_lab)],
                             ssh_config=str(ssh_lab.ssh_config)) as ex:
        assert ex.wait_for_workers(6, timeout=60) >= 6
        assert list(ex.map(square, range(200))) == [x * x for x in range(200)]
        origins = {w.origin for w in ex.workers()}
        assert origins == set(names(ssh_lab))
        assert all(not w.local for w in ex.workers())
        if ssh_lab.distinct_hostnames:
            seen = set(ex.map(hostname, range(60)))
            assert seen <= set(names(ssh_lab)) and len(seen) >= 2
    assert not [p for p in worker_processes() if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE and wait_for_pid_gone(p.pid, 10) is False]


def test_hosts_file_and_remote_output_in_logging(ssh_lab, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"# two hosts\n{ssh_lab.hosts[0].name} slots=1\n\n"
                     f"{ssh_lab.hosts[1].name} slots=1   # second\n")
    with LogWatch("distexec.remote") as log, DistributedExecutor(
            hosts=str(hosts), ssh_config=str(ssh_lab.ssh_config)) as ex:
        assert ex.submit(echo, "hello from a task").result(timeout=60) == "hello from a task"
        line = log.wait_for("hello from a task")
        assert line.startswith("[worker ") and " on h" in line


def test_unknown_host_key_is_refused_with_a_way_out(ssh_lab, tmp_path):
    host = ssh_lab.hosts[0]
    config = tmp_path / "ssh_config"
    config.write_text(textwrap.dedent(f"""\
        Host {host.name}
            HostName {host.ip}
            Port {host.port}
            User root
            IdentityFile {ssh_lab.key}
            IdentitiesOnly yes
            UserKnownHostsFile {tmp_path / 'empty_known_hosts'}
        """))
    ex = DistributedExecutor(hosts=[host.name], ssh_config=str(config))
    with pytest.raises(BrokenDistributedExecutor) as info:
        ex.submit(square, 2).result(timeout=60)
    text = str(info.value)
    assert "no host is usable" in text and "unknown host key" in text
    assert "ssh-keyscan" in text and "accept_new_host_keys=True" in text
    ex.shutdown()
    with DistributedExecutor(hosts=[host.name], ssh_config=str(config),
                             accept_new_host_keys=True) as ex:
        assert ex.submit(square, 3).result(timeout=60) == 9


def test_refused_login_and_wrong_python_leave_the_other_hosts_working(own_lab, tmp_path):
    h1, h2 = own_lab.hosts
    config = tmp_path / "ssh_config"  # the lab's, plus defaults for hosts given by address
    config.write_text(own_lab.ssh_config.read_text() + textwrap.dedent(f"""
        Host *
            User root
            IdentityFile {own_lab.key}
            IdentitiesOnly yes
            UserKnownHostsFile {own_lab.known_hosts}
        """))
    own_lab.deny(h1.name)
    try:
        with LogWatch() as log, DistributedExecutor(
                hosts=[h1.name, f"{h2.name} slots=2", f"{h2.ip} python=/no/such/python3"],
                ssh_config=str(config)) as ex:
            assert list(ex.map(square, range(30))) == [x * x for x in range(30)]
            refused = log.wait_for(f"host {h1.name} cannot be used")
            assert "login refused" in refused and "authorized_keys" in refused
            wrong = log.wait_for(f"host {h2.ip} cannot be used")
            assert "/no/such/python3 not found there" in wrong and "python=" in wrong
            assert {w.origin for w in ex.workers()} == {h2.name}
    finally:
        own_lab.allow(h1.name)


def test_a_python_of_another_minor_version_is_reported(ssh_lab):
    import glob

    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))
                        + glob.glob("/usr/bin/python3.[0-9]*"))
    # Another minor version than the one running the tests (each leg runs a different one).
    other = next((p for p in candidates
                  if f"/{here}." not in p and not p.endswith(f"python{here}")
                  and re.search(r"3\.(1[0-9])", p)), None)
    if other is None:
        pytest.skip("no interpreter of another minor version on this machine")
    ex = DistributedExecutor(hosts=[f"{ssh_lab.hosts[0].name} python={other}"],
                             ssh_config=str(ssh_lab.ssh_config))
    try:
        with pytest.raises(BrokenDistributedExecutor,
                           match=r"Python 3\.\d+\.\d+ there, 3\.") as info:
            ex.submit(square, 2).result(timeout=60)
        assert f"python=/path/to/python{here}" in str(info.value)
    finally:
        ex.shutdown()


def test_zero_install_on_a_host_where_distexec_is_not_importable(ssh_lab, tmp_path):
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # an interpreter with nothing installed
    python = str(bare / "bin" / "python")
    probe = subprocess.run([python, "-c", "import distexec"], capture_output=True,
                           cwd=tmp_path)
    assert probe.returncode != 0  # really not importable there
    with LogWatch() as log, DistributedExecutor(
            hosts=[f"{ssh_lab.hosts[0].name} slots=1 python={python}"],
            ssh_config=str(ssh_lab.ssh_config)) as ex:
        location = ex.submit(where_is_distexec).result(timeout=90)
        assert "/.cache/distexec/distexec-" in location
        assert ex.submit(square, 12).result(timeout=30) == 144
        assert log.matching("ready") and not log.matching("cannot be used")


def _host_running(ex, future):
    task_id = future._distexec_task_id
    return next(w for w in ex.workers() if task_id in w.held)


def test_a_host_crashing_mid_run_moves_its_tasks_to_the_other(own_lab):
    with LogWatch() as log, DistributedExecutor(
            hosts=[f"{h.name} slots=1" for h in own_lab.hosts],
            ssh_config=str(own_lab.ssh_config)) as ex, Gate(gate_host(own_lab)) as gate:
        ex.wait_for_workers(2, timeout=60)
        future = ex.submit(wait_gate, gate.address, "finished elsewhere")
        gate.wait_arrivals(1)
        victim = _host_running(ex, future)
        own_lab.crash(victim.origin)
        gate.wait_arrivals(2)  # it started again on the other host
        gate.open()
        assert future.result(timeout=60) == "finished elsewhere"
        assert log.matching("will run again")
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
        assert {w.origin for w in ex.workers()} == {h.name for h in own_lab.hosts} - {
            victim.origin}


def test_a_partitioned_host_is_given_up_and_its_workers_exit_after_heal(own_lab):
    with LogWatch() as log, DistributedExecutor(
            hosts=[f"{h.name} slots=1" for h in own_lab.hosts], heartbeat_timeout=2.0,
            ssh_config=str(own_lab.ssh_config)) as ex, Gate(gate_host(own_lab)) as gate:
        ex.wait_for_workers(2, timeout=60)
        future = ex.submit(wait_gate, gate.address, "finished elsewhere")
        gate.wait_arrivals(1)
        victim = _host_running(ex, future)
        own_lab.partition(victim.origin)
        try:
            log.wait_for("no heartbeat for", timeout=30)
            gate.wait_arrivals(2)  # the partitioned host's task runs again on the other host
            gate.open()
            assert future.result(timeout=60) == "finished elsewhere"
            assert ex.submit(square, 4).result(timeout=60) == 16
        finally:
            own_lab.heal(victim.origin)
    # Once the network is back, nothing of ours may be left on that host.
    assert wait_for_pid_gone(victim.pid, 60)


def test_no_remote_worker_survives_a_sigkilled_client(ssh_lab, tmp_path, python_env):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import cloudpickle
        import helpers
        from distexec import DistributedExecutor
        from helpers import wait_gate
        cloudpickle.register_pickle_by_value(helpers)
        ex = DistributedExecutor(hosts={names(ssh_lab, 2)!r},
                                 ssh_config={str(ssh_lab.ssh_config)!r})
        ex.wait_for_workers(2, timeout=60)
        future = ex.submit(wait_gate, sys.argv[1])
        print(" ".join(str(w.pid) for w in ex.workers() if w.pid), flush=True)
        future.result()
        """))
    with Gate(gate_host(ssh_lab)) as gate:
        client = subprocess.Popen([sys.executable, str(script), gate.address], env=python_env,
                                  stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            pids = [int(p) for p in client.stdout.readline().split()]
            gate.wait_arrivals(1)
            assert pids
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        finally:
            if client.poll() is None:
                client.kill()
            client.stdout.close()
        assert all(wait_for_pid_gone(pid, 30) for pid in pids)


def test_hosts_check_prints_one_row_per_host(ssh_lab, tmp_path, python_env):
    hosts = tmp_path / "hosts.txt"
    h1, h2 = ssh_lab.hosts[:2]
    hosts.write_text(f"{h1.name} slots=3\n{h2.name} python=/no/such/python3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "distexec.cli", "hosts", "check", str(hosts),
         "--ssh-config", str(ssh_lab.ssh_config)],
        capture_output=True, text=True, env=python_env, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr  # one host is not usable
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:8] == ["host", "ok", "python", "cloudpickle", "tblib", "distexec",
                                    "slots", "rtt_ms"]
    row1 = lines[1].split()
    assert row1[0] == h1.name and row1[1] == "yes" and row1[6] == "3"
    assert row1[2] == "{}.{}.{}".format(*sys.version_info[:3])
    assert float(row1[7]) > 0
    assert lines[2].split()[:2] == [h2.name, "NO"]
    assert "/no/such/python3 not found there" in lines[2]


def test_a_dead_host_does_not_hold_up_the_others(own_lab):
    h1, h2 = own_lab.hosts
    own_lab.partition(h1.name, "drop")  # connecting to it hangs until the connect timeout
    try:
        with LogWatch() as log, DistributedExecutor(
                hosts=[f"{h1.name} slots=1", f"{h2.name} slots=1"],
                ssh_config=str(own_lab.ssh_config)) as ex:
            assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
            # The work was done while the dead host was still being tried.
            assert not log.matching(f"host {h1.name} cannot be used")
            message = log.wait_for(f"host {h1.name} cannot be used", timeout=60)
            assert "cannot connect" in message
    finally:
        own_lab.heal(h1.name)


def test_proxyjump_from_the_ssh_config_is_honoured(ssh_lab, tmp_path):
    if ssh_lab.mode != "netns":
        pytest.skip("the jump needs hosts that reach each other by address (netns mode)")
    h1, h2 = ssh_lab.hosts[:2]
    config = tmp_path / "ssh_config"
    config.write_text(ssh_lab.ssh_config.read_text() + textwrap.dedent(f"""
        Host behind
            HostName {h2.ip}
            User root
            IdentityFile {ssh_lab.key}
            IdentitiesOnly yes
            UserKnownHostsFile {ssh_lab.known_hosts}
            ProxyJump {h1.name}
        """))
    with DistributedExecutor(hosts=["behind slots=1"], ssh_config=str(config)) as ex:
        assert ex.submit(square, 11).result(timeout=60) == 121
        if ssh_lab.distinct_hostnames:
            assert ex.submit(hostname).result(timeout=30) == h2.name


def test_proxycommand_and_ssh_agent_are_honoured(ssh_lab, tmp_path):
    # No IdentityFile: the key comes from an ssh-agent; the connection goes through a
    # ProxyCommand (OpenSSH's own client, forwarding to the host).
    import shutil

    if shutil.which("ssh-agent") is None or shutil.which("ssh") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssh-client is missing under CI=true")
        pytest.skip("openssh-client is missing")
    host = ssh_lab.hosts[0]
    agent = subprocess.run(["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")],
                           capture_output=True, text=True, check=True, timeout=10)
    pid = int(agent.stdout.split("SSH_AGENT_PID=")[1].split(";")[0])
    env_backup = os.environ.get("SSH_AUTH_SOCK")
    os.environ["SSH_AUTH_SOCK"] = str(tmp_path / "agent.sock")
    try:
        subprocess.run(["ssh-add", "-q", str(ssh_lab.key)], check=True, timeout=10,
                       capture_output=True)
        config = tmp_path / "ssh_config"
        config.write_text(textwrap.dedent(f"""\
            Host viaproxy
                HostName {host.ip}
                Port {host.port}
                User root
                UserKnownHostsFile {ssh_lab.known_hosts}
                ProxyCommand ssh -F {ssh_lab.ssh_config} -o BatchMode=yes -W %h:%p {host.name}
            """))
        with DistributedExecutor(hosts=["viaproxy slots=1"], ssh_config=str(config)) as ex:
            assert ex.submit(square, 13).result(timeout=60) == 169
    finally:
        if env_backup is None:
            os.environ.pop("SSH_AUTH_SOCK", None)
        else:
            os.environ["SSH_AUTH_SOCK"] = env_backup
        os.kill(pid, signal.SIGTERM)
        wait_for_pid_gone(pid, 10)


def test_direct_tcp_instead_of_the_tunnel(ssh_lab):
    with DistributedExecutor(hosts=[f"{ssh_lab.hosts[0].name} slots=1"],
                             ssh_config=str(ssh_lab.ssh_config), tunnel=False,
                             listen="0.0.0.0:0", key=os.urandom(32)) as ex:
        assert ex.submit(square, 8).result(timeout=60) == 64
        with pytest.raises(ValueError, match="tunnel=False"):
            DistributedExecutor(hosts=["x"], tunnel=False)


def test_a_busy_task_manager_does_not_lose_tunnelled_workers(ssh_lab):
    # A done-callback runs in the task manager thread; while it blocks, nothing reads the
    # workers' connections. A large result then waits in the tunnel: slowness, not an error.
    import threading

    with LogWatch() as log, DistributedExecutor(hosts=[f"{ssh_lab.hosts[0].name} slots=2"],
                                                ssh_config=str(ssh_lab.ssh_config)) as ex:
        ex.wait_for_workers(2, timeout=60)
        blocker = ex.submit(square, 1)
        blocker.add_done_callback(lambda _: threading.Event().wait(7))  # the busy stretch
        big = ex.submit(os.urandom, 30 * 1024 * 1024)
        assert len(big.result(timeout=90)) == 30 * 1024 * 1024
        assert not log.matching("lost worker")


def test_many_open_files_do_not_break_the_tunnels(ssh_lab):
    # select() cannot watch descriptors above 1024; the SSH code must not depend on it.
    files = [open(os.devnull) for _ in range(1100)]
    try:
        with DistributedExecutor(hosts=[f"{ssh_lab.hosts[0].name} slots=1"],
                                 ssh_config=str(ssh_lab.ssh_config)) as ex:
            assert ex.submit(square, 9).result(timeout=60) == 81
    finally:
        for fh in files:
            fh.close()


def test_no_usable_host_breaks_the_executor_even_with_direct_tcp(own_lab):
    h1 = own_lab.hosts[0]
    own_lab.deny(h1.name)
    try:
        ex = DistributedExecutor(hosts=[h1.name], ssh_config=str(own_lab.ssh_config),
                                 tunnel=False, listen="0.0.0.0:0", key=os.urandom(32))
        with pytest.raises(BrokenDistributedExecutor, match="no host is usable"):
            ex.submit(square, 2).result(timeout=60)
        ex.shutdown()
    finally:
        own_lab.allow(h1.name)


def where_worker(_: object = None) -> tuple:
    import distexec

    w = distexec.current_worker()
    assert w is not None
    return (w.origin, w.resources)


def test_host_settings_are_resources_for_placement(ssh_lab):
    """A hosts file's key=value settings make the host's pool: tasks that need them run only
    there, one per unit of the resource at a time."""
    h1, h2 = names(ssh_lab, 2)
    with DistributedExecutor(hosts=[f"{h1} slots=2 gpu=1 zone=a", f"{h2} slots=2"],
                             ssh_config=str(ssh_lab.ssh_config)) as ex:
        assert ex.wait_for_workers(4, timeout=60) >= 4
        gpu = ex.options(resources={"gpu": 1})
        placed = list(gpu.map(where_worker, range(6)))
        assert placed == [(h1, {"slots": 2.0, "gpu": 1.0, "zone": "a"})] * 6
        assert ex.options(resources={"zone": "a"}).submit(where_worker).result(
            timeout=60)[0] == h1
        # A task needing two slots runs on one host alone.
        assert ex.options(resources={"slots": 2}).submit(square, 5).result(timeout=60) == 25
