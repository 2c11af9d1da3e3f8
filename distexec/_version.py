"""The version of distexec, and a cheap lookup of other installed versions."""

import os
import sys

__version__ = "0.6.0"


def installed_version(name: str) -> str:
    """The installed version of the distribution ``name``, read from its ``.dist-info``
    directory name on sys.path, without importing it or :mod:`importlib.metadata`: the
    handshake reports cloudpickle's and tblib's versions, and a worker (or a caller) that
    pickles nothing by value never imports them. Imports the module only where no such
    directory is found."""
    prefix, suffix = name + "-", ".dist-info"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for item in names:
            if item.startswith(prefix) and item.endswith(suffix):
                return item[len(prefix):-len(suffix)]
    try:
        module = __import__(name)
    except ImportError:  # pragma: no cover - a dependency
        return "missing"
    return str(getattr(module, "__version__", "unknown"))
