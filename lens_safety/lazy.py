"""Lazy package exports (PEP 562): a public name is imported from its module on first use.

``import lens_safety`` and ``lens-safety --help`` then load neither torch nor transformers; the
first use of ``lens_safety.load_model`` imports exactly the modules it needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in ``exports[name]``;
    a name that maps to the subpackage ``package.name`` itself is that module."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        module = importlib.import_module(exports[name])
        value = module if exports[name] == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
