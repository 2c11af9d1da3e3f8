"""Execute examples/notebook.ipynb for real, in an ipykernel, and check its cell outputs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"

# Seconds one cell may take, and the whole test.
CELL_TIMEOUT = 60
TEST_TIMEOUT = 180


@pytest.fixture
def kernelspec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that runs ipykernel in *this* interpreter.

    jupyter_client would find ipykernel's own spec in ``<venv>/share/jupyter/kernels``, but a
    user-level spec of the same name (``~/.local/share/jupyter``) would shadow it and could point
    at another Python. ``JUPYTER_PATH`` comes first in the search path, so ours always wins.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (distexec tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cell_text(cell) -> str:
    """Everything a code cell displayed: streams and plain-text results, concatenated."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", ""))
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}\n" + "\n".join(output.traceback))
    return "".join(parts)


def test_notebook_is_committed_clean() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_notebook_runs(kernelspec: str, python_env: dict[str, str]) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernelspec,
        timeout=CELL_TIMEOUT,
        startup_timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    # Raises CellExecutionError if a cell fails; shuts the kernel down in any case, so the
    # executor's workers (grandchildren of this process) exit too.
    client.execute(env=python_env)

    cells = {cell.id: cell for cell in nb.cells if cell.cell_type == "code"}
    outputs = {cell_id: cell_text(cell) for cell_id, cell in cells.items()}
    everything = "\n".join(f"--- {k}\n{v}" for k, v in outputs.items())

    assert outputs["lambda"].strip() == "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]", everything
    assert outputs["function"].strip() == "[0, 16, 111, 118]", everything
    assert outputs["closure"].strip() == "[3, 6, 9]", everything

    text = outputs["exception"]
    assert "caught: ValueError" in text, everything
    assert "Traceback (most recent call last):" in text, everything
    # The remote frame: the function defined in the notebook, as it ran in the worker, under the
    # cell's file name (whatever cloudpickle does with co_filename), with the cell's source line,
    # which only this kernel has.
    assert ", in parse_record" in text, everything
    assert "<dynamic-code>" not in text, everything
    assert "return key, int(value)" in text, everything

    # Uncaught, IPython names the remote frame after its cell and shows the source line.
    uncaught = ANSI.sub("", outputs["uncaught"])
    assert "ValueError: invalid literal for int() with base 10: 'deep'" in uncaught, everything
    assert re.search(r"Cell In\[\d+\], line 5", uncaught), uncaught
    assert "return key, int(value)" in uncaught, uncaught
    assert "ValueError: invalid literal for int() with base 10: 'four'" in text, everything
    if sys.version_info >= (3, 11):  # exception notes are printed by traceback from 3.11 on
        assert "[distexec] raised in task" in text, everything

    assert outputs["shutdown"] == "", everything
