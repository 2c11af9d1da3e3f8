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
    ProtocolError,
    RemoteError,
    TaskPicklingError,
    TaskUnpicklingError,
    WorkerLostError,
)

if TYPE_CHECKING:
    from .executor import DistributedExecutor

__all__ = [
    "BrokenDistributedExecutor",
    "DistexecError",
    "DistributedExecutor",
    "HandshakeError",
    "ProtocolError",
    "RemoteError",
    "TaskPicklingError",
    "TaskUnpicklingError",
    "WorkerLostError",
    "__version__",
]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name == "DistributedExecutor":
        from .executor import DistributedExecutor

        globals()["DistributedExecutor"] = DistributedExecutor
        return DistributedExecutor
    raise AttributeError(f"module 'distexec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"DistributedExecutor"})
