"""The door room: connections that have not proved they hold the key yet, and the log of refusals.

Owns, for the task manager thread (its only caller), the bookkeeping that keeps unauthenticated
peers cheap (see the hardening notes in :doc:`concepts`): which connections are still in their
handshake and until when, at most ``limit`` of them (the oldest makes room for a new one), and a
rate limit on logging refused connections so that a flood cannot fill the log. Plain logic with
an injected clock value: no sockets, no timers; the manager reads and writes the sockets, closes
what this room says to drop, and arms one deadline at :meth:`PendingHandshakes.next_deadline`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any


class PendingHandshakes:
    """Connections in their handshake, oldest first, each with its deadline."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        # Insertion order is deadline order: every connection gets the same timeout.
        self._deadlines: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, conn: object) -> bool:
        return conn in self._deadlines

    def full(self) -> bool:
        """No room for another: the caller drops :meth:`oldest` first."""
        return len(self._deadlines) >= self.limit

    def oldest(self) -> Any:
        """The connection waiting longest, or None."""
        return next(iter(self._deadlines), None)

    def add(self, conn: Hashable, now: float) -> float:
        """``conn`` starts its handshake; returns its deadline."""
        deadline = self._deadlines[conn] = now + self.timeout
        return deadline

    def done(self, conn: Hashable) -> None:
        """``conn`` completed its handshake (whatever the verdict) or closed."""
        self._deadlines.pop(conn, None)

    def overdue(self, now: float) -> list[Any]:
        """The connections whose deadline has passed, oldest first (still pending: the caller
        closes them, which calls :meth:`done`)."""
        out = []
        for conn, deadline in self._deadlines.items():
            if deadline > now:
                break
            out.append(conn)
        return out

    def next_deadline(self) -> float | None:
        """When the oldest pending handshake is due, or None if there is none."""
        for deadline in self._deadlines.values():
            return deadline
        return None


class RefusalLog:
    """Log refused connections at most ``burst`` times per ``window`` seconds, then once how
    many more were refused without a line each."""

    def __init__(self, logger: logging.Logger, burst: int, window: float) -> None:
        self._logger = logger
        self.burst = burst
        self.window = window
        self._window_end = 0.0
        self._logged = 0
        self._unlogged = 0

    def log(self, now: float, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` as a warning unless the burst is spent; True if it was logged."""
        if now >= self._window_end:
            if self._unlogged:
                self._logger.warning("refused %d more connection(s) in the last %g s without "
                                     "logging each", self._unlogged, self.window)
            self._window_end = now + self.window
            self._logged = 0
            self._unlogged = 0
        if self._logged < self.burst:
            self._logged += 1
            self._logger.warning(msg, *args)
            return True
        self._unlogged += 1
        return False
