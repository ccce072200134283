"""Deprecated names kept for one release: each warns when used, then works as before."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that `old` is deprecated in favour of `new` (`stacklevel` 3: the caller's caller)."""
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """The `__getattr__` of the module `old` that moved to `new`: each name of `new`'s
    `__all__` warns and comes from `new`."""

    def __getattr__(name: str) -> Any:
        module = importlib.import_module(new)
        if name not in module.__all__:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warn_renamed(f"{old}.{name}", f"{new}.{name}")
        return getattr(module, name)

    return __getattr__


def renamed_names(module: str, names: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """The `__getattr__` of `module` for names renamed in it: `old -> (new module, new name)`."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_module, new_name = names[name]
        warn_renamed(f"{module}.{name}", f"{new_module}.{new_name}")
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
