"""CPython's own test_concurrent_futures process-pool tests, run against DistributedExecutor.

The tests are not copied here: ``tests/cpython_suite/runner.py`` imports them from the ``test``
package of a CPython interpreter that ships it, subclasses them for distexec and runs them; the
tests it excludes are listed there, each with its reason. This file runs that runner in a
subprocess, once per interpreter found (3.13 with the package layout, 3.10 with the single-module
layout), and passes when every test it runs passes.

Interpreters: ``DISTEXEC_CPYTHON_<MAJOR><MINOR>`` (e.g. DISTEXEC_CPYTHON_313) names one
explicitly; otherwise pyenv's versions and ``pythonX.Y`` on PATH are searched. An interpreter
counts only if it has ``test.test_concurrent_futures``. When none is found the test is skipped,
except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent  # the checkout: distexec/ lives here
RUNNER = Path(__file__).resolve().parent / "cpython_suite" / "runner.py"
VERSIONS = ("3.13", "3.10")
# The runner takes ~1 min per interpreter; this bounds a run that hangs.
RUN_TIMEOUT = 300
# How long workers may take to go away after the runner exited.
LEFTOVER_GRACE = 10.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _candidates(version: str) -> list[str]:
    explicit = os.environ.get(f"DISTEXEC_CPYTHON_{version.replace('.', '')}")
    if explicit:
        return [explicit]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin",
                                          f"python{version}")), reverse=True)
    on_path = shutil.which(f"python{version}")
    if on_path:
        found.append(on_path)
    return found


_found: dict[str, tuple[str | None, str]] = {}


def find_interpreter(version: str) -> tuple[str | None, str]:
    """(interpreter with test.test_concurrent_futures, or None; what was looked at)."""
    if version not in _found:
        notes = []
        result = None
        for python in _candidates(version):
            try:
                proc = subprocess.run(
                    [python, "-c", "import importlib.util as u; "
                     "print(u.find_spec('test.test_concurrent_futures') is not None)"],
                    capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                notes.append(f"{python}: {exc}")
                continue
            if proc.stdout.strip() == "True":
                result = python
                break
            notes.append(f"{python}: no test.test_concurrent_futures")
        _found[version] = (result, "; ".join(notes) or "no interpreter found")
    return _found[version]


def _pure_python_deps(directory: Path) -> Path:
    """A directory of symlinks to our cloudpickle and tblib (pure Python, so any 3.x can
    import them); never the whole site-packages of this interpreter."""
    import cloudpickle
    import tblib

    deps = directory / "deps"
    deps.mkdir()
    for mod in (cloudpickle, tblib):
        source = Path(mod.__file__)
        if source.name == "__init__.py":
            (deps / source.parent.name).symlink_to(source.parent, target_is_directory=True)
        else:
            (deps / source.name).symlink_to(source)
    return deps


def _session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == sid:
                out.append(proc)
        except (OSError, psutil.Error):
            pass
    return out


def _kill_session(sid: int) -> list[str]:
    """Kill what is left of the runner's session (workers included); describe it."""
    left = _session_processes(sid)
    described = []
    for proc in left:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    return described


def _failure_report(out: str) -> str:
    """The runner's failure tracebacks and verdict lines, without the list of exclusions."""
    lines = out.splitlines()
    report = []
    for i, line in enumerate(lines):
        if line.startswith(("FAIL: ", "ERROR: ")) and i and lines[i - 1].startswith("====="):
            end = next((j for j in range(i, len(lines)) if lines[j].startswith("Ran ")),
                       len(lines))
            report = lines[i - 1:end - 1]
            break
    verdict = [line for line in lines
               if line.startswith(("  FAIL ", "  HUNG ", "  ENV ", "  NEW ", "  MISSING ",
                                   "SUMMARY"))]
    text = "\n".join(report[:600] + [""] + verdict)
    return text if text.strip() else out[-20000:]


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"py{v}")
def test_cpython_concurrent_futures_suite(version, tmp_path):
    python, notes = find_interpreter(version)
    if python is None:
        if _in_ci() and not any(find_interpreter(v)[0] for v in VERSIONS):
            pytest.fail(f"CI is set but no interpreter with CPython's test package "
                        f"(test.test_concurrent_futures) was found for {', '.join(VERSIONS)} "
                        f"({notes}); install one or name it with "
                        f"DISTEXEC_CPYTHON_{version.replace('.', '')}")
        pytest.skip(f"no Python {version} with CPython's test.test_concurrent_futures ({notes})")

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSAFEPATH", "PYTHONSTARTUP",
                        "PYTHONNOUSERSITE", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(_pure_python_deps(tmp_path))])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    # A new session: the runner, its workers and child interpreters can all be found (and
    # killed) by session id, even if the runner dies first.
    proc = subprocess.Popen([python, str(RUNNER), "-v"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sid = proc.pid
    started = time.monotonic()
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out = True
        with_stacks = proc.pid
        try:
            os.kill(with_stacks, signal.SIGABRT)  # PYTHONFAULTHANDLER: dump the stacks
            out, _ = proc.communicate(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            with_stacks = None
        if with_stacks is None or proc.poll() is None:
            proc.kill()
            out, _ = proc.communicate()
    except BaseException:
        _kill_session(sid)
        proc.kill()
        proc.wait()
        raise
    elapsed = time.monotonic() - started

    # The workers are the runner's children in another session: the conftest leak check cannot
    # see them. Give them a moment to exit on their own, then kill what is left.
    if not timed_out:
        psutil.wait_procs(_session_processes(sid), timeout=LEFTOVER_GRACE)
    leftovers = _kill_session(sid)

    sys.stdout.write(out)  # shown by pytest on failure: every test's outcome, the exclusions
    if timed_out:
        pytest.fail(f"the runner did not finish within {RUN_TIMEOUT}s with {python}; "
                    f"output tail:\n{out[-20000:]}")
    assert proc.returncode == 0, (
        f"CPython's test_concurrent_futures failed against distexec with {python} "
        f"(exit status {proc.returncode}, {elapsed:.0f}s):\n{_failure_report(out)}")
    assert not leftovers, f"processes of the runner outlived it (killed): {leftovers}"
