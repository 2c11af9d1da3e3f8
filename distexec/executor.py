"""`DistributedExecutor`: the public face. submit/map/shutdown and the control methods.

``submit()`` does as little as possible in the caller's thread: it checks two flags under one
lock, files a :class:`~distexec.scheduler.Task` in the manager's inbox and wakes the manager. The
task manager thread (:mod:`distexec.manager`) does everything else. The constructor's checks
live in :mod:`distexec.settings`, the task options in :mod:`distexec.options`, the task-farm
methods (tags, barriers, shared data, status) in :mod:`distexec.toolbox`. Caller threads only.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, ParamSpec, TypeVar

from . import protocol
from .errors import BrokenDistributedExecutor
from .manager import Manager, SharedState, events, interpreter_exiting
from .options import UNSET, TaskOptions, check_timeout
from .scheduler import Task, TaskKind, task_ids
from .settings import executor_config
from .toolbox import TagBook, TaskFarm

__all__ = ["DistributedExecutor", "TaskOptions"]

P = ParamSpec("P")
T = TypeVar("T")


def _find_futures(args: tuple[Any, ...], kwargs: dict[str, Any] | None
                  ) -> list[Future[Any]] | None:
    """The futures among a call's arguments (top level only): its dependencies."""
    found = None
    for arg in args:
        if isinstance(arg, Future):
            found = [arg] if found is None else [*found, arg]
    if kwargs:
        for arg in kwargs.values():
            if isinstance(arg, Future):
                found = [arg] if found is None else [*found, arg]
    return found


def _batched(iterable: Iterator[tuple[Any, ...]], n: int) -> Iterator[list[tuple[Any, ...]]]:
    while True:
        chunk = list(itertools.islice(iterable, n))
        if not chunk:
            return
        yield chunk


class DistributedExecutor(TaskFarm, Executor):
    """A :class:`concurrent.futures.Executor` that runs calls in separate worker processes.

    It behaves like :class:`concurrent.futures.ProcessPoolExecutor`: the same ``submit``, ``map``
    and ``shutdown``, real :class:`~concurrent.futures.Future` objects, and the same errors for
    misuse. In addition, functions travel with cloudpickle (lambdas, closures and functions
    defined in ``__main__`` or a notebook work), a remote exception is re-raised with its remote
    traceback, and a worker that dies costs the task it was running a retry on another worker,
    not the run; the dead worker is replaced.

    Workers are fresh interpreters (``python -m distexec.worker``), started when the first task
    is submitted (or at :meth:`start`), that connect back to a task manager thread in this
    process over an authenticated TCP connection, on the loopback interface unless ``listen``
    says otherwise. More workers can join by hand (``distexec worker HOST:PORT``) while it runs.

    A worker that dies, disconnects or stops sending heartbeats is replaced, and the tasks it
    held run again elsewhere; see :doc:`/failures` for exactly what is retried.

    Args:
        max_workers: number of local worker processes; defaults to the number of CPUs this
            process may use. 0 is allowed together with ``listen``: the executor then waits for
            workers that join by hand.
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
        max_message_size: largest payload of one message, in bytes, in either direction (a
            task's function and arguments, a result, an exception, shared data). A bigger one
            fails its own future with :class:`~distexec.MessageTooLargeError` before it is
            sent. Default 16 GiB.
        unpickle_timeout: seconds a worker may spend unpickling a task's function and
            arguments before the task fails with :class:`~distexec.TaskUnpicklingError` (None:
            no limit). Something in them that blocks while it is rebuilt (a
            ``multiprocessing.Manager`` proxy whose manager does not answer, a ``__setstate__``
            that waits) would otherwise hang the future. The worker is interrupted with
            ``SIGUSR1`` and replaced.
        max_retries: how many times a task may be re-run because the worker running it was
            lost; one more loss fails it with :class:`~distexec.WorkerLostError` listing every
            attempt. Tasks a lost worker held but had not started are always re-run.
        time_limit: default per-task time limit in seconds (None: no limit). A task still
            running that many seconds after it was sent to its worker is stopped, the worker
            is replaced, and the future fails with :class:`~distexec.TaskTimeoutError` (the
            task is not retried). See also :meth:`options`.
        heartbeat_timeout: seconds of silence after which a worker is declared lost (frozen,
            or its host unreachable); None disables the check (exits and disconnections are
            still detected). A task that holds the GIL does not silence its worker.
        listen: ``"HOST:PORT"`` for the task manager to listen on; default: a free port on
            127.0.0.1. Listening on another interface requires ``key``.
        key: the secret workers must prove they hold, as bytes or hexadecimal (at least 16
            bytes). Default: the ``DISTEXEC_KEY`` environment variable if set, else a random
            key (see :attr:`key`).
        hosts: start workers on other machines over SSH: a hosts file path, or a list of lines
            in its format (``"[user@]host[:port] [slots=N] [python=/abs/path]"``; see
            :doc:`/ssh`). With ``hosts``, ``max_workers`` defaults to 0 (no local workers), and
            ``python`` is the interpreter path on hosts that do not set their own.
        ssh_config: OpenSSH client configuration to honour (default ``~/.ssh/config``).
        known_hosts: a known_hosts file to trust besides ``~/.ssh/known_hosts``.
        accept_new_host_keys: accept (and log) host keys that are not known, instead of
            refusing the host.
        tunnel: remote workers reach the task manager through the SSH connection (a remote
            port forward; nothing is exposed beyond loopback). False: they connect to
            ``listen`` directly.
        name: register the running executor under this name (letters, digits, ``.``, ``_``
            and ``-``), so that ``distexec status NAME`` can show its live statistics from
            another terminal of the same user on this machine. The registration (a file
            readable by this user only, holding the address and key) is removed when the
            executor stops.
        resources: named resources the local workers share, for placing tasks that need them
            (``{"gpu": 2}``; text values are labels, ``{"zone": "a"}``); see
            :meth:`options` and :doc:`/toolbox`. Their ``slots`` is ``max_workers``.

    Raises:
        ValueError: ``max_workers``, ``max_tasks_per_child``, ``worker_start_timeout``,
            ``time_limit`` or ``heartbeat_timeout`` is not positive, ``max_retries`` is
            negative, ``listen`` is malformed, a non-loopback ``listen`` has no ``key``, or
            ``name`` is not a valid name (a name already in use by a running executor is
            refused when the executor starts).
        TypeError: ``initializer`` is not callable, or an integer option is not an int.
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
        unpickle_timeout: float | None = 60.0,
        max_retries: int = 3,
        time_limit: float | None = None,
        heartbeat_timeout: float | None = 30.0,
        listen: str | None = None,
        key: bytes | str | None = None,
        hosts: str | os.PathLike[str] | Sequence[str] | None = None,
        ssh_config: str | None = None,
        known_hosts: str | None = None,
        accept_new_host_keys: bool = False,
        tunnel: bool = True,
        name: str | None = None,
        resources: dict[str, float | str] | None = None,
    ) -> None:
        self._config = executor_config(
            max_workers, initializer=initializer, initargs=initargs,
            max_tasks_per_child=max_tasks_per_child, python=python,
            worker_start_timeout=worker_start_timeout,
            max_message_size=max_message_size, unpickle_timeout=unpickle_timeout,
            max_retries=max_retries, time_limit=time_limit,
            heartbeat_timeout=heartbeat_timeout, listen=listen, key=key, hosts=hosts,
            ssh_config=ssh_config, known_hosts=known_hosts,
            accept_new_host_keys=accept_new_host_keys, tunnel=tunnel, name=name,
            resources=resources)
        self._max_workers = self._config.max_workers
        self._time_limit = check_timeout(time_limit, "time_limit")
        self._shared = SharedState()
        self._manager: Manager | None = None
        # Futures of tagged tasks not collected yet (as_completed(tag), next_result(tag)).
        self._tag_lock = threading.Lock()
        self._tags: dict[Any, TagBook] = {}

    # ------------------------------------------------------------------ properties
    @property
    def max_workers(self) -> int:
        """The number of local worker processes this executor keeps running (see
        :meth:`resize`)."""
        return self._max_workers

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` the task manager listens on, or None before it started (first
        submit or :meth:`start`). Workers started by hand connect here."""
        return self._manager.address if self._manager is not None else None

    @property
    def key(self) -> bytes:
        """The secret a worker must prove it holds to join (keep it secret).

        Give it to workers started by hand as hexadecimal (``ex.key.hex()``), in the
        ``DISTEXEC_KEY`` environment variable or a file passed with ``--key-file``.
        """
        assert self._config.key is not None
        return self._config.key

    @property
    def _broken(self) -> bool | str:
        # Same meaning as ProcessPoolExecutor._broken: falsy while usable.
        broken = self._shared.broken
        return str(broken) if broken is not None else False

    # ------------------------------------------------------------------ submitting
    def _start(self) -> Manager:
        # Called with the shared lock held, on first use.
        try:
            manager = Manager(self._config, self._shared)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self._config.listen_host}:"
                                     f"{self._config.listen_port}: {exc.strerror}") from exc
        shared = self._shared

        def executor_collected(_: object, manager: Manager = manager) -> None:
            # The user dropped the executor without shutting it down: finish and stop.
            with shared.lock:
                shared.shutdown = True
            manager.post(events.Shutdown(False))

        # Held by the manager (alive with its thread), so the callback fires even when the
        # executor dies in a reference cycle.
        manager.executor_ref = weakref.ref(self, executor_collected)
        manager.start()
        self._manager = manager
        return manager

    def start(self) -> DistributedExecutor:
        """Start the task manager and the local workers now rather than at the first submit.

        Useful when workers are to join by hand (they need :attr:`address`), or to pay the
        start-up cost up front. Calling it again does nothing. Returns the executor.

        Raises:
            RuntimeError: the executor was shut down.
            OSError: the ``listen`` address cannot be bound.
        """
        with self._shared.lock:
            self._check()
            if self._manager is None:
                self._start()
        return self

    def _check(self) -> None:
        broken = self._shared.broken
        if broken is not None:
            raise BrokenDistributedExecutor(str(broken)) from broken.__cause__
        if self._shared.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _submit(self, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any] | None,
                kind: TaskKind, time_limit: float | None = None,
                opts: TaskOptions | None = None, collect: bool = True) -> Future[Any]:
        future: Future[Any] = Future()
        if opts is None:
            task = Task(next(task_ids), future, fn, args, kwargs, kind, time_limit)
        else:
            task = Task(next(task_ids), future, fn, args, kwargs, kind, opts.time_limit,
                        opts.max_retries, opts.tag, opts.priority, opts._needs)
            if opts.retry_on is not None:
                task.retry_on = opts.retry_on
            if opts.fallback is not None:
                task.fallback = opts.fallback
            if opts.depends_on:
                task.deps = list(opts.depends_on)
        if kind is TaskKind.CALL:
            for arg in args:  # a cheap first look; _find_futures collects them
                if isinstance(arg, Future):
                    break
            else:
                arg = None
            if arg is not None or kwargs:
                found = _find_futures(args, kwargs)
                if found is not None:
                    task.deps = found if task.deps is None else task.deps + found
        future._distexec_task_id = task.id  # type: ignore[attr-defined]  # for abort()
        shared = self._shared
        with shared.lock:
            self._check()
            manager = self._manager or self._start()
            shared.inbox.append(task)
        manager.wake()
        if collect and opts is not None and opts.tag is not None:
            # Kept for as_completed(tag)/next_result(tag). Not for map(), which hands every
            # result to its caller itself (keeping them would hold them all in memory).
            self._tag_book(opts.tag).add(future)
        return future

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on a worker and return a Future for its result.

        ``fn`` and the arguments are pickled when the task is sent to a worker. If that fails,
        or if the result cannot be pickled, the future fails with
        :class:`~distexec.TaskPicklingError`; the executor is unaffected. To give this one task
        a time limit or its own ``max_retries``, use :meth:`options`.

        Raises:
            RuntimeError: the executor was shut down.
            BrokenDistributedExecutor: the executor is broken (see its ``__cause__``).
        """
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        return self._submit(fn, args, kwargs or None, TaskKind.CALL, self._time_limit)

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
        return self._map(fn, iterables, timeout, chunksize, buffersize, self._time_limit, None)

    def _map(
        self,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        buffersize: int | None,
        time_limit: float | None,
        opts: TaskOptions | None,
    ) -> Iterator[T]:
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
            return ex._submit(fn, item, None, kind, time_limit, opts, collect=False)

        if buffersize is None:
            futures = deque(submit_one(self, item) for item in work)
        else:
            futures = deque(submit_one(self, item) for item in itertools.islice(work, buffersize))
        # A weak reference, so that an abandoned iterator does not keep the executor alive.
        executor_ref = weakref.ref(self)
        return _map_results(futures, work if buffersize else None, executor_ref, submit_one,
                            end_time, chunksize > 1)

    def options(
        self,
        *,
        time_limit: float | None = UNSET,
        max_retries: int | None = UNSET,
        tag: Any = UNSET,
        priority: int = UNSET,
        resources: dict[str, float | str] | None = UNSET,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = UNSET,
        fallback: Callable[..., Any] | None = UNSET,
        depends_on: Iterable[Future[Any]] | None = UNSET,
    ) -> TaskOptions:
        """Return a view of this executor whose ``submit`` and ``map`` use other task options.

        Example: ``ex.options(time_limit=60, retry_on=IOError).submit(fetch, url)``. Options
        not given keep the executor's defaults; views can be chained
        (``ex.options(tag="a").options(priority=1)``). With ``map``, they apply to each chunk.
        See :doc:`/toolbox` for examples of each.

        Args:
            time_limit: seconds a task may run before it is stopped (its worker replaced) and
                its future fails with :class:`~distexec.TaskTimeoutError`; None: no limit.
            max_retries: how many times the task may run again: after its worker was lost, or
                after it raised an exception of a ``retry_on`` type. Default: the executor's.
            tag: any hashable value; :meth:`status` counts tasks per tag, and
                :meth:`as_completed` and :meth:`next_result` collect results per tag.
            priority: tasks with a higher priority are dispatched first (default 0; FIFO
                among equal priorities). A task never overtakes one that is already running.
            resources: what the task needs from its worker's pool, e.g. ``{"gpu": 1}``; text
                values must match a label (``{"zone": "a"}``); ``{"slots": 4}`` takes four
                workers' worth of a host. It runs only where that is free, and holds it while
                it runs.
            retry_on: an exception class, or a tuple of them: a task raising one of those runs
                again (at the back of the queue) while ``max_retries`` allows.
            fallback: called on a worker as ``fallback(exc, *args, **kwargs)`` when every
                attempt failed (an exception, lost workers, or the time limit); its result or
                exception becomes the future's. With ``map(..., chunksize>1)`` it is called
                for each item of the chunk.
            depends_on: futures that must have succeeded before the task starts (futures
                passed as arguments are dependencies already, and are replaced by their
                results). If one fails or is cancelled, the task fails with
                :class:`~distexec.DependencyError`.

        Raises:
            ValueError: ``time_limit`` is not positive, ``max_retries`` is negative, or a
                resource amount is not positive.
            TypeError: ``tag`` is not hashable, ``priority`` is not an int, ``retry_on`` is
                not an exception class, ``fallback`` is not callable, or ``depends_on`` holds
                something other than futures.
        """
        return TaskOptions(self, self._time_limit, None).options(
            time_limit=time_limit, max_retries=max_retries, tag=tag, priority=priority,
            resources=resources, retry_on=retry_on, fallback=fallback, depends_on=depends_on)

    # ------------------------------------------------------------------ control
    def _ask(self, event_type: Callable[..., Any], *args: Any) -> Any:
        """Post an event that the manager answers (its last field is the reply); wait for the
        answer."""
        manager = self._manager
        if manager is None or not manager.thread.is_alive():
            return None
        reply: Future[Any] = Future()
        event = event_type(*args, reply)
        if threading.current_thread() is manager.thread:  # called from a done-callback
            manager.handle_now(event)
            return reply.result()
        manager.post(event)
        while True:
            try:
                return reply.result(timeout=1.0)
            except FuturesTimeoutError:  # not the builtin TimeoutError on Python 3.10
                if not manager.thread.is_alive():
                    return None

    def resize(self, max_workers: int) -> None:
        """Change the number of local workers while the executor runs.

        Growing starts workers at once. Shrinking retires the surplus: workers not yet started
        or idle first, then those holding the fewest tasks; each leaves after finishing the
        tasks it holds, so no task is re-run. Workers that joined by hand are not counted and
        not touched.

        Raises:
            ValueError: ``max_workers`` is negative.
            RuntimeError: the executor was shut down.
        """
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError("max_workers must be an integer")
        if max_workers < 0:
            raise ValueError("max_workers must be >= 0")
        with self._shared.lock:
            self._check()
            self._max_workers = max_workers
            manager = self._manager
            if manager is None:
                self._config = self._config.replace(max_workers=max_workers)
                return
        manager.post(events.Resize(max_workers))

    def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> int:
        """Block until at least ``n`` workers are ready for tasks; start the executor if needed.

        Returns:
            The number of ready workers.

        Raises:
            TimeoutError: fewer than ``n`` workers were ready after ``timeout`` seconds.
            BrokenDistributedExecutor: the executor broke while waiting.
            RuntimeError: the executor was shut down.
        """
        self.start()
        shared = self._shared
        deadline = None if timeout is None else time.monotonic() + timeout
        with shared.lock:
            while shared.ready_workers < n:
                if shared.broken is not None:
                    raise BrokenDistributedExecutor(str(shared.broken)) from shared.broken
                if shared.stopped or shared.shutdown:
                    raise RuntimeError("the executor was shut down while waiting for workers")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"only {shared.ready_workers} of {n} workers were ready "
                                       f"after {timeout:g} s")
                shared.changed.wait(remaining)
            return shared.ready_workers

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 cancel_running: bool = False) -> None:
        """Stop accepting tasks and release the workers once the submitted work is done.

        Args:
            wait: block until all pending futures are done and every worker process has exited.
            cancel_futures: cancel the futures that have not started running.
            cancel_running: also stop the tasks that are running: their futures end cancelled
                and every worker is stopped at once, local ones killed, hand-started ones
                disconnected (they exit). Implies ``cancel_futures``.

        Calling it more than once is harmless. After shutdown, ``submit`` raises
        ``RuntimeError('cannot schedule new futures after shutdown')``.
        """
        with self._shared.lock:
            self._shared.shutdown = True
            manager = self._manager
        if manager is None:
            return
        if cancel_running:
            manager.post(events.Terminate("shutdown(cancel_running=True)"))
        else:
            manager.post(events.Shutdown(cancel_futures))
        if wait:
            manager.join()

    def terminate_workers(self) -> None:
        """Stop every worker now with SIGTERM, and shut the executor down without waiting.

        Python 3.14's ``ProcessPoolExecutor.terminate_workers()``, on every supported Python.
        Futures not started are cancelled, and so are the running ones (their workers stop
        mid-task; nothing is retried). Local workers get SIGTERM and lose their connections
        to the task manager, so they exit at once rather than finish their task and leave
        (SIGTERM from outside means "leave gracefully"); workers on SSH hosts are killed there;
        workers started by hand are disconnected, which makes them exit. Afterwards ``submit``
        raises RuntimeError. Harmless if no worker was ever started, or if the executor is
        broken or shut down already. ``shutdown()`` (or the end of the ``with`` block) then
        waits for the workers to be gone.
        """
        self._force_stop(signal.SIGTERM, "terminate_workers()")

    def kill_workers(self) -> None:
        """As :meth:`terminate_workers`, with SIGKILL for the local workers (Python 3.14's
        ``ProcessPoolExecutor.kill_workers()``)."""
        self._force_stop(signal.SIGKILL, "kill_workers()")

    def _force_stop(self, sig: int, reason: str) -> None:
        with self._shared.lock:
            self._shared.shutdown = True
            manager = self._manager
        if manager is not None:
            manager.post(events.Terminate(reason, sig))

    def _terminate(self, reason: str) -> None:
        """Stop now: cancel every future, running ones included, and kill every worker."""
        with self._shared.lock:
            self._shared.shutdown = True
            manager = self._manager
        if manager is not None:
            manager.post(events.Terminate(reason))
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
