"""Remote exceptions come back as their original type, with remote frames, chains and notes."""

from __future__ import annotations

import sys
import threading
import traceback

import pytest

from distexec import RemoteError, TaskPicklingError, TaskUnpicklingError

pytestmark = pytest.mark.timeout(60)


class CustomError(Exception):
    pass


def nested_failure(x):
    def inner():
        raise KeyError(x)

    try:
        inner()
    except KeyError as exc:
        raise CustomError(f"wrapped {x}") from exc


def implicit_chain():
    try:
        {}["missing"]
    except KeyError:
        raise RuntimeError("while handling")


def raise_group():
    raise ExceptionGroup("several", [ValueError("one"), TypeError("two")])  # noqa: F821


class HoldsLock(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable():
    raise HoldsLock("cannot travel")


def _explode_on_load():
    raise RuntimeError("refusing to unpickle here")


class LoadsOnlyInWorker(Exception):
    def __reduce__(self):
        import os

        if os.environ.get("DISTEXEC_TEST_CLIENT") == "1":
            return (_explode_on_load, ())
        return (LoadsOnlyInWorker, self.args)


def raise_unloadable():
    raise ValueError("plain")


def raise_system_exit():
    raise SystemExit(3)


class ExplodingResult:
    def __reduce__(self):
        return (_explode_on_load, ())


def return_exploding():
    return ExplodingResult()


def format_exc(exc):
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def test_original_type_with_remote_frames_and_note(executor):
    future = executor.submit(nested_failure, 7)
    with pytest.raises(CustomError, match="wrapped 7") as info:
        future.result()
    text = format_exc(info.value)
    assert "in nested_failure" in text and "in inner" in text
    assert 'raise CustomError(f"wrapped {x}") from exc' in text  # remote source line
    assert isinstance(info.value.__cause__, KeyError)
    notes = getattr(info.value, "__notes__", [])
    assert any("worker" in n and "pid" in n and "task" in n for n in notes), notes


def test_implicit_context_preserved(executor):
    with pytest.raises(RuntimeError) as info:
        executor.submit(implicit_chain).result()
    assert isinstance(info.value.__context__, KeyError)
    assert "During handling of the above exception" in format_exc(info.value)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups need Python 3.11")
def test_exception_group_preserved(executor):
    with pytest.raises(ExceptionGroup) as info:  # noqa: F821
        executor.submit(raise_group).result()
    kinds = sorted(type(e).__name__ for e in info.value.exceptions)
    assert kinds == ["TypeError", "ValueError"]


def test_unpicklable_exception_becomes_stand_in(executor):
    with pytest.raises(RemoteError) as info:
        executor.submit(raise_unpicklable).result()
    err = info.value
    assert err.type_name.endswith("HoldsLock")
    assert err.message == "cannot travel"
    assert "raise_unpicklable" in err.remote_traceback
    assert "pickling it failed on the worker" in err.reason
    assert "raise_unpicklable" in format_exc(err)  # remote frames kept on the stand-in


def test_exception_that_cannot_be_unpickled_here(executor, monkeypatch):
    monkeypatch.setenv("DISTEXEC_TEST_CLIENT", "1")  # workers were started without it
    with pytest.raises(RemoteError) as info:
        executor.submit(lambda: (_ for _ in ()).throw(LoadsOnlyInWorker("odd"))).result()
    assert info.value.type_name.endswith("LoadsOnlyInWorker")
    assert "unpickling it failed here" in info.value.reason
    assert "refusing to unpickle here" in info.value.reason


def test_system_exit_in_task_is_returned_not_fatal(executor):
    with pytest.raises(SystemExit) as info:
        executor.submit(raise_system_exit).result()
    assert info.value.code == 3
    assert executor.submit(pow, 2, 3).result() == 8


def test_unpicklable_argument_fails_only_that_future(executor):
    with pytest.raises(TaskPicklingError) as info:
        executor.submit(len, threading.Lock()).result()
    message = str(info.value)
    assert "task" in message and "len" in message and "arguments" in message
    assert executor.submit(pow, 3, 2).result() == 9


def test_unpicklable_function_fails_only_that_future(executor):
    class CallableWithLock:
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self):
            return 1

    with pytest.raises(TaskPicklingError, match="function could not be pickled"):
        executor.submit(CallableWithLock()).result()
    assert executor.submit(pow, 3, 3).result() == 27


def test_unpicklable_result_fails_only_that_future(executor):
    with pytest.raises(TaskPicklingError, match="result of task"):
        executor.submit(threading.Lock).result()
    assert executor.submit(pow, 2, 2).result() == 4


def test_result_that_cannot_be_unpickled_here(executor):
    with pytest.raises(TaskUnpicklingError, match="could not be unpickled here") as info:
        executor.submit(return_exploding).result()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert executor.submit(pow, 2, 5).result() == 32


def test_error_in_map_chunk(executor):
    results = executor.map(lambda x: 10 // x, [5, 2, 0, 1], chunksize=2)
    assert list(next(results) for _ in range(2)) == [2, 5]
    with pytest.raises(ZeroDivisionError):
        next(results)


def raise_oserror():
    open("/nonexistent/distexec/file")


def test_builtin_exception_attributes_survive(executor):
    with pytest.raises(FileNotFoundError) as info:
        executor.submit(raise_oserror).result()
    assert info.value.errno == 2 and info.value.filename == "/nonexistent/distexec/file"
