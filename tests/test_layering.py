"""The dependency arrows of the package hold (see ../shared STYLE: errors <- protocol,
serialization, scheduler, launchers <- manager <- executor; the worker never imports the manager,
the executor or paramiko; the local launcher takes only the progress layout from the protocol,
which it shares with the worker; the task manager's rooms with logic touch no sockets), and the
size limits of the code hold (no module over 900 lines, no class over 600, no function over
100)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(30)

PKG = pathlib.Path(__file__).resolve().parent.parent / "distexec"


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports_of(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
            found |= {f"{base}.{a.name}" if base.endswith(".") is False else base + a.name
                      for a in node.names}
    return found


def refers_to(imports: set[str], module: str) -> bool:
    return any(module in name.split(".") for name in imports)


# The rooms with logic: no sockets, selectors, processes or threads of their own (they act
# through the door, the launchers and the loop's deadlines), and no import of the loop itself.
ROOM_FORBIDDEN = ["executor", "socket", "selectors", "subprocess", "threading", "paramiko",
                  "loop", "connections"]

FORBIDDEN = {
    "worker.py": ["manager", "executor", "paramiko", "launchers"],
    "worker_client.py": ["manager", "executor", "paramiko", "launchers", "serialization"],
    "pulse.py": ["manager", "executor", "paramiko", "launchers", "serialization", "socket"],
    "protocol.py": ["manager", "executor", "serialization", "scheduler", "launchers", "worker"],
    "serialization.py": ["manager", "executor", "protocol", "socket", "scheduler"],
    "scheduler.py": ["manager", "executor", "protocol", "socket", "serialization"],
    "errors.py": ["manager", "executor", "protocol", "serialization", "scheduler"],
    "manager/loop.py": ["executor"],
    "manager/events.py": ["executor", "socket", "protocol", "serialization", "scheduler"],
    "manager/store.py": ["executor", "socket", "protocol", "serialization", "loop"],
    "manager/handshakes.py": ["executor", "socket", "protocol", "serialization", "loop"],
    # The door is the only room with sockets; it decides nothing about workers or tasks.
    "manager/connections.py": ["executor", "serialization", "scheduler", "loop", "fleet",
                               "dispatch", "launchers"],
    **{f"manager/{room}.py": ROOM_FORBIDDEN
       for room in ("lifecycle", "fleet", "watchdog", "dispatch", "recovery", "stopping",
                    "children", "dependencies", "status")},
    "launchers/base.py": ["manager", "executor", "paramiko", "serialization", "socket",
                          "protocol", "scheduler"],
    "launchers/local.py": ["manager", "executor", "paramiko", "serialization", "socket"],
    "options.py": ["manager", "executor", "protocol", "socket", "serialization", "launchers"],
    "monitor.py": ["manager", "executor", "paramiko", "launchers", "scheduler"],
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_dependency_direction(module):
    imports = imports_of(PKG / module)
    bad = [m for m in FORBIDDEN[module] if refers_to(imports, m)]
    assert not bad, f"{module} must not import {bad}"


def test_worker_process_does_not_load_the_manager():
    code = ("import sys, runpy; sys.argv = ['w', '--help'];\n"
            "try:\n    runpy.run_module('distexec.worker', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "bad = [m for m in ('distexec.manager', 'distexec.executor', 'paramiko', "
            "'distexec.launchers') if m in sys.modules]\n"
            "print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(PKG.parent), timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_paramiko_is_not_imported_by_the_core():
    code = "import sys, distexec; distexec.DistributedExecutor; print('paramiko' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(PKG.parent), timeout=20)
    assert proc.stdout.strip() == "False", proc.stderr


def test_a_local_executor_loads_only_what_it_uses():
    """Startup: without hosts, nothing of SSH; without multiprocessing objects, nothing of
    distexec.mpobjects; no monitor without a name; in the caller and in the worker."""
    code = textwrap.dedent("""
        import sys
        from distexec import DistributedExecutor

        def modules():
            import sys
            return sorted(sys.modules)

        with DistributedExecutor(max_workers=1) as ex:
            in_worker = ex.submit(modules).result(timeout=60)
        unwanted = ("paramiko", "distexec.launchers.ssh", "distexec.launchers.hosts",
                    "distexec.mpobjects", "distexec.monitor", "distexec.manager",
                    "distexec.executor", "cryptography", "nacl")
        print([m for m in sys.modules if m.startswith(unwanted[:5])])
        print([m for m in in_worker if m.startswith(unwanted)])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(PKG.parent), timeout=60)
    assert proc.returncode == 0, proc.stderr
    caller, worker = proc.stdout.strip().splitlines()[-2:]
    assert caller == "[]", f"the caller loaded {caller}"
    assert worker == "[]", f"the worker loaded {worker}"


MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 900, 600, 100


@pytest.mark.parametrize("path", sorted(p.relative_to(PKG).as_posix()
                                        for p in PKG.rglob("*.py")))
def test_sizes(path):
    source = (PKG / path).read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{path} is over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size, limit = node.end_lineno - node.lineno + 1, MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size, limit = node.end_lineno - node.lineno + 1, MAX_FUNCTION_LINES
        else:
            continue
        assert size <= limit, f"{path}: {node.name} is {size} lines (at most {limit})"


def test_every_module_says_what_it_owns():
    for path in PKG.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 40, f"{path.relative_to(PKG)} has no module docstring"
