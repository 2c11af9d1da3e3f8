"""The cloudpickle side of :mod:`distexec.serialization`, imported only when something is
pickled by value (a lambda, a closure, a function or class from ``__main__``) or an exception
travels: a worker running functions pickled by reference never imports cloudpickle.

Code objects pickled by value keep their file name: cloudpickle 3.1.3 and newer replace
``co_filename`` with ``"<dynamic-code>"`` (for deterministic pickles), which would leave remote
frames without a file name or source line. :class:`Pickler` wraps cloudpickle's code reducer and
puts the real name back on the unpickling side (:func:`_rebuild_code`); with a cloudpickle that
keeps the name itself, cloudpickle's reducer is used unchanged (probed at import).
"""

from __future__ import annotations

import io
import types
from collections import ChainMap
from typing import Any

import cloudpickle

from .serialization import _VERSIONS_KEY, OOB_MARK, PROTOCOL, MainVersions, OOBPicklerMixin


def _rebuild_code(make: Any, args: tuple[Any, ...], filename: str) -> types.CodeType:
    """Unpickling side of :func:`_reduce_code`: cloudpickle's rebuild, with the real file name."""
    code: types.CodeType = make(*args)
    return code.replace(co_filename=filename)


def _cloudpickle_code_reducer() -> Any:
    """cloudpickle's reducer for code objects, or None if it keeps ``co_filename`` itself."""
    reduce = cloudpickle.Pickler.dispatch_table.get(types.CodeType)
    if reduce is None:
        return None
    probe = compile("0", "<distexec-probe>", "eval")
    return None if "<distexec-probe>" in reduce(probe)[1] else reduce


_CODE_REDUCE = _cloudpickle_code_reducer()


def _reduce_code(code: types.CodeType) -> Any:
    """Reduce a code object as cloudpickle does, but keep its file name (see the module doc)."""
    make, args = _CODE_REDUCE(code)
    return _rebuild_code, (make, args, code.co_filename)


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, with code objects that keep their file name, and versions for the
    ``__main__`` globals of functions when :attr:`main_versions` is set."""

    # A ChainMap (as cloudpickle's own table) so that later copyreg registrations still count.
    dispatch_table = (ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)
                      if _CODE_REDUCE is not None else cloudpickle.Pickler.dispatch_table)
    main_versions: MainVersions | None = None

    def _dynamic_function_reduce(self, func: Any) -> Any:
        reduced = super()._dynamic_function_reduce(func)
        versions = self.main_versions
        if versions is not None and func.__globals__.get("__name__") == "__main__":
            try:
                f_globals = reduced[2][1]["__globals__"]
            except (IndexError, KeyError, TypeError):  # another cloudpickle layout: no versions
                return reduced
            if f_globals:
                f_globals[_VERSIONS_KEY] = {k: versions.version(k, v) for k, v in f_globals.items()}
        return reduced


def cloud_dumps(obj: Any, buffer_callback: Any = None,
                main_versions: MainVersions | None = None) -> bytes:
    """``cloudpickle.dumps(obj)`` with protocol 5 and file names kept (see :class:`_Pickler`)."""
    with io.BytesIO() as file:
        pickler = Pickler(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        if main_versions is not None:
            pickler.main_versions = main_versions
        pickler.dump(obj)
        return file.getvalue()


class _OOBPickler(OOBPicklerMixin, Pickler):
    pass


def cloud_dumps_oob(obj: Any, buffer_callback: Any, out: list[Any],
                    main_versions: MainVersions | None = None) -> bytes:
    """:func:`cloud_dumps` with large bytes-like objects out of band (appended to ``out``, as
    ``buffer_callback`` does with the rest), behind :data:`OOB_MARK`."""
    with io.BytesIO() as file:
        file.write(OOB_MARK)
        pickler = _OOBPickler(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        pickler._setup_oob(out)
        if main_versions is not None:
            pickler.main_versions = main_versions
        pickler.dump(obj)
        return file.getvalue()


class ExceptionPickler(Pickler):
    """Our pickler with tblib's reducers for tracebacks and the given exception types only."""

    def __init__(self, file: Any, table: dict[type, Any]) -> None:
        merged = ChainMap(table, Pickler.dispatch_table)
        # The C pickler reads dispatch_table once, in __init__: set it first.
        self.dispatch_table = merged
        super().__init__(file, protocol=PROTOCOL)


