"""attnc.ops: the elementwise functions formulas can use, and how to add one.

    import sympy as sp
    import attnc.ops

    x = sp.Symbol("x")
    attnc.ops.register_elementwise("sqr", x ** 2)
    attnc.compile("softmax(Q @ K^T / sqrt(d)) @ sqr(V)", backend="triton")

A registered function parses, checks, simplifies (it gets a canonical form and hash like any
other), runs on the torch backend and in the fused Triton kernels, forward and backward (the
kernels differentiate the definition with `sympy.diff`), and `attnc ops` lists it. The table
itself is compiler/elementwise.py; this module checks an entry before it goes in.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import sympy as sp

from attnc.compiler import elementwise as _table
from attnc.compiler.elementwise import X, Elementwise, entries, lookup, names
from attnc.compiler.errors import ConfigError

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def register_elementwise(name: str, expr, *, torch: Callable | None = None,
                         triton=None, domain=None, doc: str = "",
                         flops: int | None = None) -> Elementwise:
    """Make `name(x)` usable in formulas, with f(x) = `expr` (a SymPy expression in one symbol
    named x).

    torch:  optional numerically stable tensor -> tensor form (default: the definition, evaluated
            with torch functions).
    triton: optional numerically stable SymPy form in x for the Triton kernels (default: the
            definition); the kernels' backward differentiates it.
    domain: optional SymPy condition in x where f is defined (e.g. x > 0); a constant argument
            outside it is a CheckError.
    flops:  optional cost per entry (default: SymPy's operation count of the definition).
    Registering the same definition again is a no-op; a different one under a taken name is a
    ConfigError (`unregister_elementwise` frees a registered name).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"bad elementwise function name {name!r}",
                          hint="use lower-case letters, digits and _, starting with a letter")
    _check_free(name)
    definition = _in_x(expr, "expr")
    kernel = _in_x(triton, "triton") if triton is not None else None
    if torch is not None and not callable(torch):
        raise ConfigError(f"torch= for {name!r} must be a function of a tensor, got {torch!r}")
    if flops is not None and (isinstance(flops, bool) or not isinstance(flops, int) or flops < 0):
        raise ConfigError(f"flops= for {name!r} must be a non-negative int, got {flops!r}")
    where = _domain_in_x(domain) if domain is not None else None
    entry = Elementwise(name, definition, doc or str(definition), kernel=kernel, torch=torch,
                        domain=where, flops=flops)
    old = lookup(name)
    if old is not None:
        if old == entry:
            return old
        raise ConfigError(f"the elementwise function {name!r} is already defined as {old.expr}",
                          hint="pick another name" + (" (built-in functions cannot be replaced)"
                                                      if old.builtin else ""))
    _check_backends(entry)
    return _table.add(entry)


def _check_free(name: str) -> None:
    from attnc.compiler.ir import FUNCTIONS
    from attnc.compiler.structural import CALLS
    from attnc.grammar.parser import RESERVED_NAMES
    if name in FUNCTIONS or name in CALLS or name in RESERVED_NAMES or name in ("T",):
        raise ConfigError(f"{name!r} is a built-in name of the formula language",
                          hint="pick another name; `attnc ops` lists the taken ones")


def _in_x(expr, what: str) -> sp.Expr:
    """`expr` as a SymPy expression in the table's real symbol X."""
    if isinstance(expr, str):
        raise ConfigError(f"{what}= must be a SymPy expression, not text",
                          hint="build it with sympy: x = sympy.Symbol('x'); x ** 2")
    try:
        expr = sp.sympify(expr, strict=True)
    except (sp.SympifyError, TypeError) as e:
        raise ConfigError(f"{what}= is not a SymPy expression: {expr!r}",
                          hint="build it with sympy: x = sympy.Symbol('x'); x ** 2") from e
    if not isinstance(expr, sp.Expr):
        raise ConfigError(f"{what}= must be a SymPy expression with a value, got {expr!r}",
                          hint="e.g. x ** 2, not a relation or a boolean")
    free = expr.free_symbols
    others = [s for s in free if s.name != "x"]
    if others:
        raise ConfigError(f"{what}= may use only the symbol x, got {sorted(map(str, others))}",
                          hint="an elementwise function has one argument, named x")
    return expr.xreplace({s: X for s in free})


def _domain_in_x(domain) -> sp.Basic:
    """`domain` (a SymPy condition in x such as x > 0) in the table's symbol X."""
    if isinstance(domain, str) or not isinstance(domain, sp.logic.boolalg.Boolean) \
            or isinstance(domain, sp.logic.boolalg.BooleanAtom):
        raise ConfigError(f"domain= must be a SymPy condition in x, got {domain!r}",
                          hint="e.g. x > 0, or sympy.And(x > -1, x < 1)")
    others = [s for s in domain.free_symbols if s.name != "x"]
    if others or not domain.free_symbols:
        raise ConfigError(f"domain= may use only the symbol x, got {domain}",
                          hint="e.g. x > 0, or sympy.And(x > -1, x < 1)")
    return domain.xreplace({s: X for s in domain.free_symbols})


def _check_backends(entry: Elementwise) -> None:
    """Fail now, with a hint, rather than inside a generated kernel later."""
    probe = [-2.5, -0.5, 0.0, 0.75, 3.0]
    try:   # the definition's values: every other form must compute them
        values = [float(_table.evaluate_float(entry.expr, v)) for v in probe]
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot evaluate {entry.name}(x) = {entry.expr}: {e}") from e
    if not any(math.isfinite(v) for v in values):
        raise ConfigError(f"{entry.name}(x) = {entry.expr} is not finite at any of x = {probe}",
                          hint="check the definition")
    if entry.kernel is not None:
        stable = [float(_table.evaluate_float(entry.kernel, v)) for v in probe]
        _same_values(entry.name, "triton", stable, values, probe)
    try:
        import torch
        t = torch.tensor(probe, dtype=torch.float64)
        out = entry.torch_fn()(t)
    except ConfigError:
        raise
    except Exception as e:   # a user's torch= form failing is their input, reported as such
        raise ConfigError(f"the torch form of {entry.name!r} fails on a float64 tensor: {e}") from e
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(t.shape):
        raise ConfigError(f"the torch form of {entry.name!r} must map a tensor to one of the "
                          "same shape")
    _same_values(entry.name, "torch", [float(v) for v in out], values, probe)
    from attnc.kernels.lower import to_triton   # no triton import: a SymPy printer
    body = entry.kernel if entry.kernel is not None else entry.expr
    for e in (body, entry.derivative):
        try:
            to_triton(e, {})
        except NotImplementedError as err:
            raise ConfigError(f"the Triton kernels cannot compute {e} (for {entry.name!r})",
                              hint="write the definition with exp, log, tanh, sqrt, abs, "
                                   "powers, max/min, or pass triton= (a SymPy form using those)"
                              ) from err


def unregister_elementwise(name: str) -> None:
    """Remove a registered function (built-ins stay). Formulas analysed or compiled with it are
    dropped from the in-process caches, so using the name again is a ParseError."""
    _table.remove(name)
    from attnc.compiler.api import clear_memos
    clear_memos()


def _same_values(name: str, form: str, got: list, want: list, probe: list) -> None:
    """A stable form must compute the definition (NaN where the definition is undefined)."""
    for x, a, b in zip(probe, got, want):
        same = (math.isnan(a) and math.isnan(b)) or a == b or \
            abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
        if not same:
            raise ConfigError(f"the {form}= form of {name!r} gives {a:.6g} at x = {x}, the "
                              f"definition {b:.6g}", hint=f"{form}= must compute the same function")


def import_ops_modules(modules) -> None:
    """Import each named module (a user's module that calls register_elementwise), the way the
    CLI's `--ops MODULE` makes registered functions visible to a command. Only importable module
    names are accepted (no file paths, no code)."""
    import importlib
    for module in modules:
        if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
            raise ConfigError(f"--ops needs a module name, got {module!r}",
                              hint="a dotted module name on PYTHONPATH (my_ops, pkg.my_ops), "
                                   "not a file path")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"cannot import --ops module {module!r}: {e}",
                              hint="give an importable module name (on PYTHONPATH), not a file "
                                   "path") from e


def elementwise_names(builtin: bool | None = None) -> tuple[str, ...]:
    """Names in the table: all, only built-ins (True) or only registered ones (False)."""
    return tuple(e.name for e in entries() if builtin is None or e.builtin == builtin)


__all__ = ["register_elementwise", "unregister_elementwise", "elementwise_names", "import_ops_modules", "Elementwise", "lookup",
           "names", "X"]
