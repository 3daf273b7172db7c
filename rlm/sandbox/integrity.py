"""Scaffold integrity in the worker: what model code patched in the scaffold is put back before each cell.

The threat: one prompt-injected document steers a cell into patching the code that carries
answers out of the worker (`worker._as_answer`, `protocol.write_frame`, a method of
`Session`, a function's `__code__`, `builtins.str`, `json.dumps`, a trace hook...), so that
every later, honest cell reports a forged FINAL or sees forged sub-call answers.

`Guard.capture()` runs once, after confinement and before any model code. It records:

- the globals of the modules the scaffold runs through: all of them for our own modules,
  the functions, classes and modules for the standard-library ones (their data may change
  legitimately, as `linecache.cache` does);
- the attributes of the classes defined there, and the code, defaults and closure contents
  of every function and method found there (plus the extra ones given, such as the bridge
  that carries `llm_query` to the host);
- the builtins, the `sys.modules` entries of those modules, the import hooks, gc callbacks,
  the SIGINT handler and the recursion limit;
- the session's own wiring (its bridge and scaffold table).

It also installs an audit hook (which nothing can remove) that refuses new audit hooks and
refuses replacing the code or defaults of any recorded function. `Guard.restore()`, called
before every cell, puts back whatever differs and clears trace and profile hooks. It costs
tens of microseconds per cell.

What it cannot do: code in the same process can still reach the scaffold's live objects
through frames, `gc` or `ctypes`, and a thread or finaliser the model left behind can patch
again after a restore. So this is not a boundary of its own: the host checks every frame
it receives (protocol.py) and records the sub-call answers it sent, and the sandbox levels,
not this module, keep model code away from the host.

Runs inside the worker; standard library only.
"""

from __future__ import annotations

import builtins
import gc
import signal
import sys
import threading
import types
from operator import is_

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable

__all__ = ["Guard", "TRUSTED_MODULES"]

# Ours: every global is restored.
_OWN_MODULES = (
    "rlm.sandbox.worker", "rlm.sandbox.protocol", "rlm.sandbox.describe", "rlm.sandbox.integrity",
    "rlm.sandbox.textfile", "rlm.sandbox.serve", "rlm.sandbox.subcalls", "rlm.sandbox.kernel", "rlm._text",
)
# The standard library the scaffold's path uses: functions, classes and submodules are restored.
_LIBRARY_MODULES = (
    "json", "json.encoder", "json.decoder", "json.scanner", "os", "posix", "posixpath", "io", "ast", "traceback",
    "linecache", "signal", "threading", "select", "socket", "struct", "mmap", "time", "sys", "types", "codecs",
    "functools", "contextlib",
)
TRUSTED_MODULES = _OWN_MODULES + _LIBRARY_MODULES
# Modules whose classes and functions are recorded too (the code that builds and writes frames
# and error texts); for the others, their globals are enough.
_DEEP_MODULES = frozenset(_OWN_MODULES + ("json", "json.encoder", "json.decoder", "traceback", "linecache"))
_CODE_KINDS = (types.FunctionType, types.BuiltinFunctionType, type, types.ModuleType, staticmethod, classmethod)


def _is_code(value: Any) -> bool:
    """Functions, classes and modules: what a library module's globals hold that is not its data."""
    return isinstance(value, _CODE_KINDS)
_FUNCTION_FIELDS = ("__code__", "__defaults__", "__kwdefaults__")


class Guard:
    """A snapshot of the scaffold taken before any model code, and the means to put it back."""

    def __init__(self) -> None:
        self._modules: dict[str, types.ModuleType] = {}
        # Tables checked before every cell: (a live dict, the entries to keep, their values).
        # A check compares identities only, in C (`operator.is_`: model objects never get to
        # answer an `==`; not `id()`, which raises an audit event per call).
        self._tables: list[tuple[dict, dict, tuple]] = []
        self._classes: list[tuple[type, dict, tuple]] = []
        self._functions: list[types.FunctionType] = []  # their code and defaults: see the audit hook
        self._cells: list[types.CellType] = []
        self._cell_values: list[Any] = []
        self._seen: set[int] = set()  # ids of the classes and functions recorded
        self._import_hooks = (list(sys.meta_path), list(sys.path_hooks))
        self._gc_callbacks = list(gc.callbacks)
        self._sigint = signal.getsignal(signal.SIGINT)
        self._recursion_limit = sys.getrecursionlimit()

    @classmethod
    def capture(cls, *, functions: Iterable[Any] = (), tables: Iterable[dict] = ()) -> Guard:
        """Record the scaffold as it is now and install the audit hook.

        `functions`: callables outside the trusted modules' globals (closures made at start-up);
        `tables`: dicts whose entries must stay as they are now (an object's `__dict__`, say:
        pass a dict holding only the attributes to keep, then `keep_attributes`).
        """
        guard = cls()
        modules = {name: sys.modules[name] for name in TRUSTED_MODULES if name in sys.modules}
        for name, module in modules.items():
            if name in _DEEP_MODULES:
                guard._record_module(name, module)
        for function in functions:
            guard._record_function(function)
        # Of the other modules and the builtins, only the names our recorded code uses: a check
        # of every global of `os` before each cell would cost more than the cell.
        used = guard._names_used()
        for name, module in modules.items():
            if name not in _DEEP_MODULES:
                guard._record_module(name, module, only=used)
        live = vars(builtins)
        guard._add_table(live, {key: value for key, value in live.items() if key in used or key == "__import__"})
        for table in tables:
            guard._add_table(table, dict(table))
        sys.addaudithook(_audit_hook(frozenset(id(function) for function in guard._functions)))
        return guard

    def keep_attributes(self, target: Any, names: Iterable[str]) -> None:
        """Also keep these instance attributes of `target` (a dict attribute: its entries too)."""
        live = vars(target)
        self._add_table(live, {name: live[name] for name in names})
        for name in names:
            if type(live[name]) is dict:
                self._add_table(live[name], dict(live[name]))

    def restore(self) -> None:
        """Put back everything recorded that model code changed; clear trace and profile hooks."""
        sys.settrace(None)
        sys.setprofile(None)
        threading.settrace(None)
        threading.setprofile(None)
        for name, module in self._modules.items():
            if sys.modules.get(name) is not module:
                sys.modules[name] = module
        for live, kept, values in self._tables:
            if not all(map(is_, map(live.get, kept), values)):
                _put_back(live, kept)
        for klass, kept, values in self._classes:
            if len(vars(klass)) != len(kept) or not all(map(is_, map(vars(klass).get, kept), values)):
                _restore_class(klass, kept)
        if not all(map(is_, map(_cell_value, self._cells), self._cell_values)):
            for cell, value in zip(self._cells, self._cell_values):
                if _cell_value(cell) is not value:
                    cell.cell_contents = value
        if sys.meta_path != self._import_hooks[0] or sys.path_hooks != self._import_hooks[1]:
            sys.meta_path[:], sys.path_hooks[:] = self._import_hooks
        if gc.callbacks:
            gc.callbacks[:] = self._gc_callbacks
        if signal.getsignal(signal.SIGINT) is not self._sigint:
            signal.signal(signal.SIGINT, self._sigint)
        if sys.getrecursionlimit() < self._recursion_limit:
            sys.setrecursionlimit(self._recursion_limit)

    # -- recording ------------------------------------------------------------------------------

    def _add_table(self, live: dict, kept: dict) -> None:
        self._tables.append((live, kept, tuple(kept.values())))

    def _record_module(self, name: str, module: types.ModuleType, *, only: set[str] | None = None) -> None:
        self._modules[name] = module
        live = vars(module)
        if only is not None:
            self._add_table(live, {key: value for key, value in live.items() if key in only and _is_code(value)})
            return
        own = name in _OWN_MODULES
        self._add_table(live, {key: value for key, value in live.items() if own or _is_code(value)})
        for value in live.values():
            if isinstance(value, type) and value.__module__ == name:
                self._record_class(value)
            elif isinstance(value, types.FunctionType):
                self._record_function(value)

    def _names_used(self) -> set[str]:
        """Every global and attribute name the recorded functions' code (nested code too) mentions."""
        names: set[str] = set()
        pending = [function.__code__ for function in self._functions]
        while pending:
            code = pending.pop()
            names.update(code.co_names)
            pending.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
        return names

    def _record_class(self, klass: type) -> None:
        if id(klass) in self._seen:
            return
        self._seen.add(id(klass))
        attributes = dict(vars(klass))
        self._classes.append((klass, attributes, tuple(attributes.values())))
        for value in attributes.values():
            for function in _functions_in(value):
                self._record_function(function)

    def _record_function(self, function: Any) -> None:
        function = getattr(function, "__func__", function)  # a bound method: its function
        if not isinstance(function, types.FunctionType) or id(function) in self._seen:
            return
        self._seen.add(id(function))
        self._functions.append(function)
        for cell in function.__closure__ or ():
            value = _cell_value(cell)
            if value is _UNSET:
                continue  # assigned later by the scaffold itself
            self._cells.append(cell)
            self._cell_values.append(value)
            if isinstance(value, types.FunctionType):  # closures made inside the scaffold
                self._record_function(value)


_UNSET = object()


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not yet assigned
        return _UNSET


def _functions_in(value: Any) -> list[Any]:
    if isinstance(value, (staticmethod, classmethod)):
        return [value.__func__]
    if isinstance(value, property):
        return [part for part in (value.fget, value.fset, value.fdel) if part is not None]
    return [value] if isinstance(value, types.FunctionType) else []


# -- restoring ------------------------------------------------------------------------------


def _put_back(live: dict, kept: dict) -> None:
    for key, value in kept.items():
        if live.get(key, _UNSET) is not value:
            live[key] = value


def _restore_class(klass: type, kept: dict) -> None:
    current = vars(klass)
    for key in [key for key in current if key not in kept]:
        type.__delattr__(klass, key)  # an added method could override an inherited one
    for key, value in kept.items():
        if key not in ("__dict__", "__weakref__") and current.get(key, _UNSET) is not value:
            type.__setattr__(klass, key, value)


def _audit_hook(protected: frozenset[int]) -> Any:
    def hook(event: str, args: tuple) -> None:
        if event == "sys.addaudithook":
            raise RuntimeError("adding audit hooks is not allowed in the REPL")
        if event == "object.__setattr__" and id(args[0]) in protected and args[1] in _FUNCTION_FIELDS:
            raise RuntimeError(f"the REPL's own functions cannot be changed ({args[1]})")

    return hook
