"""The executor's settings: every constructor argument of :class:`~distexec.DistributedExecutor`
checked, and turned into the task manager's :class:`~distexec.manager.ManagerConfig`.

Runs in the caller's thread, in the constructor, before anything is started: a bad argument is
refused with an error that names it, and nothing is left to clean up.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import protocol, serialization
from .errors import TaskPicklingError
from .manager import ManagerConfig
from .options import check_max_retries, check_resources, check_timeout

if TYPE_CHECKING:
    from .launchers.hosts import HostSpec
    from .launchers.ssh import SSHOptions

__all__ = ["executor_config"]


def _default_workers() -> int:
    count = getattr(os, "process_cpu_count", None)
    n = count() if count is not None else None
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count()
    return n or 1


def _check_name(name: str | None) -> str | None:
    if name is None:
        return None
    from .monitor import check_name

    return check_name(name)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen must be 'HOST:PORT' (port 0 picks a free one), got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def _ssh_options(**kwargs: Any) -> SSHOptions:
    from .launchers.ssh import SSHOptions

    return SSHOptions(**kwargs)


def _initializer(initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
                 remote: bool, hosts: bool) -> tuple[Any, serialization.MainVersions]:
    """The initializer and its arguments pickled (with what local workers must inherit), and
    the versions of ``__main__`` they carry."""
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    inheritance = None
    main_versions = serialization.MainVersions()
    if initializer is not None:
        from .mpobjects import local_only_initargs_error, pickle_initializer

        try:
            inheritance = pickle_initializer(initializer, tuple(initargs), main_versions)
        except Exception as exc:
            raise TaskPicklingError(
                f"the initializer {serialization.describe_callable(initializer)} or its "
                f"initargs could not be pickled: {exc}"
            ) from exc
        if inheritance.local_only and remote:
            inheritance.close()
            raise TaskPicklingError(local_only_initargs_error(
                inheritance.local_only,
                "SSH hosts" if hosts else "workers started by hand (listen=...)"))
    return inheritance, main_versions


def _address_and_key(listen: str | None, key: bytes | str | None, direct: bool
                     ) -> tuple[str, int, bytes | None]:
    """Where the task manager listens and the key it requires (``direct``: SSH workers
    connect to it without the tunnel)."""
    host, port = "127.0.0.1", 0
    if listen is not None:
        host, port = _parse_listen(listen)
    if key is None and os.environ.get(protocol.KEY_ENV):
        key = os.environ[protocol.KEY_ENV]
    raw_key = protocol.parse_key(key) if key is not None else None
    if raw_key is None and not _is_loopback(host):
        raise ValueError(
            f"listening on {host} (not a loopback address) requires a key that the workers "
            f"share: pass key=... or set {protocol.KEY_ENV} (for example from "
            "'distexec keygen FILE')")
    if direct and _is_loopback(host):
        raise ValueError("tunnel=False makes remote workers connect to the task manager "
                         "directly: give it a reachable address with listen='0.0.0.0:PORT' "
                         "(and a key)")
    return host, port, raw_key


def executor_config(
    max_workers: int | None,
    *,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_child: int | None = None,
    python: str | None = None,
    worker_start_timeout: float = 60.0,
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE,
    unpickle_timeout: float | None = 60.0,
    max_retries: int = 3,
    time_limit: float | None = None,
    heartbeat_timeout: float | None = 30.0,
    listen: str | None = None,
    key: bytes | str | None = None,
    hosts: str | os.PathLike[str] | Sequence[str] | None = None,
    ssh_config: str | None = None,
    known_hosts: str | None = None,
    accept_new_host_keys: bool = False,
    tunnel: bool = True,
    name: str | None = None,
    resources: dict[str, float | str] | None = None,
) -> ManagerConfig:
    """Check the arguments of :class:`~distexec.DistributedExecutor` (see there) and return
    the task manager's configuration; ``max_workers`` is resolved (its default depends on
    ``hosts``). Raises what the executor's constructor documents."""
    host_specs: tuple[HostSpec, ...] = ()
    if hosts is not None:
        from .launchers.hosts import merge_duplicates, parse_hosts, read_hosts_file

        if isinstance(hosts, (str, os.PathLike)):
            host_specs = tuple(merge_duplicates(read_hosts_file(hosts)))
        else:
            host_specs = tuple(merge_duplicates(parse_hosts(list(hosts), "hosts")))
    if max_workers is None:
        max_workers = 0 if host_specs else _default_workers()
    elif max_workers <= 0 and not (max_workers == 0 and (listen is not None or host_specs)):
        raise ValueError("max_workers must be greater than 0 (0 is allowed with listen=..., "
                         "for an executor that waits for workers started by hand)")
    if max_tasks_per_child is not None:
        if not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")
    inheritance, main_versions = _initializer(initializer, initargs,
                                              bool(host_specs) or listen is not None,
                                              bool(host_specs))
    if worker_start_timeout <= 0:
        raise ValueError("worker_start_timeout must be positive")
    retries = check_max_retries(max_retries)
    if retries is None:
        raise TypeError("max_retries must be an integer")
    check_timeout(time_limit, "time_limit")
    if heartbeat_timeout is not None and not heartbeat_timeout > 0:
        raise ValueError("heartbeat_timeout must be positive, or None to disable it")
    host, port, raw_key = _address_and_key(listen, key, bool(host_specs) and not tunnel)
    return ManagerConfig(
        max_workers=max_workers,
        initializer=inheritance.data if inheritance is not None else None,
        inheritance=inheritance,
        main_versions=main_versions,
        max_tasks_per_child=max_tasks_per_child,
        python=python,
        worker_start_timeout=worker_start_timeout,
        max_message_size=max_message_size,
        unpickle_timeout=check_timeout(unpickle_timeout, "unpickle_timeout"),
        listen_host=host,
        listen_port=port,
        key=raw_key or protocol.new_key(),
        heartbeat_timeout=heartbeat_timeout,
        max_retries=retries,
        hosts=host_specs,
        ssh=_ssh_options(ssh_config=ssh_config, known_hosts=known_hosts,
                       accept_new_host_keys=accept_new_host_keys, tunnel=tunnel,
                       python=python) if host_specs else None,
        name=_check_name(name),
        resources=check_resources(resources, "resources", offer=True),
    )
