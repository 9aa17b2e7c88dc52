"""Lazy package exports: a name is imported from its module the first time it is used.

Why: ``embedwalk --help`` must not pay for torch, pandas and TransformerLens (several seconds),
and importing any ``embedwalk.<subpackage>.cli`` runs the package ``__init__`` files first.
``import embedwalk as ew; ew.logit_lens`` and ``from embedwalk import logit_lens`` behave as
with eager imports.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


class _LazyPackage(ModuleType):
    _lazy_where: dict

    def __getattr__(self, name: str):
        module = self._lazy_where.get(name)
        if module is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        ModuleType.__setattr__(self, name, value)  # later look-ups skip __getattr__
        return value

    def __setattr__(self, name: str, value) -> None:
        # Loading a submodule binds it on its package (`embedwalk.run` the module); where an
        # export has the submodule's name (`embedwalk.run` the function), the export wins, as
        # it did with eager `from .run import run`.
        if isinstance(value, ModuleType) and self._lazy_where.get(name) == value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)
        ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self._lazy_where))


def lazy_exports(package: str, exports: dict[str, list[str]]) -> list[str]:
    """Make ``package`` import each exported name from its module on first use; returns
    ``__all__``. ``exports`` maps a module's absolute name to the names it exports."""
    where = {name: module for module, names in exports.items() for name in names}
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    ModuleType.__setattr__(module, "_lazy_where", where)
    return list(where)
