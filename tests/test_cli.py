"""The `distexec` command and the worker's command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distexec import __version__

pytestmark = pytest.mark.timeout(30)


def run(*args, env=None, input_=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=20,
                          env=env, input=input_)


def test_version_command(python_env):
    proc = run("-m", "distexec.cli", "version", env=python_env)
    assert proc.returncode == 0, proc.stderr
    assert f"distexec     {__version__}" in proc.stdout
    assert "cloudpickle" in proc.stdout and "python" in proc.stdout


def test_worker_without_key_explains(python_env):
    env = dict(python_env)
    env.pop("DISTEXEC_KEY", None)
    proc = run("-m", "distexec.cli", "worker", "127.0.0.1:1", env=env)
    assert proc.returncode == 2
    assert "no key" in proc.stderr and "DISTEXEC_KEY" in proc.stderr


def test_worker_with_unreachable_manager_explains(python_env):
    env = dict(python_env, DISTEXEC_KEY="00" * 32)
    proc = run("-m", "distexec.worker", "--connect", "127.0.0.1:1", "--connect-timeout", "0.3",
               env=env)
    assert proc.returncode == 4
    assert "cannot connect to the task manager at 127.0.0.1:1" in proc.stderr
    assert "kept trying for 0.3 s" in proc.stderr


def test_worker_rejects_a_bad_address(python_env):
    env = dict(python_env, DISTEXEC_KEY="00" * 32)
    proc = run("-m", "distexec.worker", "--connect", "nonsense", env=env)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr
