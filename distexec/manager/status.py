"""Status: what the executor's methods and ``distexec status`` are told.

Owns nothing but the count of ready workers it last published to the callers
(:attr:`SharedState.ready_workers`, which ``wait_for_workers()`` waits on); builds the worker
snapshots (``workers()``, ``status()``) and the plain-data report that a ``distexec status``
client receives. Manager thread only; no sockets.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .loop import Manager


class StatusRoom:
    def __init__(self, m: Manager) -> None:
        self.m = m
        self._started_at = time.monotonic()

    def publish(self) -> None:
        """Tell waiting callers how many workers are ready (wait_for_workers)."""
        ready = self.m.books.ready_count
        shared = self.m.shared
        if ready != shared.ready_workers:
            with shared.lock:
                shared.ready_workers = ready
                shared.changed.notify_all()

    def snapshot(self) -> list[dict[str, Any]]:
        """What each live worker is doing, as plain data."""
        now = time.monotonic()
        out = []
        handles = self.m.fleet.workers
        for record in self.m.books.live_workers():
            handle = handles.get(record.id)
            running = None
            if handle is not None and handle.proc.reports_progress:
                current = handle.proc.running_task()
                running = current[0] if current else None
            elif record.assigned:
                running = next(iter(record.assigned))
            out.append({
                "worker_id": record.id,
                "host": record.host,
                "pid": record.pid,
                "state": record.state.value,
                "local": record.local,
                "origin": record.origin,
                "held": tuple(record.assigned),
                "running": running,
                "tasks_done": record.tasks_done,
                "last_heartbeat_age": (now - handle.last_seen)
                if handle and handle.last_seen else None,
            })
        return out

    def report(self) -> dict[str, Any]:
        """The executor's live statistics as plain data (strings, numbers, lists, dicts):
        what ``distexec status`` prints. Tags are given by their ``repr``."""
        m = self.m
        tags = [[None if tag is None else _safe_repr(tag), *counts]
                for tag, counts in m.books.tag_counts().items()]
        tags.sort(key=lambda row: (row[0] is not None, str(row[0])))
        workers = []
        for item in self.snapshot():
            item = dict(item)
            item["held"] = list(item["held"])
            workers.append(item)
        return {
            "name": m.config.name,
            "address": m.address,
            "pid": os.getpid(),
            "uptime": time.monotonic() - self._started_at,
            "state": ("terminating" if m.terminating else "shutting down" if m.closing
                      else "running"),
            "max_workers": m.fleet.local.wanted,
            "tags": tags,
            "workers": workers,
        }


def _safe_repr(obj: Any) -> str:
    """repr() of a user object, never raising (it runs on the manager thread)."""
    try:
        return repr(obj)
    except BaseException as exc:
        return f"<{type(obj).__name__} whose repr() raised {type(exc).__name__}>"
