"""Shared fixtures. Every test runs under a leak check: when it ends, no distexec thread and no
worker process of ours may remain (both are waited for, with a bound, never slept on)."""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil
import pytest

# Bound on how long a finished test's threads and worker processes may take to go away.
LEAK_GRACE = 15.0


def distexec_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("distexec-") and t.is_alive()]


def worker_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if "distexec.worker" in cmdline or "distexec-pulse" in cmdline:
                out.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return out


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves distexec threads or worker processes behind."""
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    deadline = time.monotonic() + LEAK_GRACE
    for thread in distexec_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    left = distexec_threads()
    gone, alive = psutil.wait_procs(worker_children(), timeout=max(0.1, deadline - time.monotonic()))
    for proc in alive:
        proc.kill()
    assert not left, f"distexec threads still running after the test: {left}"
    assert not alive, f"worker processes still running after the test: {alive}"


@pytest.fixture
def executor():
    """A two-worker executor, shut down (and leak-checked) after the test."""
    from distexec import DistributedExecutor

    ex = DistributedExecutor(max_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def python_env():
    """Environment for child Python scripts that must import distexec from this checkout."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def hand_workers(python_env):
    """Start workers by hand (``distexec worker``) for an executor; stopped after the test."""
    procs = []
    env = dict(python_env)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env["PYTHONPATH"]])

    def start(executor, n=1, *extra):
        """Start ``n`` workers joining ``executor`` (key in DISTEXEC_KEY); returns the Popens."""
        import subprocess

        env["DISTEXEC_KEY"] = executor.key.hex()
        for _ in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distexec.cli", "worker", executor.address, *extra],
                env=env, stdin=subprocess.DEVNULL))
        return procs[-n:]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks: skip the thread/process leak check")


PYTHON = sys.executable


# ---------------------------------------------------------------------------------------------
# SSH lab: real sshd "hosts" for SSH tests (see tests/sshlab.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ssh_lab(tmp_path_factory):
    """A 3-host SSH lab (h1..h3) shared by the whole session, torn down at its end.

    Skipped where the machine cannot run one (no sshd, no root), but under CI=true that is a
    failure: CI is expected to install openssh-server and run as root.
    """
    import sshlab

    def unavailable(reason):
        message = f"SSH lab unavailable: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    if not os.access(sshlab.SSHD, os.X_OK):
        unavailable(f"{sshlab.SSHD} is missing (apt-get install openssh-server)")
    try:
        lab = sshlab.Lab.up(3, tmp_path_factory.mktemp("sshlab"))
    except (sshlab.LabError, OSError, ValueError) as exc:
        unavailable(str(exc))
    try:
        yield lab
    finally:
        lab.down()


_pytest_configure_before_ssh = pytest_configure


def pytest_configure(config):  # noqa: F811 - extends the hook defined above
    _pytest_configure_before_ssh(config)
    config.addinivalue_line("markers", "ssh: runs against the ssh_lab hosts (real sshd)")


def pytest_collection_modifyitems(config, items):
    """Tests that use ssh_lab get the ``ssh`` marker, so ``-m 'not ssh'`` leaves them out."""
    for item in items:
        if "ssh_lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ssh)
