"""The task manager: one thread per executor that owns every table, socket and process.

The folder listing is the architecture: a small loop and rooms, each a plain class that owns
its state and runs on the ``distexec-manager`` thread only (see :doc:`/internals` for the data
flow and every thread):

* :mod:`.loop` -- the thread, its selector and wakeup socket, the one inbox, deadlines, the
  end-of-turn completion of futures, shutdown and teardown (:class:`Manager`).
* :mod:`.events` -- what other threads tell the manager: one small typed event each.
* :mod:`.connections` -- the door: accept, handshakes, channels, bytes in and out (the only
  room with sockets); :mod:`.handshakes` -- the bounded set of pending handshakes and the
  rate-limited refusal log.
* :mod:`.fleet` -- which workers exist: launchers, launching, replacing, backoff, retiring,
  the end of each worker; :mod:`.lifecycle` -- one worker's checked life and the verdict at its
  end.
* :mod:`.watchdog` -- heartbeats, pings, control bytes, zombies.
* :mod:`.dispatch` -- tasks out, results back: the function cache, TASKS frames, results,
  retries, fallbacks, declines.
* :mod:`.recovery` -- what a lost worker's tasks become; poison tasks.
* :mod:`.stopping` -- ``abort()``, time limits, answers to ABORT.
* :mod:`.children` -- requests of running tasks: child tasks, shared data reads.
* :mod:`.dependencies` -- tasks waiting for futures; ``wait_for_all()`` barriers.
* :mod:`.store` -- shared data and which workers hold a copy; :mod:`.status` -- snapshots.

The rooms with logic import no sockets and are unit-tested by feeding them events through a
stand-in for the loop (``tests/test_rooms.py``).
"""

from . import events
from .connections import MAX_PENDING_HANDSHAKES, REFUSAL_LOG_BURST
from .loop import Manager, ManagerConfig, SharedState, interpreter_exiting

__all__ = [
    "MAX_PENDING_HANDSHAKES",
    "REFUSAL_LOG_BURST",
    "Manager",
    "ManagerConfig",
    "SharedState",
    "events",
    "interpreter_exiting",
]
