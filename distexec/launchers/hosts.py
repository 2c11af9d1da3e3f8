"""Host lists: the hosts file format and its parser (pure: no SSH, no sockets).

A hosts file has one host per line::

    # comment lines and blank lines are ignored; so is anything after " #"
    [user@]host[:port] [slots=N] [python=/abs/path/python] [key=value ...]

* ``host`` is a name (resolved through ``~/.ssh/config`` like ``ssh`` does, so aliases work), an
  IPv4 address, or an IPv6 address in brackets (``[2001:db8::1]:2222``).
* ``slots``: how many workers to run there; default: the number of CPUs the host reports.
* ``python``: the interpreter to run there, as an absolute path; default: the path of the
  interpreter running the executor (right for identical machines or a shared filesystem).

* other ``key=value`` settings (``gpus=2``, ``zone=a``) are kept with the host (see
  :attr:`HostSpec.settings`) for placing tasks; a key that looks like a misspelt known one
  (``slot=4``, ``pyhton=...``) is an error, so that a typo does not go unnoticed.

Open MPI hostfiles (``node1 slots=4``, ``node2 slots=4 max_slots=8``) work as they are
(``max_slots`` is kept like any other setting). The same lines can be given as a Python list.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["HostSpec", "HostsFileError", "merge_duplicates", "parse_host", "parse_hosts",
           "resources_from_settings",
           "read_hosts_file"]

_KNOWN_KEYS = ("slots", "python")


class HostsFileError(ValueError):
    """A line of a hosts file (or an entry of a host list) is malformed.

    The message names the file and line (or the list index), the line itself and what is wrong.
    """


@dataclass(frozen=True)
class HostSpec:
    """One host to start workers on, as written by the user.

    Attributes:
        host: the host name or address as written (an ``~/.ssh/config`` alias is resolved
            when connecting).
        user: the login name, or None for the SSH configuration's default (then yours).
        port: the SSH port, or None for the SSH configuration's default (then 22).
        slots: workers to run there, or None for the host's CPU count.
        python: absolute path of the interpreter there, or None for the default.
        origin: where the spec came from (``"hosts.txt:3"``), for messages.
        settings: the other ``key=value`` settings of the line, in order.
    """

    host: str
    user: str | None = None
    port: int | None = None
    slots: int | None = None
    python: str | None = None
    origin: str = ""
    suffix: str = ""  # tells apart two specs of the same login (other interpreters)
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """``[user@]host[:port]`` as the user wrote it, for messages and log prefixes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{user}{host}{port}{self.suffix}"


def parse_host(line: str, origin: str = "") -> HostSpec | None:
    """Parse one line; None for a blank or comment line. Raises :class:`HostsFileError`."""
    text = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
    if not text or text.startswith("#"):
        return None

    def fail(why: str) -> HostsFileError:
        where = f"{origin}: " if origin else ""
        return HostsFileError(f"{where}{why} in {line.strip()!r}; expected "
                              "'[user@]host[:port] [slots=N] [python=/abs/path/python]'")

    first, *rest = text.split()
    user = None
    if "@" in first:
        user, _, first = first.rpartition("@")
        if not user:
            raise fail("empty user name before '@'")
    port: int | None = None
    if first.startswith("["):
        host, sep, tail = first[1:].partition("]")
        if not sep:
            raise fail("unclosed '[' in an IPv6 address")
        if tail:
            if not tail.startswith(":"):
                raise fail(f"unexpected {tail!r} after the address")
            port = _port(tail[1:], fail)
    elif first.count(":") == 1:
        host, _, port_text = first.partition(":")
        port = _port(port_text, fail)
    elif ":" in first:
        raise fail("an IPv6 address must be written in brackets, e.g. [2001:db8::1]:22")
    else:
        host = first
    if not host:
        raise fail("no host name")
    slots = python = None
    settings = []
    seen = set()
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"{item!r} is not key=value")
        if key in seen:
            raise fail(f"{key} given twice")
        seen.add(key)
        if key == "slots":
            if not value.isdigit() or int(value) < 1:
                raise fail(f"slots must be a whole number >= 1, got {value!r}")
            slots = int(value)
        elif key == "python":
            if not value.startswith("/"):
                raise fail(f"python must be an absolute path, got {value!r}")
            python = value
        else:
            near = difflib.get_close_matches(key, _KNOWN_KEYS, n=1, cutoff=0.75)
            if near:
                raise fail(f"unknown setting {key!r} (did you mean {near[0]!r}?)")
            if not key or not value:
                raise fail(f"{item!r} needs a key and a value")
            settings.append((key, value))
    return HostSpec(host, user, port, slots, python, origin, settings=tuple(settings))


def _port(text: str, fail: Callable[[str], HostsFileError]) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise fail(f"port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def parse_hosts(lines: Iterable[str], source: str = "hosts") -> list[HostSpec]:
    """Parse the lines of a hosts file (or list entries); blank and comment lines are skipped.

    Raises:
        HostsFileError: a bad line (the message names ``source`` and the line number), or no
            host at all.
    """
    specs = []
    for number, line in enumerate(lines, 1):
        spec = parse_host(line, f"{source}:{number}")
        if spec is not None:
            specs.append(spec)
    if not specs:
        raise HostsFileError(f"{source}: no hosts (only blank or comment lines)")
    return specs


def merge_duplicates(specs: list[HostSpec]) -> list[HostSpec]:
    """One spec per host: lines that name the same login (as Open MPI hostfiles may) add up
    their slots; a line without slots stands for the host's CPU count, which then wins."""
    merged: dict[tuple[str, str | None, int | None, str | None], HostSpec] = {}
    for spec in specs:
        key = (spec.host, spec.user, spec.port, spec.python)
        first = merged.get(key)
        if first is None:
            merged[key] = spec
            continue
        slots = (first.slots + spec.slots if first.slots is not None and spec.slots is not None
                 else None)
        merged[key] = HostSpec(first.host, first.user, first.port, slots, first.python,
                               first.origin, settings=first.settings + tuple(
                                   kv for kv in spec.settings if kv not in first.settings))
    labels = [s.label for s in merged.values()]
    if len(set(labels)) != len(labels):
        # The same login with different interpreters: tell them apart in logs and counts.
        counts: dict[str, int] = {}
        out = []
        for spec in merged.values():
            counts[spec.label] = counts.get(spec.label, 0) + 1
            out.append(spec if counts[spec.label] == 1 else HostSpec(
                spec.host, spec.user, spec.port, spec.slots, spec.python,
                spec.origin, suffix=f"#{counts[spec.label]}", settings=spec.settings))
        return out
    return list(merged.values())


def read_hosts_file(path: str | os.PathLike[str]) -> list[HostSpec]:
    """Read and parse a hosts file.

    Raises:
        HostsFileError: a malformed line, or an empty file.
        OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as fh:
        return parse_hosts(fh.read().splitlines(), os.fspath(path))


def resources_from_settings(settings: Any) -> dict[str, float | str]:
    """A hosts-file line's ``key=value`` settings as pool resources: numbers where they parse
    as numbers (``gpu=2``), text labels otherwise (``zone=a``), by the rule of
    :func:`distexec.options.resource_value`."""
    from ..options import resource_value

    return {key: resource_value(value) for key, value in settings}
