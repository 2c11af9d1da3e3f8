"""The package stays typed (mypy --strict) and lint-clean (ruff); CI runs the README's test
command."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_mypy_strict():
    pytest.importorskip("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(60)
def test_ruff():
    pytest.importorskip("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "distexec"], cwd=ROOT,
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(30)
def test_ci_runs_exactly_the_readme_test_command():
    """README.md leads with two commands: the example, then the tests; .ci/run must run the
    second one verbatim (and nothing else after changing to the repository root)."""
    import re

    root = ROOT
    blocks = re.findall(r"```sh\n(.*?)```", (root / "README.md").read_text(), re.S)
    test_command = blocks[1].strip()
    commands = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', test_command], commands
