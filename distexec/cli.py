"""The ``distexec`` command.

``distexec version``
    Print the versions that matter between an executor and its workers (the Python minor
    version, cloudpickle and distexec must match; tblib and the interpreter are informative).
``distexec worker HOST:PORT [--key-file FILE] [--connect-timeout SECONDS]``
    Run a worker that joins the executor whose task manager listens at HOST:PORT. The key comes
    from the file given, or from the ``DISTEXEC_KEY`` environment variable (hexadecimal); never
    from the command line, where other users could read it. SIGTERM or Ctrl-C makes it leave
    gracefully (it finishes what it holds); a second one makes it exit at once.
``distexec keygen FILE``
    Write a new random key (hexadecimal) to FILE, readable by its owner only.
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
    worker.add_argument("--connect-timeout", type=float, default=30.0,
                        help="keep trying to reach the executor this long (default: 30 s)")
    keygen = sub.add_parser("keygen", help="write a new random key to a file (mode 0600)")
    keygen.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "version":
        for name, value in _versions().items():
            sys.stdout.write(f"{name:12} {value}\n")
        return 0
    if args.command == "keygen":
        import os

        from .protocol import new_key

        try:
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            sys.stderr.write(f"distexec keygen: cannot create {args.file}: {exc}\n")
            return 1
        with os.fdopen(fd, "w") as fh:
            fh.write(new_key().hex() + "\n")
        return 0
    from . import worker as worker_module

    argv_worker = ["--connect", args.address, "--connect-timeout", str(args.connect_timeout)]
    if args.key_file:
        argv_worker += ["--key-file", args.key_file]
    return worker_module.main(argv_worker)


if __name__ == "__main__":
    sys.exit(main())
