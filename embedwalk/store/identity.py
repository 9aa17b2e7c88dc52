"""The identity of a Python function by what it computes, for a store's configuration.

A function's name says nothing about its body: two lambdas in one module share a qualname, and
a function redefined in a notebook keeps its name. ``function_identity`` hashes what decides
the result instead: the code object (bytecode, constants, names, recursively for nested
code), default arguments, closure cell values and the module-level globals the code reads,
following nested functions and ``functools.partial``. A value whose identity cannot be
established (an arbitrary object, a bound method's instance, a callable class) raises
:class:`Unidentifiable`; the caller then asks the user to name the function. Bytecode depends
on the Python version, so a store written under another Python counts as another
configuration.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
import types
from typing import Any

import numpy as np
import torch

__all__ = ["function_identity", "Unidentifiable"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes)


class Unidentifiable(Exception):
    """Raised with a description of the part of a function that has no stable identity."""


def function_identity(fn) -> str:
    """SHA-256 (hex) of what ``fn`` computes; raises :class:`Unidentifiable`."""
    h = hashlib.sha256()
    _feed(h, fn, set(), "the function")
    return h.hexdigest()


def _feed(h, x: Any, active: set, where: str) -> None:
    # ``active`` holds the functions being hashed, so recursion (a function naming itself) ends.
    if isinstance(x, _PLAIN):
        h.update(f"{type(x).__name__}:{x!r};".encode())
    elif isinstance(x, (tuple, list, frozenset, set)):
        items = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
        h.update(f"{type(x).__name__}[{len(items)}](".encode())
        for i, v in enumerate(items):
            _feed(h, v, active, f"{where}[{i}]")
        h.update(b")")
    elif isinstance(x, dict):
        h.update(f"dict[{len(x)}](".encode())
        for k in sorted(x, key=repr):
            _feed(h, k, active, where)
            _feed(h, x[k], active, f"{where}[{k!r}]")
        h.update(b")")
    elif isinstance(x, types.CodeType):
        h.update(b"code(")
        h.update(x.co_code)
        for part in (x.co_names, x.co_varnames, x.co_freevars, x.co_cellvars):
            h.update(repr(part).encode())
        _feed(h, x.co_consts, active, f"{where} constants")
        h.update(b")")
    elif isinstance(x, (types.FunctionType, type)) and _is_library(x):
        # Installed libraries and the standard library are named with their version, not
        # hashed: their code is not the user's rule and hashing it would walk whole packages.
        top = (x.__module__ or "").split(".")[0]
        version = getattr(sys.modules.get(top), "__version__", "")
        h.update(f"library:{x.__module__}.{x.__qualname__}@{version};".encode())
    elif isinstance(x, types.FunctionType):
        if id(x) in active:
            h.update(f"recursive:{x.__qualname__};".encode())
            return
        active.add(id(x))
        name = f"{x.__module__}.{x.__qualname__}"
        h.update(f"function:{name}(".encode())
        _feed(h, x.__code__, active, name)
        _feed(h, x.__defaults__, active, f"the defaults of {name}")
        _feed(h, x.__kwdefaults__, active, f"the keyword defaults of {name}")
        for var, cell in zip(x.__code__.co_freevars, x.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an unfilled cell
                value = None
            _feed(h, value, active, f"closure variable {var!r} of {name}")
        for gname in sorted(_global_names(x.__code__)):
            if gname in x.__globals__:
                _feed(h, x.__globals__[gname], active, f"global {gname!r} read by {name}")
        h.update(b")")
        active.discard(id(x))
    elif isinstance(x, functools.partial):
        h.update(b"partial(")
        _feed(h, x.func, active, f"{where} (partial)")
        _feed(h, x.args, active, f"{where} (partial args)")
        _feed(h, x.keywords, active, f"{where} (partial keywords)")
        h.update(b")")
    elif isinstance(x, types.ModuleType):
        # A module is named, not hashed: torch.arange is a library call, not user logic.
        h.update(f"module:{x.__name__};".encode())
    elif isinstance(x, (types.BuiltinFunctionType, types.BuiltinMethodType)) or (
        callable(x) and type(x).__module__.split(".")[0] in ("torch", "numpy", "builtins", "math", "operator")
        and not isinstance(x, (torch.Tensor, np.ndarray))
    ):
        h.update(f"builtin:{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', getattr(x, '__name__', repr(x)))};".encode())
    elif isinstance(x, type) and x.__module__.split(".")[0] in ("torch", "numpy", "builtins"):
        h.update(f"type:{x.__module__}.{x.__qualname__};".encode())
    elif isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)};".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    elif isinstance(x, np.ndarray):
        h.update(f"ndarray:{x.dtype}:{x.shape};".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, (torch.dtype, torch.device)):
        h.update(f"{type(x).__name__}:{x};".encode())
    else:
        raise Unidentifiable(f"{where} is a {type(x).__module__}.{type(x).__qualname__}, whose content embedwalk cannot hash")


def _is_library(x) -> bool:
    mod = sys.modules.get((getattr(x, "__module__", None) or "").split(".")[0])
    path = str(getattr(mod, "__file__", None) or "")
    if not path:
        return getattr(x, "__module__", "") == "builtins"
    stdlib = sysconfig.get_paths()["stdlib"]
    return "site-packages" in path or "dist-packages" in path or path.startswith(stdlib)


def _global_names(code: types.CodeType) -> set:
    # co_names also lists attribute names (x.shape); those not in the globals are skipped above.
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names
