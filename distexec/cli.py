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
