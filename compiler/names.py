"""The formula language's function names, from the three places that define them: arithmetic in
the IR (compiler/ir.py `FUNCTIONS`), structural operations (compiler/structural.py `CALLS`) and
elementwise functions (compiler/elementwise.py, registered ones included).

It sits above those modules (they never import it), so that the IR imports neither table.
"""
from __future__ import annotations

from .elementwise import lookup, names
from .ir import FUNCTIONS, Fn, Op
from .structural import CALLS


def function(name: str) -> tuple["Op | Fn", int] | None:
    """(op, arity) of a DSL function name, or None when no such function exists."""
    if name in FUNCTIONS:
        return FUNCTIONS[name]
    if name in CALLS:
        spec, arity = CALLS[name]
        return spec.op, arity
    entry = lookup(name)
    return (entry.op, entry.arity) if entry is not None else None


def function_names() -> tuple[str, ...]:
    return tuple(FUNCTIONS) + tuple(CALLS) + names()


__all__ = ["function", "function_names"]
