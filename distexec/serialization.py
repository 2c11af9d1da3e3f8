"""Turning functions, arguments, results and exceptions into bytes and back. Never touches sockets.

Pickling strategy
-----------------
* Everything uses pickle protocol 5 with out-of-band buffers: an object that exposes its memory
  (a NumPy array, a :class:`pickle.PickleBuffer`) travels as a separate buffer that is written
  straight from, and read straight into, its final memory.
* The C pickler is tried first because it is several times faster than cloudpickle on plain data.
  Its output is kept only when it pickled nothing *by reference into* ``__main__`` (which a worker
  cannot import) and no module is registered with
  :func:`cloudpickle.register_pickle_by_value`; otherwise, or if it fails, cloudpickle pickles the
  object by value. Lambdas, closures, and functions or classes defined in ``__main__`` or in a
  notebook therefore work everywhere.
* Functions are pickled once per executor and cached (see :class:`FunctionCache`), not once per
  task: ``map`` over a million items pickles its function once.

Exceptions
----------
A remote exception is pickled together with its traceback, its ``__cause__``/``__context__``
chain and the members of exception groups, using tblib's reducers in a pickler of our own. The
reducers are installed on that one pickler, never in :mod:`copyreg`, so neither the worker nor the
calling process has its global pickling behaviour changed. The formatted traceback text always
travels alongside, so that an exception that cannot be pickled or unpickled still arrives as a
:class:`~distexec.errors.RemoteError` with everything a human needs.
"""

from __future__ import annotations

import io
import logging
import pickle
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle

from .errors import RemoteError

logger = logging.getLogger(__name__)

PROTOCOL = 5
_MAIN_MARKER = b"__main__"

Payload = tuple[bytes, list[memoryview]]


def _by_value_modules_registered() -> bool:
    # cloudpickle keeps the registry in a private module attribute; if that ever moves we simply
    # always take the cloudpickle path, which is correct, only slower.
    registry = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", None)
    return registry is None or bool(registry)


def dumps(obj: Any) -> Payload:
    """Pickle ``obj``; return the pickle and its out-of-band buffers (as byte views)."""
    buffers: list[pickle.PickleBuffer] = []
    if not _by_value_modules_registered():
        try:
            fast = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        except Exception:
            pass
        else:
            if _MAIN_MARKER not in fast:
                return fast, [b.raw() for b in buffers]
        buffers.clear()
    data = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    return data, [b.raw() for b in buffers]


def dumps_inband(obj: Any) -> bytes:
    """Pickle ``obj`` into one byte string (used for functions and small control data)."""
    data, buffers = dumps(obj)
    if buffers:
        data = cloudpickle.dumps(obj, protocol=PROTOCOL)
    return data


def loads(data: Any, buffers: Any = ()) -> Any:
    """Inverse of :func:`dumps`."""
    return pickle.loads(data, buffers=buffers)


class Pickled:
    """Something already pickled elsewhere (a child task's function or arguments, pickled by
    the task that submitted it): the task manager passes it on without unpickling it."""

    __slots__ = ("data", "buffers", "__qualname__")

    def __init__(self, data: Any, buffers: list[Any], name: str = "") -> None:
        self.data = data
        self.buffers = buffers
        self.__qualname__ = name  # what describe_callable() shows for a child's function


# ---------------------------------------------------------------------------- functions
class FunctionCache:
    """Client-side cache: function object -> (function id, pickled bytes). Manager thread only.

    Only plain functions are cached, keyed by identity: a bound method or a ``functools.partial``
    carries state that may change between submissions, so those are pickled with every task.
    A cached function is captured as it was when its first task was sent to a worker (for a
    function pickled by value, that includes the globals it reads).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Callable[..., Any], tuple[int, bytes]] = OrderedDict()
        self._next_id = 1

    def lookup(self, fn: Callable[..., Any]) -> tuple[int, bytes] | None:
        """Return (fn_id, bytes) if ``fn`` is cached, else None."""
        if type(fn) is not types.FunctionType and type(fn) is not types.BuiltinFunctionType:
            return None
        entry = self._entries.get(fn)
        if entry is not None:
            self._entries.move_to_end(fn)
        return entry

    def add(self, fn: Callable[..., Any], data: bytes) -> int:
        """Record a freshly pickled function and return its id (0 = not cacheable)."""
        fn_id = self._next_id
        self._next_id += 1
        if type(fn) is types.FunctionType or type(fn) is types.BuiltinFunctionType:
            self._entries[fn] = (fn_id, data)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return fn_id

    def __len__(self) -> int:
        return len(self._entries)


def describe_callable(fn: Any) -> str:
    """A short human name for a task's function, for error messages."""
    if type(fn) is Pickled:
        return fn.__qualname__ or "a child task's function"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return type(fn).__qualname__ + " instance"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


# ---------------------------------------------------------------------------- exceptions
class _ExceptionPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle with tblib's reducers for tracebacks and the given exception types only."""

    def __init__(self, file: Any, table: dict[type, Any]) -> None:
        merged = dict(cloudpickle.Pickler.dispatch_table)
        merged.update(table)
        # The C pickler reads dispatch_table once, in __init__: set it first.
        self.dispatch_table = merged
        super().__init__(file, protocol=PROTOCOL)


def _exception_types(exc: BaseException, seen: set[int], out: set[type]) -> None:
    if id(exc) in seen:
        return
    seen.add(id(exc))
    out.add(type(exc))
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            _exception_types(linked, seen, out)
    members = getattr(exc, "exceptions", None)
    if isinstance(members, (tuple, list)):
        for member in members:
            if isinstance(member, BaseException):
                _exception_types(member, seen, out)


def _pickle_exception(exc: BaseException) -> bytes:
    from functools import partial

    from tblib import pickling_support

    types_: set[type] = set()
    _exception_types(exc, set(), types_)
    table: dict[type, Any] = {t: _reduce_exception for t in types_}
    table[types.TracebackType] = partial(pickling_support.pickle_traceback, get_locals=None)
    buf = io.BytesIO()
    _ExceptionPickler(buf, table).dump(exc)
    return buf.getvalue()


def _reduce_exception(exc: BaseException) -> Any:
    """tblib's reducer, except for built-in types, which rebuild faithfully from their args.

    (tblib treats any class with its own ``__init__`` but the default ``__reduce__`` as opaque
    and restores only ``args``; built-ins such as SystemExit would lose ``code`` that way.)
    """
    from tblib import pickling_support

    if type(exc).__module__ != "builtins":
        return pickling_support.pickle_exception(exc)
    reduced: Any = exc.__reduce__()
    func, args, *rest = reduced
    return (
        pickling_support.unpickle_exception,
        (func, args, exc.__cause__, exc.__traceback__, exc.__context__,
         exc.__suppress_context__, getattr(exc, "__notes__", None)),
        *rest,
    )


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` on every supported Python (3.10 keeps the list, unprinted)."""
    add = getattr(exc, "add_note", None)
    if add is not None:
        add(note)
    else:
        notes = getattr(exc, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            try:
                exc.__notes__ = notes  # type: ignore[attr-defined]
            except Exception:
                return
        notes.append(note)


def format_exception(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as err:  # user __str__ or __repr__ may raise anything
        return f"{type(exc).__qualname__}: <could not format the exception: {err!r}>\n"


def qualified_type_name(exc: BaseException) -> str:
    t = type(exc)
    module = getattr(t, "__module__", "builtins")
    return t.__qualname__ if module in ("builtins", "__main__") else f"{module}.{t.__qualname__}"


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException as err:
        return f"<str() of the exception raised {err!r}>"


def dumps_exception(exc: BaseException, note: str | None = None) -> tuple[bytes, str, str, str]:
    """Worker side: pickle a task's exception with its traceback and chain.

    Returns (pickle or b"" if it could not be pickled, type name, message, formatted traceback).
    Never raises: a failure to pickle becomes a :class:`RemoteError` stand-in.
    """
    if note:
        try:
            add_note(exc, note)
        except BaseException:
            pass
    text = format_exception(exc)
    type_name = qualified_type_name(exc)
    message = safe_str(exc)
    try:
        return _pickle_exception(exc), type_name, message, text
    except BaseException as err:
        reason = f"pickling it failed on the worker: {type(err).__name__}: {safe_str(err)}"
    stand_in = RemoteError(type_name, message, text, reason)
    try:
        stand_in.__traceback__ = exc.__traceback__
        return _pickle_exception(stand_in), type_name, message, text
    except BaseException:
        stand_in.__traceback__ = None
        return _pickle_exception(stand_in), type_name, message, text


def loads_exception(
    data: bytes | bytearray | memoryview, type_name: str, message: str, text: str
) -> BaseException:
    """Client side: rebuild a remote exception; never raises, falls back to a stand-in."""
    if data:
        try:
            exc = pickle.loads(data)
        except BaseException as err:
            reason = f"unpickling it failed here: {type(err).__name__}: {safe_str(err)}"
        else:
            if isinstance(exc, BaseException):
                return exc
            reason = f"it unpickled as a {type(exc).__name__}, not an exception"
    else:
        reason = "the worker sent no pickle"
    return RemoteError(type_name, message, text, reason)
