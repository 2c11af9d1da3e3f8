"""distexec: a concurrent.futures executor whose workers survive crashes.

Public names are re-exported here explicitly; everything else is internal. The executor is
imported on first use, so that worker processes (``python -m distexec.worker``), which import
this package too, never load the task manager.
"""

import logging as _logging
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BrokenDistributedExecutor,
    DistexecError,
    HandshakeError,
    LostAttempt,
    ProtocolError,
    RemoteError,
    TaskPicklingError,
    TaskTimeoutError,
    TaskUnpicklingError,
    WorkerLostError,
)

if TYPE_CHECKING:
    from .executor import (
        DistributedExecutor,
        ExecutorStatus,
        TaskCounts,
        TaskOptions,
        WorkerInfo,
    )

__all__ = [
    "BrokenDistributedExecutor",
    "DistexecError",
    "DistributedExecutor",
    "ExecutorStatus",
    "HandshakeError",
    "LostAttempt",
    "ProtocolError",
    "RemoteError",
    "TaskCounts",
    "TaskOptions",
    "TaskPicklingError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "WorkerInfo",
    "WorkerLostError",
    "__version__",
]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


_LAZY = ("DistributedExecutor", "ExecutorStatus", "TaskCounts", "TaskOptions", "WorkerInfo")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import executor

        value = getattr(executor, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distexec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
