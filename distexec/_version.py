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


# What must match between the task manager and a worker: Python's minor version and these.
MATCHED_PACKAGES = ("cloudpickle", "tblib", "distexec")


def versions() -> dict[str, str]:
    """This interpreter's Python version (x.y.z) and those of :data:`MATCHED_PACKAGES`: what a
    worker reports in its handshake and what the task manager and the SSH launcher compare."""
    return {"python": "{}.{}.{}".format(*sys.version_info[:3]),
            "cloudpickle": installed_version("cloudpickle"),
            "tblib": installed_version("tblib"), "distexec": __version__}


def mismatches(here: dict[str, str], there: dict[str, object]) -> list[str]:
    """What differs between two :func:`versions` reports (Python by minor version), one
    phrase each ("tblib 3.0.0 there, 3.1.0 here"); empty when they match."""
    problems = []
    minor_here = ".".join(str(here.get("python", "")).split(".")[:2])
    if ".".join(str(there.get("python", "")).split(".")[:2]) != minor_here:
        problems.append(f"Python {there.get('python') or 'unknown'} there, "
                        f"{here.get('python')} here")
    for name in MATCHED_PACKAGES:
        if there.get(name) != here.get(name):
            problems.append(f"{name} {there.get(name) or 'missing'} there, {here.get(name)} here")
    return problems
