"""Build the Sphinx documentation with warnings as errors.

The build runs in a subprocess with the interpreter running the tests, so it uses the Sphinx and
myst-parser of this environment (the ``docs`` extra) and imports distexec from this checkout
(``docs/conf.py`` puts the repository root first on ``sys.path``). It needs no network.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

pytest.importorskip("sphinx", reason="building the docs needs the 'docs' extra")
pytest.importorskip("myst_parser", reason="building the docs needs the 'docs' extra")

# Seconds the whole build may take (a cold build takes a few seconds).
BUILD_TIMEOUT = 240


@pytest.mark.timeout(BUILD_TIMEOUT + 30)
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    out = tmp_path
    # -W: every warning fails the build; --keep-going: report all of them, not just the first.
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(out)]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"sphinx-build did not finish within {BUILD_TIMEOUT} s\n"
                    f"--- stdout ---\n{exc.stdout}\n--- stderr ---\n{exc.stderr}")
    assert proc.returncode == 0, (
        f"sphinx-build failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    for page in ("index", "quickstart", "concepts", "differences", "api", "cli", "internals",
                 "changelog"):
        assert (out / f"{page}.html").is_file(), f"{page}.html was not built"
    api = (out / "api.html").read_text(encoding="utf-8")
    import distexec

    for name in distexec.__all__:
        assert f'id="distexec.{name}"' in api, f"distexec.{name} is missing from the API reference"
