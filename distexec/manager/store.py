"""The shared-data room: what ``store()`` keeps for tasks to ``retrieve()``, and who has a copy.

Owns the stored entries (name -> version, pickled value, its out-of-band buffers) and, per name,
the workers that fetched a copy. Plain bookkeeping with no sockets: the task manager thread
(the only caller) asks it what to answer and whom to tell, and sends the messages itself
(FETCH answers, FORGET to the holders of a copy that changed).
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple


class Entry(NamedTuple):
    version: int  # new with every store(): a worker's copy is current if its version matches
    payload: Any  # the pickled value
    buffers: list[Any]  # its out-of-band buffers


class SharedStore:
    """Shared data and its readers (manager thread only)."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._versions = itertools.count(1)
        self._readers: dict[str, set[int]] = {}  # name -> ids of workers holding a copy

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: object) -> Entry | None:
        """The entry stored under ``name`` (for the caller's ``retrieve()``)."""
        return self._entries.get(name) if isinstance(name, str) else None

    def fetch(self, name: object, worker_id: int | None) -> Entry | None:
        """A worker's task reads ``name``: the entry, remembering that the worker now holds a
        copy; None if there is none."""
        entry = self.get(name)
        if entry is not None and worker_id is not None:
            self._readers.setdefault(name, set()).add(worker_id)  # type: ignore[arg-type]
        return entry

    def put(self, name: str, payload: Any, buffers: list[Any] | None) -> set[int]:
        """Store ``name`` (replacing it), or delete it with ``payload`` None. Returns the
        workers holding a copy, which must now be told to forget it (and are forgotten here)."""
        if payload is None:
            self._entries.pop(name, None)
        else:
            self._entries[name] = Entry(next(self._versions), payload, buffers or [])
        return self._readers.pop(name, set())
