"""Task options and resources: every check in one place, and the :class:`TaskOptions` view.

The same rules hold wherever an option or a resource comes from: ``submit`` through
:meth:`DistributedExecutor.options <distexec.DistributedExecutor.options>`, a child task's
options (checked in the task, and again by the task manager, which trusts no peer), a worker's
``--resources``, a hosts-file line's settings, or what a joined worker offers. Each check
raises TypeError (wrong kind of value) or ValueError (a value out of range) saying which option
and what is accepted.

Resources are names (identifiers) mapped to amounts (positive numbers; an offer may also be 0)
or to text labels; ``slots`` is the number of workers of a pool, never set as a resource.

Imported by the executor (caller threads), the task manager thread and the worker (for
``--resources``); holds no state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .scheduler import Needs, TaskKind

if TYPE_CHECKING:
    from .executor import DistributedExecutor

__all__ = ["ChildOptions", "TaskOptions", "check_child_options", "check_max_retries",
           "check_resources", "check_timeout", "offered_resources", "parse_resources",
           "resource_value"]

logger = logging.getLogger("distexec.manager")

P = ParamSpec("P")
T = TypeVar("T")


class _Unset:
    def __repr__(self) -> str:
        return "<unchanged>"


UNSET: Any = _Unset()

# What a child task's tag may be: it travels to the task manager as plain data, so that
# unpickling it there can never fail or run code.
_PLAIN_TAG = (str, int, float, tuple, type(None))


def check_timeout(value: Any, name: str) -> float | None:
    """A positive number of seconds, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None")
    if not value > 0:
        raise ValueError(f"{name} must be positive")
    return float(value)


def check_max_retries(max_retries: Any) -> int | None:
    if max_retries is None:
        return None
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise TypeError("max_retries must be an integer")
    if max_retries < 0:
        raise ValueError("max_retries must be >= 0")
    return max_retries


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError("priority must be an integer")
    return priority


def check_tag(tag: Any, plain: bool = False) -> Any:
    """Any hashable tag; with ``plain`` (a child task's), a str, number, tuple or None."""
    if plain and not isinstance(tag, _PLAIN_TAG):
        raise TypeError("the tag of a child task must be a str, number, tuple or None")
    hash(tag)  # TypeError for an unhashable tag
    return tag


def check_retry_on(retry_on: Any) -> tuple[type[BaseException], ...] | None:
    if retry_on is None:
        return None
    classes = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError("retry_on must be an exception class or a tuple of them, got "
                            f"{cls!r}")
    return classes


def resource_value(text: str) -> float | str:
    """A resource written as text (``--resources``, a hosts-file setting): a number where it
    parses as one, a label otherwise."""
    try:
        return float(text)
    except ValueError:
        return text


def check_resources(spec: Any, what: str, offer: bool = False) -> dict[str, float | str] | None:
    """Check a resources mapping: needs (``offer=False``: amounts > 0) or an offer (amounts
    >= 0, no ``slots``). Returns a copy with amounts as floats."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise TypeError(f"{what} must be a dict such as {{'gpu': 1}}, got {type(spec).__name__}")
    out: dict[str, float | str] = {}
    for name, value in spec.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{what}: resource names are identifiers such as 'gpu', "
                             f"got {name!r}")
        if isinstance(value, str):
            out[name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not value > 0 and not (offer and value == 0):
                raise ValueError(f"{what}: {name}={value!r} must be positive")
            out[name] = float(value)
        else:
            raise TypeError(f"{what}: {name}={value!r} must be a number or a text label")
    if offer and "slots" in out:
        raise ValueError(f"{what}: 'slots' is the number of workers, not a resource to set here")
    return out


def parse_resources(text: str, what: str = "--resources") -> dict[str, float | str]:
    """``"gpu=1,mem=16,zone=a"`` -> ``{"gpu": 1.0, "mem": 16.0, "zone": "a"}``: an offer
    (ValueError with what is wrong otherwise)."""
    spec: dict[str, Any] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier() or not value:
            raise ValueError(f"{what}: {part!r} is not NAME=VALUE (e.g. gpu=1,zone=a)")
        if name == "slots":
            raise ValueError(f"{what}: a worker started by hand has one slot; start several "
                             "workers for more")
        spec[name] = resource_value(value)
    try:
        return check_resources(spec, what, offer=True) or {}
    except ValueError as exc:
        raise ValueError(str(exc).replace("must be positive", "must not be negative")) from None


def offered_resources(spec: Any) -> dict[str, float | str] | None:
    """What a joined worker says it offers, keeping the entries that pass
    :func:`check_resources` (the others are logged and ignored: the worker checked them
    already, so a bad one means a peer to distrust, not a user to tell)."""
    if not isinstance(spec, dict):
        return None
    out: dict[str, float | str] = {}
    for name, value in spec.items():
        try:
            out.update(check_resources({name: value}, "an offer", offer=True) or {})
        except (TypeError, ValueError):
            logger.warning("ignored the resource %r=%r offered by a worker", name, value)
    return out


class ChildOptions:
    """A child task's options, checked."""

    __slots__ = ("tag", "priority", "time_limit", "max_retries", "needs")

    NAMES = ("tag", "priority", "resources", "time_limit", "max_retries")

    def __init__(self, tag: Any, priority: int, time_limit: float | None,
                 max_retries: int | None, needs: Needs | None) -> None:
        self.tag = tag
        self.priority = priority
        self.time_limit = time_limit
        self.max_retries = max_retries
        self.needs = needs


def check_child_options(options: Any) -> ChildOptions:
    """Check the options a task gives its child tasks (in the task, and again in the task
    manager): the same rules as :meth:`DistributedExecutor.options`, with a plain tag."""
    if not isinstance(options, dict):
        raise TypeError("child task options must be a dict")
    unknown = [name for name in options if name not in ChildOptions.NAMES]
    if unknown:
        raise TypeError(f"options() got an unexpected option {unknown[0]!r} (child tasks "
                        f"take {', '.join(ChildOptions.NAMES)})")
    resources = check_resources(options.get("resources"), "resources")
    return ChildOptions(check_tag(options.get("tag"), plain=True),
                        check_priority(options.get("priority", 0)),
                        check_timeout(options.get("time_limit"), "time_limit"),
                        check_max_retries(options.get("max_retries")),
                        Needs(resources) if resources else None)


class TaskOptions:
    """A view of a :class:`DistributedExecutor` that submits with other task options.

    Made by :meth:`DistributedExecutor.options`; cheap, holds no state but the options
    (see there for their meaning).
    """

    def __init__(self, executor: DistributedExecutor, time_limit: float | None,
                 max_retries: int | None, tag: Any = None, priority: int = 0,
                 resources: dict[str, float | str] | None = None,
                 retry_on: tuple[type[BaseException], ...] | None = None,
                 fallback: Callable[..., Any] | None = None,
                 depends_on: tuple[Future[Any], ...] = ()) -> None:
        self._executor = executor
        self.time_limit = time_limit
        self.max_retries = max_retries
        self.tag = tag
        self.priority = priority
        self.resources = resources
        self._needs = Needs(resources) if resources else None
        self.retry_on = retry_on
        self.fallback = fallback
        self.depends_on = depends_on

    def __repr__(self) -> str:
        fields = ("time_limit", "max_retries", "tag", "priority", "resources", "retry_on",
                  "fallback", "depends_on")
        return "<TaskOptions " + " ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ">"

    def options(
        self,
        *,
        time_limit: float | None = UNSET,
        max_retries: int | None = UNSET,
        tag: Any = UNSET,
        priority: int = UNSET,
        resources: dict[str, float | str] | None = UNSET,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = UNSET,
        fallback: Callable[..., Any] | None = UNSET,
        depends_on: Iterable[Future[Any]] | None = UNSET,
    ) -> TaskOptions:
        """These options, with the ones given replaced."""
        if fallback is not UNSET and fallback is not None and not callable(fallback):
            raise TypeError("fallback must be callable")
        deps: tuple[Future[Any], ...] = self.depends_on
        if depends_on is not UNSET:
            deps = tuple(depends_on or ())
            for dep in deps:
                if not isinstance(dep, Future):
                    raise TypeError(f"depends_on takes futures, got {type(dep).__name__}")
        return TaskOptions(
            self._executor,
            self.time_limit if time_limit is UNSET else check_timeout(time_limit, "time_limit"),
            self.max_retries if max_retries is UNSET else check_max_retries(max_retries),
            self.tag if tag is UNSET else check_tag(tag),
            self.priority if priority is UNSET else check_priority(priority),
            self.resources if resources is UNSET else check_resources(resources, "resources"),
            self.retry_on if retry_on is UNSET else check_retry_on(retry_on),
            self.fallback if fallback is UNSET else fallback,
            deps,
        )

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """:meth:`DistributedExecutor.submit` with these options."""
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        return self._executor._submit(fn, args, kwargs or None, TaskKind.CALL, None, self)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """:meth:`DistributedExecutor.map` with these options (applied to each chunk)."""
        return self._executor._map(fn, iterables, timeout, chunksize, buffersize,
                                   self.time_limit, self)
