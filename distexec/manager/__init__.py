"""The task manager: one thread per executor that owns every table, socket and process.

The package is being cut into rooms, one responsibility each (issue 12); so far:

* :mod:`.core` -- the :class:`Manager` itself: the loop, connections and handshakes, the
  worker fleet, heartbeats, dispatch and results, child tasks, dependencies, the store and
  status. Runs on the ``distexec-manager`` thread, except the methods marked "caller side".
* :mod:`.events` -- what other threads tell the manager: one small typed event each, posted
  to its one inbox.
* :mod:`.store` -- shared data (``store()``/``retrieve()``) and which workers hold a copy.
* :mod:`.handshakes` -- connections still in their handshake (bounded, with deadlines) and
  the rate-limited log of refused connections.

The rooms other than ``core`` are plain classes with no sockets or timers, used by the manager
thread only, and tested by feeding them directly (``tests/test_rooms.py``).
"""

from . import events
from .connections import MAX_PENDING_HANDSHAKES, REFUSAL_LOG_BURST
from .core import Manager, ManagerConfig, SharedState, interpreter_exiting

__all__ = [
    "MAX_PENDING_HANDSHAKES",
    "REFUSAL_LOG_BURST",
    "Manager",
    "ManagerConfig",
    "SharedState",
    "events",
    "interpreter_exiting",
]
