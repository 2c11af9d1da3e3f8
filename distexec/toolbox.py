"""The task-farm toolbox of :class:`~distexec.DistributedExecutor`: what its ancestors offered.

Owns the *tag books* (:class:`TagBook`: the futures of each tag not collected yet, for
``as_completed(tag)`` and ``next_result(tag)``) and the executor methods beyond
``concurrent.futures.Executor``: ``abort``, barriers (``wait_for_all``, ``barrier``), shared
data (``store``, ``retrieve``, ``delete``, ``share``) and snapshots (``workers``, ``status``).
:class:`TaskFarm` is a base class of the executor; its methods run in the caller's threads
and reach the task manager only through events (``_ask``), never its tables.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import TYPE_CHECKING, Any

from . import serialization
from .context import Shared
from .errors import TaskPicklingError, too_large
from .manager import events
from .scheduler import task_ids

if TYPE_CHECKING:
    from .manager import Manager, ManagerConfig
    from .reports import ExecutorStatus, WorkerInfo

__all__ = ["TagBook", "TaskFarm"]

_shared_ids = itertools.count(1)


class TagBook:
    """The futures of one tag that were not collected yet.

    Finished futures wait in ``done`` in order of completion; the done-callback only appends
    there (atomic) and takes the lock only when a collector waits, so the task manager thread,
    which completes most futures, never contends with submitting threads. Counts:
    ``added`` (by submitting threads, under ``add_lock``), ``collected`` (by collectors, under
    ``cond``); the pending ones are ``added - collected - len(done)``.
    """

    __slots__ = ("cond", "add_lock", "added", "collected", "waiters", "done")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.add_lock = threading.Lock()
        self.added = 0
        self.collected = 0
        self.waiters = 0
        self.done: deque[Future[Any]] = deque()

    def add(self, future: Future[Any]) -> None:
        with self.add_lock:
            self.added += 1
        future.add_done_callback(self._finished)

    def pending(self) -> int:
        return self.added - self.collected - len(self.done)

    def _finished(self, future: Future[Any]) -> None:
        # Runs in whichever thread completed the future (usually the task manager's).
        self.done.append(future)
        if self.waiters:  # a collector counts itself in before it looks at done
            with self.cond:
                self.cond.notify_all()


class TaskFarm:
    """The toolbox methods of :class:`~distexec.DistributedExecutor` (see the module
    docstring); the executor provides what is declared here."""

    _manager: Manager | None
    _config: ManagerConfig
    _tags: dict[Any, TagBook]
    _tag_lock: threading.Lock

    def _ask(self, event_type: Any, *args: Any) -> Any:
        raise NotImplementedError

    def start(self) -> Any:
        raise NotImplementedError

    def abort(self, future: Future[Any]) -> bool:
        """Stop the task behind ``future``, even if it is running; the future ends cancelled.

        A queued task is simply cancelled. A running one is stopped: its worker is killed (or,
        for a worker started by hand, restarts itself) and is replaced; other tasks that worker
        held run elsewhere at no cost to their retries. ``future.cancel()`` keeps its standard
        meaning and never stops a running task.

        Returns:
            True if the task was cancelled or stopped by this call, False if it had already
            finished (or the executor has stopped).

        Raises:
            ValueError: ``future`` did not come from a distexec executor's ``submit`` (a future
                of another distexec executor is not found here, and False is returned).
        """
        task_id = getattr(future, "_distexec_task_id", None)
        if task_id is None:
            raise ValueError("abort() needs a future returned by this executor")
        if future.done():
            return False
        return bool(self._ask(events.Abort, task_id))

    def workers(self) -> list[WorkerInfo]:
        """A snapshot of the live workers (local and joined by hand), by worker id."""
        from .reports import WorkerInfo  # (dataclasses: imported when first needed)

        snapshot = self._ask(events.Query) or []
        return [WorkerInfo(**item) for item in snapshot]

    def wait_for_all(self, timeout: float | None = None) -> None:
        """Block until every task submitted before this call (by any thread that submitted
        before it) has finished, failed or been cancelled.

        Raises:
            TimeoutError: some of those tasks were still pending after ``timeout`` seconds.
        """
        manager = self._manager
        if manager is None or not manager.thread.is_alive():
            return
        reply: Future[Any] = Future()
        if threading.current_thread() is manager.thread:
            raise RuntimeError("wait_for_all() cannot be called from a done-callback: the task "
                               "manager would wait for itself")
        manager.post(events.Barrier(next(task_ids), reply))
        try:
            reply.result(timeout)
        except FuturesTimeoutError:
            raise TimeoutError(f"tasks were still pending after {timeout:g} s") from None

    def barrier(self, futures: Iterable[Future[Any]] | None = None,
                timeout: float | None = None) -> None:
        """Block until every given future is done; with no futures, like :meth:`wait_for_all`.

        Unlike :func:`concurrent.futures.wait`, this raises when the time is up.

        Raises:
            TimeoutError: some futures were still pending after ``timeout`` seconds.
        """
        if futures is None:
            self.wait_for_all(timeout)
            return
        from concurrent.futures import ALL_COMPLETED, wait

        pending = wait(list(futures), timeout, return_when=ALL_COMPLETED).not_done
        if pending:
            raise TimeoutError(f"{len(pending)} future(s) still pending after {timeout:g} s")

    def _tag_book(self, tag: Any) -> TagBook:
        book = self._tags.get(tag)
        if book is None:
            with self._tag_lock:
                book = self._tags.setdefault(tag, TagBook())
        return book

    def as_completed(self, tag: Any, timeout: float | None = None) -> Iterator[Future[Any]]:
        """Yield the futures of the tasks tagged ``tag`` as they finish (finished ones first).

        Each future is yielded once, across all calls: it is *collected*. The iterator ends
        when every task with that tag submitted so far has been collected; tasks tagged while
        it runs are included. The executor keeps the futures of tasks submitted with a tag
        (through ``options(tag=...).submit``; not ``map``, whose iterator returns the results)
        until they are collected this way, or the executor is dropped.

        Args:
            tag: the tag given with ``options(tag=...)``.
            timeout: seconds from this call after which :class:`TimeoutError` is raised if
                tasks with the tag are still pending.

        Raises:
            TimeoutError: tasks with this tag were still pending after ``timeout`` seconds.
        """
        book = self._tags.get(tag)
        if book is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = book.cond
        while True:
            with cond:
                book.waiters += 1
                try:
                    while not book.done:
                        if not book.pending():
                            return
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise TimeoutError(f"{book.pending()} task(s) tagged {tag!r} still "
                                               f"pending after {timeout:g} s")
                        cond.wait(remaining)
                    future = book.done.popleft()
                    book.collected += 1
                finally:
                    book.waiters -= 1
            yield future
            del future  # the caller may drop the result

    def next_result(self, tag: Any, timeout: float | None = None) -> Any:
        """Return the result of the next task tagged ``tag`` to finish, collecting it (the
        ancestors' ``getResultWithTag``); raise its exception if it failed.

        Raises:
            LookupError: no task with this tag is pending or waiting to be collected.
            TimeoutError: none finished within ``timeout`` seconds.
            Exception: the task's own exception.
        """
        for future in self.as_completed(tag, timeout):
            return future.result()
        raise LookupError(f"no task tagged {tag!r} is pending or waiting to be collected")

    def store(self, name: str, value: Any) -> None:
        """Store ``value`` under ``name`` for tasks to read with :func:`distexec.retrieve`
        (the ancestors' ``storeData``). It is pickled now, once; each worker fetches it the
        first time one of its tasks reads it, and keeps it. Storing again under the same name
        replaces it: tasks submitted after this call returns see the new value.

        Raises:
            TypeError: ``name`` is not a string.
            TaskPicklingError: ``value`` cannot be pickled.
            MessageTooLargeError: ``value`` pickles to more than ``max_message_size``.
            RuntimeError: the executor was shut down.
        """
        if not isinstance(name, str):
            raise TypeError("shared data names are strings")
        try:
            payload, oob = serialization.dumps(value)
        except Exception as exc:
            raise TaskPicklingError(
                f"shared data {name!r} could not be pickled: {type(exc).__name__}: "
                f"{serialization.safe_str(exc)}") from exc
        size = serialization.nbytes(payload, oob)
        if size > self._config.max_message_size:
            raise too_large(f"shared data {name!r}", size, self._config.max_message_size)
        # A snapshot: the caller may change the object (an array, say) afterwards.
        # (Kept as writable as it was: an array stored writable is fetched writable.)
        snapshot: list[Any] = [bytes(b) if memoryview(b).readonly else bytearray(b) for b in oob]
        self.start()
        self._ask(events.Store, name, payload, snapshot)

    def retrieve(self, name: str) -> Any:
        """Return a copy of the shared data stored under ``name`` (``retrieveData``).

        Raises:
            KeyError: nothing is stored under that name.
        """
        manager = self._manager
        if manager is None:
            raise KeyError(f"no shared data named {name!r}")
        payload, oob = self._ask(events.Retrieve, name) or (None, None)
        if payload is None:
            raise KeyError(f"no shared data named {name!r}")
        return serialization.loads(payload, oob)

    def delete(self, name: str) -> None:
        """Delete the shared data stored under ``name`` (``deleteData``); workers drop their
        copies. Tasks that read it afterwards get a :class:`KeyError`.

        Raises:
            KeyError: nothing is stored under that name.
        """
        if self._manager is None:
            raise KeyError(f"no shared data named {name!r}")
        self._ask(events.Delete, name)

    def share(self, value: Any) -> Shared:
        """Store ``value`` under a new name and return a reference to pass as an argument:
        the task receives the value itself, sent once per worker rather than once per task
        (the common part of the boss/worker pattern's instructions).

        Example: ``ref = ex.share(big_table); ex.map(lookup, keys, itertools.repeat(ref))``.
        ``ex.delete(ref.name)`` frees it; otherwise it lives as long as the executor.
        """
        name = f"distexec-shared-{next(_shared_ids)}"
        self.store(name, value)
        return Shared(name)

    def status(self) -> ExecutorStatus:
        """Task counts per tag and in total, and the workers with what each is doing.

        Tasks get a tag with ``ex.options(tag=...)``; untagged tasks are counted under ``None``.
        Before the executor started, or after it stopped, the counts are empty.
        """
        from .reports import ExecutorStatus, TaskCounts, WorkerInfo

        answer = self._ask(events.Status)
        counts, workers = answer if answer is not None else ({}, [])
        tags = {tag: TaskCounts(*c) for tag, c in counts.items()}
        total = TaskCounts(*(sum(c[i] for c in tags.values()) for i in range(5)))
        return ExecutorStatus(tags, total, [WorkerInfo(**w) for w in workers])
