"""`DistributedExecutor`: the public face. Argument checks, submit/map/shutdown, nothing else.

``submit()`` does as little as possible in the caller's thread: it checks two flags under one
lock, files a :class:`~distexec.scheduler.Task` in the manager's inbox and wakes the manager. The
task manager thread (:mod:`distexec.manager`) does everything else.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar


from . import protocol, serialization
from .errors import BrokenDistributedExecutor, TaskPicklingError
from .manager import (
    CMD_SHUTDOWN,
    CMD_TERMINATE,
    Manager,
    ManagerConfig,
    SharedState,
    interpreter_exiting,
)
from .scheduler import Task, TaskKind

__all__ = ["DistributedExecutor"]

P = ParamSpec("P")
T = TypeVar("T")

_task_ids = itertools.count(1)


def _default_workers() -> int:
    count = getattr(os, "process_cpu_count", None)
    n = count() if count is not None else None
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count()
    return n or 1


def _batched(iterable: Iterator[tuple[Any, ...]], n: int) -> Iterator[list[tuple[Any, ...]]]:
    while True:
        chunk = list(itertools.islice(iterable, n))
        if not chunk:
            return
        yield chunk


class DistributedExecutor(Executor):
    """A :class:`concurrent.futures.Executor` that runs calls in separate worker processes.

    It behaves like :class:`concurrent.futures.ProcessPoolExecutor`: the same ``submit``, ``map``
    and ``shutdown``, real :class:`~concurrent.futures.Future` objects, and the same errors for
    misuse. In addition, functions travel with cloudpickle (lambdas, closures and functions
    defined in ``__main__`` or a notebook work), a remote exception is re-raised with its remote
    traceback, and a worker that dies fails only the task it was running and is replaced.

    Workers are fresh interpreters (``python -m distexec.worker``), started when the first task
    is submitted, that connect back to a task manager thread in this process over an
    authenticated TCP connection on the loopback interface.

    Args:
        max_workers: number of worker processes; defaults to the number of CPUs this process
            may use.
        initializer: called with ``initargs`` in each worker before it runs any task. If it
            raises, the executor becomes broken and every pending future fails with
            :class:`~distexec.BrokenDistributedExecutor`.
        initargs: arguments for ``initializer``.
        max_tasks_per_child: run at most this many tasks in a worker, then replace the worker
            with a fresh one (useful against memory leaks in task code).
        python: interpreter for the workers; defaults to :data:`sys.executable`. It must have
            the same Python minor version and the same cloudpickle and distexec versions.
        worker_start_timeout: seconds a worker may take to start and connect before it is
            considered failed.
        max_message_size: largest message, in bytes, accepted from a worker.

    Raises:
        ValueError: ``max_workers``, ``max_tasks_per_child`` or ``worker_start_timeout`` is not
            positive.
        TypeError: ``initializer`` is not callable, or ``max_tasks_per_child`` is not an int.
        TaskPicklingError: ``initializer`` or ``initargs`` cannot be pickled.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        python: str | None = None,
        worker_start_timeout: float = 60.0,
        max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if max_workers is None:
            max_workers = _default_workers()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        init_blob = None
        if initializer is not None:
            try:
                init_blob = serialization.dumps_inband((initializer, tuple(initargs)))
            except Exception as exc:
                raise TaskPicklingError(
                    f"the initializer {serialization.describe_callable(initializer)} or its "
                    f"initargs could not be pickled: {exc}"
                ) from exc
        if worker_start_timeout <= 0:
            raise ValueError("worker_start_timeout must be positive")
        self._max_workers = max_workers
        self._config = ManagerConfig(
            max_workers=max_workers,
            initializer=init_blob,
            max_tasks_per_child=max_tasks_per_child,
            python=python,
            worker_start_timeout=worker_start_timeout,
            max_message_size=max_message_size,
        )
        self._shared = SharedState()
        self._manager: Manager | None = None
        self._start_lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def max_workers(self) -> int:
        """The number of worker processes this executor keeps running."""
        return self._max_workers

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` the task manager listens on, or None before the first submit."""
        return self._manager.address if self._manager is not None else None

    @property
    def _broken(self) -> bool | str:
        # Same meaning as ProcessPoolExecutor._broken: falsy while usable.
        broken = self._shared.broken
        return str(broken) if broken is not None else False

    # ------------------------------------------------------------------ submitting
    def _start(self) -> Manager:
        # Called with the shared lock held, on first use.
        manager = Manager(self._config, self._shared)
        shared = self._shared

        def executor_collected(_: object, manager: Manager = manager) -> None:
            # The user dropped the executor without shutting it down: finish and stop.
            with shared.lock:
                shared.shutdown = True
            manager.post((CMD_SHUTDOWN, False))

        # Held by the manager (alive with its thread), so the callback fires even when the
        # executor dies in a reference cycle.
        manager.executor_ref = weakref.ref(self, executor_collected)
        manager.start()
        self._manager = manager
        return manager

    def _check(self) -> None:
        broken = self._shared.broken
        if broken is not None:
            raise BrokenDistributedExecutor(str(broken)) from broken.__cause__
        if self._shared.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _submit(self, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any] | None,
                kind: TaskKind) -> Future[Any]:
        future: Future[Any] = Future()
        task = Task(next(_task_ids), future, fn, args, kwargs, kind)
        shared = self._shared
        with shared.lock:
            self._check()
            manager = self._manager or self._start()
            shared.inbox.append(task)
        manager.wake()
        return future

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on a worker and return a Future for its result.

        ``fn`` and the arguments are pickled when the task is sent to a worker. If that fails,
        or if the result cannot be pickled, the future fails with
        :class:`~distexec.TaskPicklingError`; the executor is unaffected.

        Raises:
            RuntimeError: the executor was shut down.
            BrokenDistributedExecutor: the executor is broken (see its ``__cause__``).
        """
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        return self._submit(fn, args, kwargs or None, TaskKind.CALL)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Return an iterator equivalent to ``map(fn, *iterables)``, computed in the workers.

        Args:
            fn: the function to call.
            *iterables: argument iterables, zipped as by :func:`map`.
            timeout: seconds (from this call) after which ``__next__`` raises
                :class:`TimeoutError` if the next result is not ready.
            chunksize: number of items sent to a worker as one task. Large values cut the
                per-item overhead for short calls.
            buffersize: if given, only this many chunks are submitted up front, and one more
                each time a result is taken (so at most ``buffersize + 1`` are outstanding):
                a huge or endless iterable is not read eagerly (the Python 3.14 behaviour, on
                every supported Python).

        Raises:
            ValueError: ``chunksize`` < 1 or ``buffersize`` < 1.
            TypeError: ``buffersize`` is not an integer.

        An exception raised by ``fn`` is raised by ``__next__`` when its result is reached;
        remaining work is cancelled when the iterator is closed or garbage-collected.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int) or isinstance(buffersize, bool):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        work: Iterator[Any] = zip(*iterables)  # noqa: B905 (map stops at the shortest)
        if chunksize > 1:
            work = _batched(work, chunksize)
            kind = TaskKind.CHUNK
        else:
            kind = TaskKind.CALL

        def submit_one(ex: DistributedExecutor, item: Any) -> Future[Any]:
            if kind is TaskKind.CALL:
                return ex._submit(fn, item, None, kind)
            return ex._submit(fn, item, None, kind)

        if buffersize is None:
            futures = deque(submit_one(self, item) for item in work)
        else:
            futures = deque(submit_one(self, item) for item in itertools.islice(work, buffersize))
        # A weak reference, so that an abandoned iterator does not keep the executor alive.
        executor_ref = weakref.ref(self)
        return _map_results(futures, work if buffersize else None, executor_ref, submit_one,
                            end_time, chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks and release the workers once the submitted work is done.

        Args:
            wait: block until all pending futures are done and every worker process has exited.
            cancel_futures: cancel the futures that have not started running.

        Calling it more than once is harmless. After shutdown, ``submit`` raises
        ``RuntimeError('cannot schedule new futures after shutdown')``.
        """
        with self._shared.lock:
            self._shared.shutdown = True
            manager = self._manager
        if manager is None:
            return
        manager.post((CMD_SHUTDOWN, cancel_futures))
        if wait:
            manager.join()

    def _terminate(self, reason: str) -> None:
        """Stop now: cancel every future, running ones included, and kill every worker."""
        with self._shared.lock:
            self._shared.shutdown = True
            manager = self._manager
        if manager is not None:
            manager.post((CMD_TERMINATE, reason))
            manager.join()

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool | None:
        # A KeyboardInterrupt (or SystemExit) in the with block means "stop": waiting for the
        # remaining work would make Ctrl-C useless. Ordinary exceptions keep the standard
        # behaviour and wait for the submitted work, like every concurrent.futures executor.
        if exc_type is not None and not issubclass(exc_type, Exception):
            self._terminate(f"{exc_type.__name__} in the with block")
            return None
        try:
            self.shutdown(wait=True)
        except BaseException:
            # Ctrl-C while waiting for the work to finish: stop everything, then re-raise.
            self._terminate("interrupted while waiting for shutdown")
            raise
        return None


def _result_or_cancel(future: Future[Any], timeout: float | None) -> Any:
    try:
        return future.result(timeout)
    finally:
        future.cancel()


def _map_results(
    futures: deque[Future[Any]],
    refill: Iterator[Any] | None,
    executor_ref: weakref.ref[DistributedExecutor],
    submit_one: Callable[[DistributedExecutor, Any], Future[Any]],
    end_time: float | None,
    chunked: bool,
) -> Iterator[Any]:
    try:
        while futures:
            if refill is not None:
                executor = executor_ref()
                if executor is not None:
                    item = next(refill, None)
                    if item is not None:
                        futures.append(submit_one(executor, item))
                    del executor
            # Neither the future nor the value may stay referenced by this frame while it is
            # suspended at a yield: the caller must be able to free a result it dropped.
            timeout = None if end_time is None else end_time - time.monotonic()
            if chunked:
                chunk = _result_or_cancel(futures.popleft(), timeout)
                chunk.reverse()
                while chunk:
                    yield chunk.pop()
            else:
                yield _result_or_cancel(futures.popleft(), timeout)
    finally:
        for future in futures:
            future.cancel()
