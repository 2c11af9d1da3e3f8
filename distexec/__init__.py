"""distexec: a concurrent.futures executor whose workers survive crashes.

Public names are re-exported here explicitly; everything else is internal. The executor is
imported on first use, so that worker processes (``python -m distexec.worker``), which import
this package too, never load the task manager.
"""

import logging as _logging
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .context import (
    Shared,
    TaskExecutor,
    WorkerContext,
    current_worker,
    decline,
    get_executor,
    retrieve,
)
from .errors import (
    BrokenDistributedExecutor,
    DependencyError,
    DistexecError,
    HandshakeError,
    LostAttempt,
    MessageTooLargeError,
    ProtocolError,
    RemoteError,
    TaskDeclined,
    TaskPicklingError,
    TaskTimeoutError,
    TaskUnpicklingError,
)

if TYPE_CHECKING:
    from .errors import WorkerLostError
    from .executor import DistributedExecutor
    from .options import TaskOptions
    from .reports import ExecutorStatus, TaskCounts, WorkerInfo

__all__ = [
    "BrokenDistributedExecutor",
    "DependencyError",
    "DistexecError",
    "DistributedExecutor",
    "ExecutorStatus",
    "HandshakeError",
    "LostAttempt",
    "MessageTooLargeError",
    "ProtocolError",
    "RemoteError",
    "Shared",
    "TaskCounts",
    "TaskDeclined",
    "TaskExecutor",
    "TaskOptions",
    "TaskPicklingError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "WorkerContext",
    "WorkerInfo",
    "WorkerLostError",
    "__version__",
    "current_worker",
    "decline",
    "get_executor",
    "retrieve",
]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


# Where the names imported on first use live (the executor and its parts load in ~30 ms).
_LAZY = {"DistributedExecutor": "executor", "TaskOptions": "options", "ExecutorStatus": "reports",
         "TaskCounts": "reports", "WorkerInfo": "reports"}


def __getattr__(name: str) -> Any:
    if name == "WorkerLostError":  # its base class, BrokenProcessPool, imports multiprocessing
        from . import errors

        value = errors.WorkerLostError
        globals()[name] = value
        return value
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distexec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"WorkerLostError"})
