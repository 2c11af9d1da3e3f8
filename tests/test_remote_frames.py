"""Remote frames of code pickled by value keep their file name and line numbers.

cloudpickle 3.1.3 renames every code object it pickles by value to ``<dynamic-code>``; distexec
puts the real name back, so that a traceback re-raised in the caller names the script and shows
its source lines. Checked in a real script (functions in ``__main__`` travel by value), for
every kind of callable a user defines there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

from distexec import serialization

pytestmark = pytest.mark.timeout(90)

SCRIPT = textwrap.dedent('''\
    import traceback
    from distexec import DistributedExecutor

    def plain(x):
        raise ValueError("plain %d" % x)            # line 5

    def outer(x):
        def nested():
            raise KeyError("nested")                # line 9
        return nested()

    def make_closure(n):
        def closure(x):
            return x / n                            # line 14
        return closure

    class Model:
        def fit(self, x):
            raise RuntimeError("method")            # line 19

        @staticmethod
        def static(x):
            raise TypeError("static")               # line 23

    def last_frame(fn, *args):
        try:
            fn(*args).result()
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            print(f"{frame.name}|{frame.filename}|{frame.lineno}|{frame.line}")

    with DistributedExecutor(max_workers=1) as ex:
        last_frame(ex.submit, plain, 1)
        last_frame(ex.submit, outer, 1)
        last_frame(ex.submit, make_closure(0), 1)
        last_frame(ex.submit, Model().fit, 1)
        last_frame(ex.submit, Model.static, 1)
        last_frame(ex.submit, lambda x: x[3], [])    # line 38
''')

EXPECTED = [
    ("plain", 5, 'raise ValueError("plain %d" % x)'),
    ("nested", 9, 'raise KeyError("nested")'),
    ("closure", 14, "return x / n"),
    ("fit", 19, 'raise RuntimeError("method")'),
    ("static", 23, 'raise TypeError("static")'),
    ("<lambda>", 38, "last_frame(ex.submit, lambda x: x[3], [])"),
]


def test_frames_of_main_callables_name_the_script(tmp_path, python_env):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=python_env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines()]
    assert len(rows) == len(EXPECTED), proc.stdout + proc.stderr
    for (name, filename, lineno, line), (want_name, want_lineno, want_line) in zip(rows, EXPECTED):
        assert (name, filename, int(lineno)) == (want_name, str(script), want_lineno), rows
        assert line.startswith(want_line), rows


def test_code_objects_keep_file_name_through_our_pickler():
    source = "def f():\n    def g():\n        return 1\n    return g\n"
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(source, "/some/where/cell.py", "exec"), namespace)
    f = namespace["f"]
    assert isinstance(f, types.FunctionType)
    rebuilt = serialization.loads(serialization.dumps_inband(f))
    assert rebuilt.__code__.co_filename == "/some/where/cell.py"
    inner = [c for c in rebuilt.__code__.co_consts if isinstance(c, types.CodeType)]
    assert [c.co_filename for c in inner] == ["/some/where/cell.py"]
    assert rebuilt.__code__.co_firstlineno == 1 and rebuilt()() == 1
