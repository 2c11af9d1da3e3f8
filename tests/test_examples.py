"""Run every ``examples/*.py`` script as a user would, and check what it prints.

New examples are picked up automatically: each must exit 0 without writing a traceback. Add the
lines it must print to ``EXPECTED`` so that the test notices when it misbehaves.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# Seconds one example may take; each is meant to run in about a second.
EXAMPLE_TIMEOUT = 60

# Per example: regular expressions that must each match a whole line of its output, in order.
EXPECTED: dict[str, list[str]] = {
    "dropin.py": [
        r"map: 1229 primes below 10000",
        r"map: 2262 primes below 20000",
        r"map: 3245 primes below 30000",
        r"map: 4203 primes below 40000",
        r"as_completed: (669 primes below 5000|5133 primes below 50000)",
        r"as_completed: (669 primes below 5000|5133 primes below 50000)",
        r"lambda: squares = \[0, 1, 4, 9, 16, 25, 36, 49, 64, 81\]",
        r"remote exception: ZeroDivisionError: division by zero",
        r"  raised in mean\(\) at dropin\.py:\d+",
        r"  \[distexec\] raised in task \d+ on worker \d+ \(host .+, pid \d+\)",
        r"done in \d+\.\ds",
    ],
    "crash_resilience.py": [
        r"batch 0: 2262 primes",
        r"batch 1: 2360 primes",
        r"batch 2: 2464 primes",
        r"batch 3: WorkerLostError after 3 attempts:",
        r"  attempt 1 on worker \d+ \(pid \d+ on .+\): exit code 9",
        r"  attempt 2 on worker \d+ \(pid \d+ on .+\): exit code 9",
        r"  attempt 3 on worker \d+ \(pid \d+ on .+\): exit code 9",
        r"batch 4: 2668 primes",
        r"batch 5: 2762 primes",
        r"after the crashes the executor still works: \[2262, 2360\]",
        r"executor shut down cleanly",
    ],
    "toolbox.py": [
        r"tags: word counts collected by tag: \[2, 3, 4\]",
        r"retry_on: <contents of example.org/a>",
        r"fallback: <cached copy of example.org/b, after ConnectionError>",
        r"priority: urgent result 2, then 8",
        r"resources: job 0 ran with gpu=1",
        r"resources: job 1 ran with gpu=1",
        r"decline: 40",
        r"dependencies: total = 14",
        r"dependencies: DependencyError, caused by ConnectionError",
        r"store: \[3, 6, 9\]",
        r"share: \[9, 90000, 9000000\]",
        r"nested: tree_sum\(0, 64\) = 2016",
        r"status: tag 'late' \(0, 0, 3, 0, 0\), 2 workers",
        r"distexec status: exit 0, names the executor",
        r"executor shut down cleanly",
    ],
}

# Per example: how many lines may match a pattern (checks that nothing else failed).
EXACT_COUNTS: dict[str, dict[str, int]] = {
    "dropin.py": {r"as_completed: ": 2},
    "crash_resilience.py": {r"WorkerLostError": 1, r"batch \d+: \d+ primes": 5},
}


@pytest.mark.timeout(10)
def test_examples_found() -> None:
    names = {path.name for path in EXAMPLES}
    assert set(EXPECTED) <= names, f"examples with expectations but no file: {set(EXPECTED) - names}"


@pytest.mark.timeout(EXAMPLE_TIMEOUT + 30)
@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example(path: Path, python_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(path.relative_to(ROOT))],
        cwd=ROOT,
        env=python_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT,
    )
    report = f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "Traceback" not in proc.stderr, report
    lines = proc.stdout.splitlines()
    assert lines, report

    # The expected lines must appear in this order (other lines may come in between).
    position = 0
    for pattern in EXPECTED.get(path.name, []):
        regex = re.compile(pattern)
        while position < len(lines) and not regex.fullmatch(lines[position]):
            position += 1
        assert position < len(lines), f"no line matching {pattern!r} (in order)\n{report}"
        position += 1

    for pattern, count in EXACT_COUNTS.get(path.name, {}).items():
        found = [line for line in lines if re.search(pattern, line)]
        assert len(found) == count, f"{len(found)} lines match {pattern!r}, expected {count}\n{report}"
