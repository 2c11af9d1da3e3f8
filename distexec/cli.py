"""The ``distexec`` command.

``distexec version``
    Print the versions that matter between an executor and its workers (the Python minor
    version, cloudpickle and distexec must match; tblib and the interpreter are informative).
``distexec worker HOST:PORT [--key-file FILE] [--connect-timeout SECONDS] [--resources SPEC]``
    Run a worker that joins the executor whose task manager listens at HOST:PORT. The key comes
    from the file given, or from the ``DISTEXEC_KEY`` environment variable (hexadecimal); never
    from the command line, where other users could read it. SIGTERM or Ctrl-C makes it leave
    gracefully (it finishes what it holds); a second one makes it exit at once. ``--resources``
    names what the worker offers (``gpu=1,mem=16``) to tasks that need it.
``distexec status [NAME | HOST:PORT] [--key-file FILE] [--watch [SECONDS]] [--json]``
    Print the live statistics of a running executor (task counts per tag, what each worker is
    doing), found by the name it was given (``DistributedExecutor(name=...)``) or by its
    address. Without a target, the only named executor of this user on this machine. By
    address, the key comes from the file given or from ``DISTEXEC_KEY``. ``--watch`` repeats
    the report every SECONDS (default 2) until Ctrl-C or until the executor stops.
``distexec keygen FILE``
    Write a new random key (hexadecimal) to FILE, readable by its owner only.
``distexec hosts check FILE [--ssh-config F] [--known-hosts F] [--accept-new-host-keys]``
    Check every host of a hosts file, in parallel, as an executor would before starting workers
    there; print one row per host (reachable and logged in, Python and package versions,
    slots, SSH round trip, what is wrong). Exit status 0 when every host is usable, else 1.
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
    worker.add_argument("--resources", default=None, metavar="SPEC",
                        help="named resources this worker offers, e.g. gpu=1,mem=16 (the "
                             "scheduler places tasks that need them here)")
    status = sub.add_parser("status", help="show the live statistics of a running executor")
    status.add_argument("target", nargs="?", default=None, metavar="NAME|HOST:PORT",
                        help="the executor's name, or its address (default: the only named "
                             "executor running)")
    status.add_argument("--key-file", default=None, metavar="FILE",
                        help="with an address: file holding the executor's key (hex); "
                             "default: $DISTEXEC_KEY")
    status.add_argument("--watch", nargs="?", const="", default=None, metavar="SECONDS",
                        help="repeat every SECONDS (default: 2) until Ctrl-C or until the "
                             "executor stops")
    status.add_argument("--json", action="store_true",
                        help="print the report as JSON (one line per report with --watch)")
    keygen = sub.add_parser("keygen", help="write a new random key to a file (mode 0600)")
    keygen.add_argument("file")
    hosts = sub.add_parser("hosts", help="SSH hosts: 'distexec hosts check FILE'")
    hosts_sub = hosts.add_subparsers(dest="hosts_command", required=True)
    check = hosts_sub.add_parser("check", help="check every host of a hosts file")
    check.add_argument("file")
    check.add_argument("--ssh-config", default=None, help="default: ~/.ssh/config")
    check.add_argument("--known-hosts", default=None, help="extra known_hosts file")
    check.add_argument("--accept-new-host-keys", action="store_true")
    check.add_argument("--python", default=None,
                       help="interpreter on hosts without python= (default: this one's path)")
    args = parser.parse_args(argv)
    if args.command == "hosts":
        return _hosts_check(args)
    if args.command == "status":
        return _status(status, args)
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
    if args.resources is not None:
        argv_worker += ["--resources", args.resources]
    return worker_module.main(argv_worker)


# Seconds between two reports of ``distexec status --watch`` without SECONDS.
WATCH_INTERVAL = 2.0
# ANSI: cursor home, then erase the screen (only written to a terminal).
_CLEAR = "\x1b[H\x1b[2J"


def _status(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``distexec status``: find the executor, then print one report or watch it."""
    import json
    import os
    import time

    from . import monitor

    def fail(message: str, code: int = 1) -> int:
        sys.stderr.write(f"distexec status: {message}\n")
        return code

    target, interval = args.target, None
    if args.watch is not None:
        try:
            interval = float(args.watch) if args.watch else WATCH_INTERVAL
        except ValueError:
            if target is not None:
                parser.error(f"argument --watch: expected seconds, got {args.watch!r}")
            # "status --watch NAME": argparse gave the name to --watch.
            target, interval = args.watch, WATCH_INTERVAL
        if not interval > 0 or interval == float("inf"):
            parser.error(f"argument --watch: expected a positive number of seconds, "
                         f"got {args.watch!r}")
    try:
        if target is None:
            running = monitor.list_executors()
            if not running:
                return fail("no named executor is running on this machine for this user "
                            "(give one a name with DistributedExecutor(name=...), or pass "
                            "HOST:PORT)")
            if len(running) > 1:
                names = ", ".join(e["name"] for e in running)
                return fail(f"{len(running)} executors are running: {names}; say which", 2)
            target = running[0]["name"]
        if ":" in target:
            address = target
            try:
                key = _read_status_key(args.key_file)
            except ValueError as exc:
                return fail(str(exc), 2)
            if key is None:
                return fail("no key: pass --key-file FILE or set DISTEXEC_KEY (hexadecimal) "
                            f"to query {address}", 2)
        else:
            address, key = monitor.lookup(target)
    except (LookupError, ValueError, OSError, monitor.RegistryError) as exc:
        return fail(str(exc))
    tty = sys.stdout.isatty()
    shown = False
    try:
        while True:
            try:
                report = monitor.query(address, key)
            except monitor.ExecutorGoneError as exc:
                if not shown:
                    return fail(str(exc))
                sys.stdout.write(f"executor {target} stopped: nothing answers at {address} "
                                 "any more\n")
                sys.stdout.flush()
                return 0
            except (monitor.StatusError, ValueError) as exc:
                return fail(str(exc))
            if args.json:
                # One line per report when watching (JSON Lines), indented otherwise.
                text = json.dumps(report, sort_keys=True,
                                  indent=None if interval is not None else 2)
            else:
                text = monitor.format_status(report)
            if interval is not None and tty:
                text = f"{_CLEAR}{text}\n\nevery {interval:g} s; Ctrl-C to stop"
            elif interval is not None and shown and not args.json:
                text = "\n" + text  # a blank line between reports
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            shown = True
            if interval is None:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # "| head": the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _read_status_key(key_file: str | None) -> bytes | None:
    """The key given for an address: hex from ``key_file``, else from $DISTEXEC_KEY."""
    import os

    if key_file is not None:
        try:
            with open(key_file, "rb") as fh:
                text = fh.read().decode("ascii", "replace").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the key file {key_file}: {exc.strerror}") from None
        source = key_file
        if not text:
            raise ValueError(f"the key file {key_file} is empty")
    else:
        text = os.environ.get("DISTEXEC_KEY", "").strip()
        source = "DISTEXEC_KEY"
        if not text:
            return None
    from .protocol import parse_key

    try:
        return parse_key(text, f"the key in {source}")
    except ValueError as exc:
        if "hexadecimal" in str(exc):
            raise ValueError(f"the key in {source} is not hexadecimal") from None
        raise


def _hosts_check(args: argparse.Namespace) -> int:
    from .launchers.hosts import HostsFileError, read_hosts_file
    from .launchers.ssh import SSHOptions, check_hosts

    try:
        specs = read_hosts_file(args.file)
    except (HostsFileError, OSError) as exc:
        sys.stderr.write(f"distexec hosts check: {exc}\n")
        return 2
    options = SSHOptions(ssh_config=args.ssh_config, known_hosts=args.known_hosts,
                         accept_new_host_keys=args.accept_new_host_keys, python=args.python)
    rows = check_hosts(specs, options)
    columns = ("host", "ok", "python", "cloudpickle", "tblib", "distexec", "slots", "rtt_ms")
    table = [[str(c) for c in columns] + ["problem"]]
    for row in rows:
        cells = []
        for name in columns:
            value = row.get(name)
            if name == "ok":
                value = "yes" if value else "NO"
            elif name == "rtt_ms" and value is not None:
                value = f"{value:.1f}"
            cells.append("-" if value is None else str(value))
        table.append(cells + [row.get("problem") or ""])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        line = "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=False))
        sys.stdout.write(f"{line}  {r[-1]}".rstrip() + "\n")
    return 0 if all(row.get("ok") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
