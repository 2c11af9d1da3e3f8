"""What a task can ask of the worker it runs on: who it is, to decline it, shared data, and an
executor to submit further tasks to.

These functions are meant to be called from inside a task (the worker process sets the context
up before running tasks). They import nothing heavy, so that a task module can use them freely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any, NamedTuple

from .errors import TaskDeclined

__all__ = ["Shared", "TaskExecutor", "WorkerContext", "current_worker", "decline",
           "get_executor", "retrieve"]

# Set by the worker process (distexec.worker.Worker.run); None elsewhere.
_worker: Any = None


class WorkerContext(NamedTuple):
    """The worker a task runs on, as returned by :func:`current_worker`.

    Attributes:
        worker_id: the executor's number for the worker.
        host: its host name.
        pid: its process id.
        origin: ``"local"``, the label of the SSH host it was started on, or ``"joined"``.
        resources: what its resource pool offers (``{"slots": 4.0, "gpu": 1.0}``).
    """

    worker_id: int
    host: str
    pid: int
    origin: str
    resources: dict[str, float | str]


def current_worker() -> WorkerContext | None:
    """The worker running the calling task, or None when not called in a distexec worker."""
    worker = _worker
    if worker is None:
        return None
    return WorkerContext(worker.worker_id, worker.host, worker.pid, worker.origin,
                         dict(worker.resources))


def decline(reason: str = "") -> None:
    """Give the running task back: it returns to the queue and runs on another worker, never
    again on this one (the ancestors' ``returnTask``). Raises :class:`~distexec.TaskDeclined`,
    which the worker catches; do not catch it in the task.

    If every live worker has declined the task, its future fails with ``TaskDeclined``.

    Example::

        def render(scene):
            if distexec.current_worker().resources.get("gpu_mem", 0) < scene.mem:
                distexec.decline("not enough GPU memory")
            ...
    """
    raise TaskDeclined(reason)


def retrieve(name: str) -> Any:
    """Return the shared data stored as ``name`` with
    :meth:`DistributedExecutor.store() <distexec.DistributedExecutor.store>`.

    The first call on a worker fetches it from the task manager; later calls, by any task on
    that worker, return the same object (so treat it as read-only) until the executor stores a
    new value under that name or deletes it. A task submitted after ``store()`` returned always
    sees the new value.

    Raises:
        KeyError: nothing is stored under that name.
        RuntimeError: not called inside a task on a distexec worker.
    """
    return _require_worker("retrieve()").fetch(name)


def get_executor() -> TaskExecutor:
    """An executor for the running task to submit child tasks to: they run on the executor
    that runs this task, on any of its workers.

    Waiting for a child with ``future.result()`` (or through ``map``) never deadlocks the
    pool: if the child has not started yet, this worker runs it itself, right there; if it
    runs elsewhere, the task waits for it. Children are tasks like any other: they show in
    ``status()``, are retried when their worker is lost, and take the options ``tag``,
    ``priority``, ``resources``, ``time_limit`` and ``max_retries`` (through
    ``get_executor().options(...)``).

    Raises:
        RuntimeError: not called inside a task on a distexec worker.
    """
    return TaskExecutor(_require_worker("get_executor()"), {})


def _require_worker(what: str) -> Any:
    worker = _worker
    if worker is None:
        raise RuntimeError(f"{what} works inside a task running on a distexec worker; in "
                           "your own program, use the DistributedExecutor directly")
    return worker


class Shared:
    """A reference to shared data, made by :meth:`DistributedExecutor.share()
    <distexec.DistributedExecutor.share>`. Pass it as an argument: the task receives the
    value, sent to each worker once and kept there (read-only), instead of a copy per task.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<distexec.Shared {self.name!r}>"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_resolve_shared, (self.name,))


def _resolve_shared(name: str) -> Any:
    """Unpickling a :class:`Shared`: the value on a worker, the reference anywhere else."""
    worker = _worker
    if worker is None:
        return Shared(name)
    return worker.fetch(name)


class TaskExecutor(Executor):
    """The executor a task gets from :func:`get_executor`: ``submit``, ``map`` and
    ``options`` like :class:`~distexec.DistributedExecutor`'s, submitting child tasks to the
    executor that runs the task. ``shutdown`` does nothing (the executor is not the task's).
    """

    def __init__(self, worker: Any, options: dict[str, Any]) -> None:
        self._worker = worker
        self._options = options

    def options(self, **options: Any) -> TaskExecutor:
        """This executor with other options for the children it submits (``tag``,
        ``priority``, ``resources``, ``time_limit``, ``max_retries``; checked here by the
        rules of :meth:`DistributedExecutor.options`, with a tag of plain data)."""
        from .options import check_child_options

        merged = {**self._options, **options}
        check_child_options(merged)
        return TaskExecutor(self._worker, merged)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Submit ``fn(*args, **kwargs)`` as a child task; return its future."""
        from . import protocol, serialization
        from .errors import TaskPicklingError

        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        name = serialization.describe_callable(fn)
        try:
            fn_data = serialization.dumps_inband(fn)
            payload, oob = serialization.dumps((args, kwargs))
        except Exception as exc:
            raise TaskPicklingError(
                f"the child task {name} could not be pickled: {type(exc).__name__}: "
                f"{serialization.safe_str(exc)}. Pass a module-level function (or one cloudpickle "
                "can pickle by value) and picklable arguments") from exc
        size = len(fn_data) + serialization.nbytes(payload, oob)
        limit = self._worker.max_message_size
        if size > limit:
            from .errors import too_large

            raise too_large(f"the child task {name}: its function and arguments", size, limit)
        future = _ChildFuture(self._worker)
        client = self._worker.client()
        future._req_id = client.request(protocol.SUBMIT, (fn_data, name, self._options),
                                        [payload, *oob], handler=future._answer)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Any, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map`, with child tasks (one per item;
        ``chunksize`` is accepted and ignored). Results are waited for with ``result()``, so
        children that have not started run inside this task."""
        return super().map(fn, *iterables, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Does nothing: the executor belongs to the program that runs this task."""


class _ChildFuture(Future):  # type: ignore[type-arg]
    """The future of a child task. Waiting on it from the task's thread first offers to run
    the child right here, if the task manager has not sent it anywhere yet."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self._worker = worker
        self._req_id = 0
        self._claimed = False

    def _answer(self, ok: Any, extra: Any, buffers: list[Any]) -> None:
        # distexec-client thread: the child finished (or the connection broke).
        from . import serialization
        from .errors import TaskUnpicklingError

        try:
            if ok:
                value = serialization.loads(buffers[0], buffers[1:])
            else:
                type_name, message, text = extra
                exc = serialization.loads_exception(buffers[0] if buffers else b"",
                                                    type_name, message, text)
        except BaseException as err:
            ok, exc = False, TaskUnpicklingError(
                f"the result of a child task could not be unpickled: {type(err).__name__}: "
                f"{serialization.safe_str(err)}")
        try:
            if ok:
                self.set_result(value)
            else:
                self.set_exception(exc)
        except InvalidStateError:
            pass  # cancelled here meanwhile

    def _help(self, timeout: float | None) -> None:
        # Only the task's own thread may run a child inline, and only when it is willing to
        # wait as long as the child takes (no timeout).
        if (self.done() or self._claimed or timeout is not None
                or threading.current_thread() is not threading.main_thread()):
            return
        self._claimed = True
        from . import protocol

        current = self._worker.current
        parent = current[0] if current is not None else None
        answer = self._worker.client().request(protocol.CLAIM, (self._req_id, parent)).result()
        if getattr(answer, "kind", None) == protocol.RUN:
            self._worker.run_claimed(answer)

    def result(self, timeout: float | None = None) -> Any:
        self._help(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._help(timeout)
        return super().exception(timeout)
