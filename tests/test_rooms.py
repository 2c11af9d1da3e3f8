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
