"""Package attributes that load on first use (PEP 562), so that `attnc --help`, `attnc check` and
`import attnc` do not pay for torch, transformers or SymPy."""
from __future__ import annotations

import importlib


def lazy_getattr(namespace: dict, table: dict[str, str]):
    """A module `__getattr__` for the package whose globals are `namespace`: name -> the submodule
    (relative to the package) that defines it; a loaded name is cached in the package's globals."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{mod}", package), name)
        namespace[name] = value
        return value

    return __getattr__
