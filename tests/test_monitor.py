"""Named executors and ``distexec status`` (issue 5, second part): the per-user registry, the
status client, and the command run from another process against a real executor."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from distexec import DistributedExecutor, monitor

from helpers import Gate, square, wait_gate

pytestmark = pytest.mark.timeout(60)

# Bound on one `distexec status` run (it connects to a local executor and prints).
CLI_TIMEOUT = 30


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    """A private registry for this test, in this process's environment."""
    path = tmp_path / "run"
    monkeypatch.setenv("DISTEXEC_RUNTIME_DIR", str(path))
    monkeypatch.delenv("DISTEXEC_KEY", raising=False)
    return path


@pytest.fixture
def status_env(python_env, runtime_dir):
    """Environment for `distexec status` subprocesses: same registry, no key."""
    env = dict(python_env, DISTEXEC_RUNTIME_DIR=str(runtime_dir))
    env.pop("DISTEXEC_KEY", None)
    return env


def status(env, *args):
    return subprocess.run([sys.executable, "-m", "distexec.cli", "status", *args],
                          capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT)


def rows(text):
    """The lines of a report, split into cells."""
    return [line.split() for line in text.splitlines()]


@pytest.fixture
def busy(runtime_dir):
    """A running executor named 'fitting' whose one worker runs a gated 'fit' task, with one
    more 'fit' task and one untagged task waiting. Yields (executor, gate, running future)."""
    with DistributedExecutor(max_workers=1, name="fitting") as ex, Gate() as gate:
        fits = ex.options(tag="fit")
        running = fits.submit(wait_gate, gate.address, "done")
        gate.wait_arrivals(1)
        waiting = [fits.submit(square, 3), ex.submit(square, 4)]
        yield ex, gate, running
        gate.open()
        assert running.result() == "done"
        assert [f.result() for f in waiting] == [9, 16]


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["a", "fit-2024_v1.3", "_x", "-", "A" * 64, "0"])
def test_valid_names_are_returned(name):
    assert monitor.check_name(name) == name


@pytest.mark.parametrize(("name", "problem"), [
    ("", "it is empty"),
    (".hidden", "starts with '.'"),
    ("a/b", "'/'"),
    ("x" * 65, "65 characters"),
    ("caf\u00e9", "'\u00e9'"),
    ("two words", "' '"),
    ("line\n", "'\\n'"),
])
def test_invalid_names_say_what_is_allowed(name, problem):
    with pytest.raises(ValueError) as info:
        monitor.check_name(name)
    message = str(info.value)
    assert problem in message
    assert "letters, digits, '.', '_' and '-'" in message


def test_a_name_must_be_a_string():
    with pytest.raises(TypeError, match="must be a str"):
        monitor.check_name(3)  # type: ignore[arg-type]


def test_the_executor_checks_its_name_when_created():
    with pytest.raises(ValueError, match="invalid executor name"):
        DistributedExecutor(max_workers=1, name="../escape")


# ---------------------------------------------------------------------------- registry
def test_registration_is_private_and_removed_at_shutdown(runtime_dir):
    ex = DistributedExecutor(max_workers=1, name="private").start()
    try:
        path = runtime_dir / "private.json"
        assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        entry = json.loads(path.read_text())
        assert entry["address"] == ex.address and entry["key"] == ex.key.hex()
        assert entry["pid"] == os.getpid() and entry["name"] == "private"
        assert monitor.lookup("private") == (ex.address, ex.key)
        assert [e["name"] for e in monitor.list_executors()] == ["private"]
    finally:
        ex.shutdown()
    assert not path.exists()
    assert monitor.list_executors() == []
    with pytest.raises(LookupError, match="none are running"):
        monitor.lookup("private")


def test_a_name_in_use_is_refused_at_start(runtime_dir):
    with DistributedExecutor(max_workers=1, name="taken").start() as first:
        second = DistributedExecutor(max_workers=1, name="taken")
        with pytest.raises(ValueError) as info:
            second.start()
        message = str(info.value)
        assert "an executor named 'taken' is already running" in message
        assert f"pid {os.getpid()}" in message and first.address in message
        assert "choose another name" in message
        assert first.submit(square, 5).result() == 25  # the first one is unaffected
        assert monitor.lookup("taken") == (first.address, first.key)
    # Once the first has stopped, the name is free again.
    with DistributedExecutor(max_workers=1, name="taken") as again:
        assert again.submit(square, 2).result() == 4
        assert monitor.lookup("taken")[0] == again.address


def test_a_stale_registration_is_replaced_and_removed(runtime_dir, python_env):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, check=True)
    dead_pid = int(dead.stdout)  # exited and reaped: nothing runs under that pid any more
    runtime_dir.mkdir(mode=0o700)
    stale = {"name": "old", "address": "127.0.0.1:1", "key": "00" * 32, "pid": dead_pid,
             "started": 0.0}
    (runtime_dir / "old.json").write_text(json.dumps(stale))
    (runtime_dir / "gone.json").write_text(json.dumps(dict(stale, name="gone")))
    with pytest.raises(LookupError, match="no executor named 'gone'"):
        monitor.lookup("gone")
    assert not (runtime_dir / "gone.json").exists()
    path = monitor.register("old", "127.0.0.1:2", b"\x01" * 32)
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert monitor.lookup("old") == ("127.0.0.1:2", b"\x01" * 32)
    finally:
        monitor.unregister(path)
    assert not path.exists()
    monitor.unregister(path)  # a second time: nothing to do, no error


def test_unregister_leaves_a_registration_it_does_not_own(runtime_dir):
    path = monitor.register("mine", "127.0.0.1:3", b"\x02" * 32)
    monitor.unregister(path)
    other = {"name": "mine", "address": "127.0.0.1:4", "key": "03" * 32, "pid": os.getppid(),
             "started": 0.0}
    path.write_text(json.dumps(other))  # another (live) process took the name since
    monitor.unregister(path)
    assert path.exists()
    assert monitor.lookup("mine") == ("127.0.0.1:4", b"\x03" * 32)


def test_a_registry_others_can_read_is_refused(runtime_dir, status_env):
    runtime_dir.mkdir(mode=0o700)
    os.chmod(runtime_dir, 0o755)
    with pytest.raises(monitor.RegistryError, match="other users may access it"):
        monitor.registry_dir()
    ex = DistributedExecutor(max_workers=1, name="exposed")
    with pytest.raises(monitor.RegistryError, match="chmod 700"):
        ex.start()
    assert list(runtime_dir.iterdir()) == []
    proc = status(status_env, "exposed")
    assert proc.returncode == 1 and "chmod 700" in proc.stderr


# ---------------------------------------------------------------------------- distexec status
def test_status_by_name_shows_tags_and_the_running_task(busy, status_env):
    ex, _gate, running = busy
    proc = status(status_env, "fitting")
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert header.startswith(f"executor 'fitting' at {ex.address}, pid {os.getpid()}, up ")
    assert "running, max_workers 1" in header
    table = rows(proc.stdout)
    assert ["tag", "waiting", "running", "finished", "failed", "cancelled"] in table
    assert ["'fit'", "1", "1", "0", "0", "0"] in table
    assert ["(no", "tag)", "1", "0", "0", "0", "0"] in table
    assert ["total", "2", "1", "0", "0", "0"] in table
    (info,) = ex.workers()
    worker_rows = [r for r in table if r[:2] == [str(info.worker_id), "local"]]
    assert len(worker_rows) == 1, proc.stdout
    row = worker_rows[0]
    assert row[3:8] == [str(info.pid), "busy", str(running._distexec_task_id), "1", "0"]
    assert "\x1b" not in proc.stdout


def test_status_as_json(busy, status_env):
    ex, _gate, running = busy
    proc = status(status_env, "fitting", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["name"] == "fitting" and report["address"] == ex.address
    assert report["pid"] == os.getpid() and report["state"] == "running"
    assert report["max_workers"] == 1 and report["uptime"] > 0
    assert sorted(report["tags"], key=str) == sorted([["'fit'", 1, 1, 0, 0, 0],
                                                      [None, 1, 0, 0, 0, 0]], key=str)
    (worker,) = report["workers"]
    assert worker["running"] == running._distexec_task_id
    assert worker["held"] == [running._distexec_task_id]
    assert worker["state"] == "busy" and worker["tasks_done"] == 0


def test_status_by_address_with_the_key(busy, status_env, tmp_path):
    ex, _gate, _running = busy
    proc = status(dict(status_env, DISTEXEC_KEY=ex.key.hex()), ex.address, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "fitting"
    key_file = tmp_path / "key"
    key_file.write_text(ex.key.hex() + "\n")
    proc = status(status_env, ex.address, "--key-file", str(key_file))
    assert proc.returncode == 0, proc.stderr
    assert ["'fit'", "1", "1", "0", "0", "0"] in rows(proc.stdout)


def test_a_wrong_key_is_refused_and_the_executor_carries_on(busy, status_env):
    ex, gate, running = busy
    wrong = bytes(b ^ 0xFF for b in ex.key).hex()
    proc = status(dict(status_env, DISTEXEC_KEY=wrong), ex.address)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert f"distexec status: {ex.address} refused the key" in proc.stderr
    # Nothing was disturbed: the report still comes, the tasks still finish.
    assert status(status_env, "fitting").returncode == 0
    gate.open()
    assert running.result() == "done"
    assert ex.submit(square, 6).result() == 36


def test_an_address_needs_a_readable_hex_key(busy, status_env):
    ex, _gate, _running = busy
    proc = status(status_env, ex.address)
    assert proc.returncode == 2
    assert "no key" in proc.stderr and "DISTEXEC_KEY" in proc.stderr
    proc = status(dict(status_env, DISTEXEC_KEY="not hex"), ex.address)
    assert proc.returncode == 2 and "the key in DISTEXEC_KEY is not hexadecimal" in proc.stderr
    proc = status(status_env, ex.address, "--key-file", "/nonexistent/key")
    assert proc.returncode == 2 and "cannot read the key file /nonexistent/key" in proc.stderr


def test_an_unknown_name_lists_the_running_ones(busy, status_env):
    ex, _gate, _running = busy
    proc = status(status_env, "fiting")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no executor named 'fiting' is running" in proc.stderr
    assert f"running: fitting (pid {os.getpid()}, at {ex.address})" in proc.stderr


def test_no_executor_there(status_env):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    proc = status(dict(status_env, DISTEXEC_KEY="00" * 32), f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert f"no executor answers at 127.0.0.1:{port}: connection refused" in proc.stderr
    proc = status(status_env, "nobody")
    assert proc.returncode == 1 and "none are running" in proc.stderr
    proc = status(status_env)
    assert proc.returncode == 1 and "no named executor is running" in proc.stderr


def test_without_a_target_the_only_executor_is_shown(runtime_dir, status_env):
    quiet = dict(max_workers=0, listen="127.0.0.1:0")
    with DistributedExecutor(name="alpha", **quiet).start() as alpha:
        proc = status(status_env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"executor 'alpha' at {alpha.address}")
        assert "no tasks yet" in proc.stdout and "no workers" in proc.stdout
        with DistributedExecutor(name="beta", **quiet).start():
            proc = status(status_env)
            assert proc.returncode == 2 and proc.stdout == ""
            assert "2 executors are running: alpha, beta" in proc.stderr


def test_watch_repeats_until_the_executor_stops(runtime_dir, status_env):
    ex = DistributedExecutor(max_workers=1, name="watched")
    with Gate() as gate:
        running = ex.options(tag="fit").submit(wait_gate, gate.address, 1)
        gate.wait_arrivals(1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "distexec.cli", "status", "watched", "--watch", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=status_env)
        try:
            reports = 0
            seen = []
            while reports < 2:
                line = proc.stdout.readline()
                assert line, f"the watch ended early: {seen} {proc.stderr.read()}"
                seen.append(line)
                reports += line.startswith("executor 'watched' at ")
            assert ["'fit'", "0", "1", "0", "0", "0"] in rows("".join(seen))
            gate.open()
            assert running.result() == 1
            ex.shutdown()
            rest = proc.stdout.read()  # to the end: the watch exits by itself
            assert proc.wait(CLI_TIMEOUT) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            ex.shutdown()
    last = rest.strip().splitlines()[-1]
    assert last.startswith("executor watched stopped"), rest
    assert "\x1b" not in "".join(seen) + rest  # no screen clearing when not on a terminal


def test_watch_needs_a_positive_interval(status_env):
    proc = status(status_env, "x", "--watch", "0")
    assert proc.returncode == 2 and "positive number of seconds" in proc.stderr
    # "--watch NAME" with no number: NAME is the target, with the default interval.
    proc = status(status_env, "--watch", "nobody")
    assert proc.returncode == 1 and "no executor named 'nobody'" in proc.stderr


def test_format_status_is_plain_and_deterministic():
    report = {
        "name": "demo", "address": "127.0.0.1:7000", "pid": 42, "uptime": 3725.5,
        "state": "shutting down", "max_workers": 2,
        "tags": [[None, 0, 0, 3, 0, 0], ["'fit'", 10, 2, 120, 1, 4]],
        "workers": [
            {"worker_id": 1, "host": "h", "pid": 100, "state": "busy", "local": True,
             "origin": "local", "held": [7, 8], "running": 7, "tasks_done": 61,
             "last_heartbeat_age": 0.31},
            {"worker_id": 12, "host": "node-2", "pid": None, "state": "idle", "local": False,
             "origin": "joined", "held": [], "running": None, "tasks_done": 0,
             "last_heartbeat_age": None},
        ],
    }
    expected = "\n".join([
        "executor 'demo' at 127.0.0.1:7000, pid 42, up 1 h 02 min, shutting down, "
        "max_workers 2",
        "",
        "tag       waiting  running  finished  failed  cancelled",
        "(no tag)        0        0         3       0          0",
        "'fit'          10        2       120       1          4",
        "total          10        2       123       1          4",
        "",
        "worker  origin  host    pid  state  running  held  done  heartbeat",
        "     1  local   h       100  busy         7     2    61  0.3 s ago",
        "    12  joined  node-2    -  idle         -     0     0  -",
    ])
    assert monitor.format_status(report) == expected
    assert monitor.format_status(report) == expected


def test_worker_subcommand_offers_resources(python_env):
    proc = subprocess.run([sys.executable, "-m", "distexec.cli", "worker", "--help"],
                          capture_output=True, text=True, env=python_env, timeout=CLI_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "--resources SPEC" in proc.stdout and "gpu=1,mem=16" in proc.stdout
