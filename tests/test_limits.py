"""Messages larger than max_message_size are refused where they are made, failing only their
own future (or raising in the code that made them); nothing loops, no worker is lost."""

from __future__ import annotations

import pytest

from distexec import DistributedExecutor, MessageTooLargeError, WorkerLostError
from helpers import getpid, identity

pytestmark = pytest.mark.timeout(60)

LIMIT = 1 << 20  # 1 MiB
BIG = 2 * LIMIT


def make_bytes(n: int) -> bytes:
    return b"x" * n


def raise_big(n: int) -> None:
    raise ValueError(b"y" * n)


def child_with_big_argument(n: int) -> str:
    from distexec import get_executor

    try:
        get_executor().submit(len, b"z" * n)
    except MessageTooLargeError as exc:
        return str(exc)
    return "submitted"


def bypass_the_check_and_return(n: int) -> bytes:
    """A worker that does not check (a bug, another implementation): the manager must cope."""
    from distexec import context

    context._worker.max_message_size = 1 << 40
    return b"w" * n


@pytest.fixture
def ex():
    with DistributedExecutor(max_workers=1, max_message_size=LIMIT, max_retries=1) as executor:
        executor.wait_for_workers(1, timeout=30)
        yield executor


def check_still_works(ex, pid):
    assert ex.submit(identity, 42).result(timeout=30) == 42
    assert ex.submit(getpid).result(timeout=30) == pid, "the worker was replaced"


def assert_names_size_and_limit(exc: MessageTooLargeError, size_text: str) -> None:
    message = str(exc)
    assert size_text in message and f"max_message_size={LIMIT}" in message, message
    assert exc.limit == LIMIT and exc.size > LIMIT


def test_result_too_large_fails_only_its_future(ex):
    pid = ex.submit(getpid).result(timeout=30)
    with pytest.raises(MessageTooLargeError) as err:
        ex.submit(make_bytes, BIG).result(timeout=30)
    assert_names_size_and_limit(err.value, "2.0 MiB")
    assert "the result of task" in str(err.value) and "make_bytes" in str(err.value)
    check_still_works(ex, pid)


def test_argument_too_large_is_refused_before_sending(ex):
    pid = ex.submit(getpid).result(timeout=30)
    with pytest.raises(MessageTooLargeError) as err:
        ex.submit(identity, b"a" * BIG).result(timeout=30)
    assert_names_size_and_limit(err.value, "2.0 MiB")
    assert "its function and arguments" in str(err.value)
    check_still_works(ex, pid)


def test_function_too_large_is_refused_and_forgotten(ex):
    pid = ex.submit(getpid).result(timeout=30)
    data = b"c" * BIG

    def closure(i):
        return len(data) + i

    futures = [ex.submit(closure, i) for i in range(3)]
    for f in futures:
        with pytest.raises(MessageTooLargeError, match="its function and arguments"):
            f.result(timeout=30)
    small = b"c" * 10

    def fits(i):
        return len(small) + i

    assert list(ex.map(fits, range(5))) == [10, 11, 12, 13, 14]
    check_still_works(ex, pid)


def test_many_pieces_below_the_limit_are_split_into_batches(ex):
    """Each argument and result fits; together they would not fit one message."""
    pid = ex.submit(getpid).result(timeout=30)
    piece = LIMIT * 2 // 5
    results = list(ex.map(make_bytes, [piece] * 12))
    assert [len(r) for r in results] == [piece] * 12
    futures = [ex.submit(identity, b"p" * piece) for _ in range(12)]
    assert all(len(f.result(timeout=30)) == piece for f in futures)
    check_still_works(ex, pid)


def test_exception_too_large_is_summarised(ex):
    pid = ex.submit(getpid).result(timeout=30)
    with pytest.raises(MessageTooLargeError) as err:
        ex.submit(raise_big, BIG).result(timeout=30)
    assert "the ValueError raised by task" in str(err.value)
    assert_names_size_and_limit(err.value, " MiB (")
    check_still_works(ex, pid)


def test_child_task_too_large_raises_in_the_parent(ex):
    message = ex.submit(child_with_big_argument, BIG).result(timeout=30)
    assert "the child task" in message and f"max_message_size={LIMIT}" in message


def test_shared_data_too_large_raises_at_store(ex):
    with pytest.raises(MessageTooLargeError, match="shared data 'table'"):
        ex.store("table", b"s" * BIG)
    ex.store("table", b"s" * 10)


def test_a_worker_that_sends_too_much_is_charged_not_looped(ex, caplog):
    """Before: the manager dropped the worker, re-ran the task on the next one, and so on for
    ever. Now the loss is charged to the task: after max_retries it fails."""
    with pytest.raises(WorkerLostError) as err:
        ex.submit(bypass_the_check_and_return, BIG).result(timeout=45)
    assert "exceeds the limit" in str(err.value), str(err.value)
    assert "2 time(s)" in str(err.value), str(err.value)
    assert ex.submit(identity, 7).result(timeout=30) == 7
