"""The task manager's rooms with logic, fed events directly: no processes, no sockets."""

from __future__ import annotations

import pytest

from distexec.manager.store import SharedStore

pytestmark = pytest.mark.timeout(30)


def test_store_versions_readers_and_forgetting():
    store = SharedStore()
    assert store.put("a", b"p1", [b"x"]) == set()  # nobody holds a copy yet
    first = store.fetch("a", worker_id=1)
    assert first is not None and (first.payload, first.buffers) == (b"p1", [b"x"])
    assert store.fetch("a", worker_id=2) == first
    assert store.fetch("missing", worker_id=1) is None
    assert store.fetch(3, worker_id=1) is None  # a name that is not a string: nothing

    # Replacing it: the holders must be told, and then they hold nothing.
    assert store.put("a", b"p2", None) == {1, 2}
    second = store.get("a")
    assert second is not None and second.version > first.version and second.buffers == []
    assert store.put("a", b"p3", None) == set()

    # Deleting it.
    store.fetch("a", worker_id=3)
    assert "a" in store
    assert store.put("a", None, None) == {3}
    assert "a" not in store and store.get("a") is None


def test_store_get_does_not_make_a_reader():
    store = SharedStore()
    store.put("k", b"v", [])
    store.get("k")  # the caller's retrieve()
    assert store.put("k", b"w", []) == set()


def test_pending_handshakes_bound_order_and_deadlines():
    from distexec.manager.handshakes import PendingHandshakes

    pending = PendingHandshakes(limit=3, timeout=10.0)
    assert pending.oldest() is None and pending.next_deadline() is None
    assert pending.add("a", now=0.0) == 10.0
    pending.add("b", now=1.0)
    pending.add("c", now=2.0)
    assert pending.full() and pending.oldest() == "a"
    pending.done("a")  # completed its handshake
    assert not pending.full() and pending.oldest() == "b" and "a" not in pending
    pending.add("d", now=3.0)
    assert pending.next_deadline() == 11.0
    assert pending.overdue(now=10.5) == []
    assert pending.overdue(now=12.0) == ["b", "c"]  # still pending until the caller closes
    for conn in pending.overdue(now=12.0):
        pending.done(conn)
    assert len(pending) == 1 and pending.next_deadline() == 13.0


def test_refusals_are_logged_in_bursts_then_counted(caplog):
    import logging

    from distexec.manager.handshakes import RefusalLog

    log = logging.getLogger("distexec.test-refusals")
    refusals = RefusalLog(log, burst=2, window=10.0)
    with caplog.at_level(logging.WARNING, logger="distexec.test-refusals"):
        assert [refusals.log(t, "refused %s", t) for t in (0.0, 1.0, 2.0, 3.0)] == [
            True, True, False, False]
        assert refusals.log(10.0, "refused %s", "late")  # a new window: summary, then the line
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused 0.0", "refused 1.0",
                        "refused 2 more connection(s) in the last 10 s without logging each",
                        "refused late"]
