"""The ``distexec`` command.

``distexec version``
    Print the versions that matter between an executor and its workers (the Python minor
    version, cloudpickle and distexec must match; tblib and the interpreter are informative).
``distexec worker HOST:PORT [--key-file FILE]``
    Run a worker that connects to the task manager at HOST:PORT. The key comes from the file
    given, or from the ``DISTEXEC_KEY`` environment variable (hexadecimal); never from the
    command line, where other users could read it.
"""

from __future__ import annotations

import argparse
import sys


def _versions() -> dict[str, str]:
    import cloudpickle
    import tblib

    from ._version import __version__

    return {
        "distexec": __version__,
        "python": "{}.{}.{}".format(*sys.version_info[:3]),
        "cloudpickle": cloudpickle.__version__,
        "tblib": getattr(tblib, "__version__", "unknown"),
        "executable": sys.executable,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distexec`` console script."""
    parser = argparse.ArgumentParser(prog="distexec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the versions that matter between peers")
    worker = sub.add_parser("worker", help="run a worker that joins a running executor")
    worker.add_argument("address", metavar="HOST:PORT")
    worker.add_argument("--key-file", default=None,
                        help="file holding the executor's key (hex); default: $DISTEXEC_KEY")
    args = parser.parse_args(argv)
    if args.command == "version":
        for name, value in _versions().items():
            sys.stdout.write(f"{name:12} {value}\n")
        return 0
    from . import worker as worker_module

    argv_worker = ["--connect", args.address]
    if args.key_file:
        argv_worker += ["--key-file", args.key_file]
    return worker_module.main(argv_worker)


if __name__ == "__main__":
    sys.exit(main())
