"""Elementwise functions as data: the one table every stage reads.

Each entry is a name, one SymPy definition in the symbol `X` and, optionally, a numerically
stable SymPy form (`kernel`). Everything else is derived from the entry:

    parser / check     the DSL accepts `name(x)`; constant arguments are evaluated by `scalar_fn`
                       (the stable form, else the definition, on Python floats)
    SymPy stage        `sympy(arg)` substitutes the definition (scalars) or wraps `Ew(name, M)`
    torch backend      `torch_fn` (a user's torch= callable, else the stable form / definition
                       evaluated on tensors)
    Triton kernels     `kernel_expr(arg)` (the stable form given, else the definition), printed as
                       Triton; its `sympy.diff` is the fused backward's local derivative
    FLOP counter       `flop_cost` per output entry

Evaluation walks the SymPy expression with one table per target (`_torch_lib`, `_math_lib`):
each SymPy function (exp, log, Sigmoid, Softplus, ...) has one tensor and one float form there,
so a built-in needs only its line in `_builtins()`.

Built-in entries are below; `attnc.ops.register_elementwise` adds entries at run time (after
checking that every backend can use them). Structural operations (matmul, transpose, softmax,
scale, norm, cos, dist, where/mask) are not in this table: each is one entry of
compiler/structural.py; arithmetic is the IR's (compiler/ir.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy as sp

from .errors import ConfigError
from .ir import Fn, fn_op
from .scalars import s_div, s_exp, s_log, s_pow, s_sqrt

X = sp.Symbol("x", real=True)


# ---- SymPy functions for numerically stable forms --------------------------------------------
# The Triton kernels print each of these as a helper of the same meaning (kernels/codegen.py);
# their derivatives are written so that the backward stays finite where the textbook definition
# overflows (d softplus = sigmoid, not e^x / (1 + e^x)).

class Sigmoid(sp.Function):
    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Softplus(sp.Function):
    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])


class LogSigmoid(sp.Function):
    def fdiff(self, argindex=1):
        return Sigmoid(-self.args[0])


class Step(sp.Function):
    """1 where x > 0 else 0 (the derivative of relu, zero at 0 like torch)."""

    def fdiff(self, argindex=1):
        return sp.Integer(0)


class Relu(sp.Function):
    def fdiff(self, argindex=1):
        return Step(self.args[0])


# ---- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Elementwise:
    """One elementwise function f(x). Only `name` and `expr` are required."""

    name: str
    expr: sp.Expr                          # the definition, a SymPy expression in X
    doc: str = ""
    kernel: sp.Expr | None = None          # stable form (SymPy in X): Triton kernels, floats,
                                           # tensors
    torch: Callable | None = None          # a user's own tensor -> tensor form (optional)
    domain: sp.Basic | None = None         # where f is defined, e.g. X > 0: a constant argument
                                           # outside it is a CheckError
    flops: int | None = None               # cost per entry; default: SymPy's operation count
    builtin: bool = False

    arity = 1

    @property
    def op(self) -> Fn:
        return fn_op(self.name)

    def sympy(self, arg):
        """The definition applied to a SymPy scalar."""
        return self.expr.xreplace({X: arg})

    def kernel_expr(self, arg):
        """The form the Triton kernels compute (and differentiate), applied to `arg`."""
        return self.stable.xreplace({X: arg})

    @property
    def derivative(self) -> sp.Expr:
        return sp.diff(self.stable, X)

    def in_domain(self, value: float) -> bool:
        """Whether f is defined at the number `value` (always, without a domain)."""
        if self.domain is None:
            return True
        return bool(self.domain.xreplace({X: sp.Float(value)}))

    @property
    def flop_cost(self) -> int:
        return self.flops if self.flops is not None else max(1, int(sp.count_ops(self.expr)))

    @property
    def stable(self) -> sp.Expr:
        """The form every backend computes: the stable form if given, else the definition."""
        return self.expr if self.kernel is None else self.kernel

    def torch_fn(self) -> Callable:
        if self.torch is not None:
            return self.torch
        expr = self.stable
        return lambda t: evaluate(expr, t, _TORCH)

    def scalar_fn(self) -> Callable:
        expr = self.stable
        return lambda v: evaluate_float(expr, v)


_TABLE: dict[str, Elementwise] = {}


def get(name: str) -> Elementwise:
    return _TABLE[name]


def lookup(name: str) -> Elementwise | None:
    return _TABLE.get(name)


def names() -> tuple[str, ...]:
    return tuple(_TABLE)


def entries() -> tuple[Elementwise, ...]:
    return tuple(_TABLE.values())


def add(entry: Elementwise) -> Elementwise:
    """Put an entry in the table (attnc.ops.register_elementwise checks it first)."""
    old = _TABLE.get(entry.name)
    if old is not None and old != entry:
        raise ConfigError(f"the elementwise function {entry.name!r} is already defined "
                          f"as {old.expr}", hint="pick another name")
    _TABLE[entry.name] = entry
    return entry


def remove(name: str) -> None:
    """Take a registered (not built-in) entry out of the table."""
    entry = _TABLE.get(name)
    if entry is None:
        raise ConfigError(f"no elementwise function {name!r} is registered")
    if entry.builtin:
        raise ConfigError(f"{name!r} is built in and cannot be removed")
    del _TABLE[name]


def user_digest(fn_names) -> str:
    """A short digest of the user-registered definitions among `fn_names` ("" when none), for
    cache keys of generated code that inlines them."""
    parts = [f"{e.name}={sp.srepr(e.expr)};{sp.srepr(e.kernel)}" for e in
             (_TABLE[x] for x in sorted(set(fn_names)) if x in _TABLE) if not e.builtin]
    if not parts:
        return ""
    import hashlib
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


# ---- evaluating a definition on floats or tensors (no code generation, no eval) --------------

def _torch_lib():
    import torch
    return {
        sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, sp.Abs: torch.abs,
        sp.sign: torch.sign, sp.erf: torch.erf, sp.sin: torch.sin, sp.cos: torch.cos,
        sp.atan: torch.atan, sp.sinh: torch.sinh, sp.cosh: torch.cosh,
        Sigmoid: torch.sigmoid, Relu: torch.relu,
        Softplus: torch.nn.functional.softplus, LogSigmoid: torch.nn.functional.logsigmoid,
        "pow": lambda a, b: a ** b, "div": lambda a, b: a / b, "sqrt": torch.sqrt,
        "max": torch.maximum, "min": torch.minimum,
        "const": lambda v, like: torch.as_tensor(v, dtype=like.dtype, device=like.device)
        if hasattr(like, "dtype") else v,
    }


def _math_lib():
    def softplus(a: float) -> float:
        return max(a, 0.0) + math.log1p(math.exp(-abs(a)))

    return {
        sp.exp: s_exp, sp.log: s_log, sp.tanh: math.tanh, sp.Abs: abs,
        sp.sign: lambda a: math.copysign(1.0, a) if a != 0 else 0.0, sp.erf: math.erf,
        sp.sin: math.sin, sp.cos: math.cos, sp.atan: math.atan, sp.sinh: math.sinh,
        sp.cosh: math.cosh, Sigmoid: lambda a: 1.0 / (1.0 + s_exp(-a)),
        Relu: lambda a: max(a, 0.0), Softplus: softplus, LogSigmoid: lambda a: -softplus(-a),
        "pow": s_pow, "div": s_div, "sqrt": s_sqrt, "max": max, "min": min, "const": lambda v, like: v,
    }


class _Lib:
    def __init__(self, make):
        self._make, self._lib = make, None

    def __call__(self):
        if self._lib is None:
            self._lib = self._make()
        return self._lib


_TORCH, _MATH = _Lib(_torch_lib), _Lib(_math_lib)
SUPPORTED_FUNCTIONS = ("exp", "log", "tanh", "Abs", "sign", "erf", "sin", "cos", "atan", "sinh",
                       "cosh", "Max", "Min", "sqrt / powers")


def evaluate(expr, value, lib):
    """expr (SymPy, in X) at X = value (a float or a tensor), with `lib`'s functions."""
    fns = lib()

    def go(e):
        if e == X:
            return value
        if e.is_number:
            return fns["const"](float(e), value)
        if e.is_Add:
            out = go(e.args[0])
            for a in e.args[1:]:
                out = out + go(a)
            return out
        if e.is_Mul:   # x * y^-1 is computed as x / y
            num = [a for a in e.args if not (a.is_Pow and a.exp == -1)]
            den = [a.base for a in e.args if a.is_Pow and a.exp == -1]
            out = go(num[0]) if num else fns["const"](1.0, value)
            for a in num[1:]:
                out = out * go(a)
            for a in den:
                out = fns["div"](out, go(a))
            return out
        if e.is_Pow:
            base, ex = go(e.base), e.exp
            if ex == sp.S.Half:
                return fns["sqrt"](base)
            return fns["pow"](base, float(ex) if ex.is_number else go(ex))
        if isinstance(e, (sp.Max, sp.Min)):
            f = fns["max" if isinstance(e, sp.Max) else "min"]
            args = [go(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = _broadcast_minmax(f, out, a)
            return out
        f = fns.get(type(e)) or fns.get(e.func)
        if f is None:
            raise ConfigError(f"cannot evaluate {type(e).__name__} in an elementwise definition",
                              hint="definitions may use " + ", ".join(SUPPORTED_FUNCTIONS)
                              + "; or pass torch= (a function of a tensor)")
        return f(*[go(a) for a in e.args])

    return go(expr)


def evaluate_float(expr, value: float) -> float:
    """expr (SymPy, in X) at X = value, with Python floats (constant folding, checks)."""
    return evaluate(expr, float(value), _MATH)


def _broadcast_minmax(f, a, b):
    if hasattr(a, "dtype") and not hasattr(b, "dtype"):
        return f(a, a.new_tensor(b).expand_as(a))
    if hasattr(b, "dtype") and not hasattr(a, "dtype"):
        return f(b.new_tensor(a).expand_as(b), b)
    return f(a, b)


# ---- built-ins -------------------------------------------------------------------------------

def _builtins():
    """The built-in elementwise functions: one line each (name, definition, doc, and where the
    textbook definition overflows, a stable SymPy form). Torch, float, Triton, derivative and
    FLOP forms all derive from it; a new built-in is one more line here."""
    def b(name, expr, doc, *, kernel=None, domain=None):
        add(Elementwise(name, expr, doc, kernel=kernel, domain=domain, flops=1, builtin=True))

    b("exp", sp.exp(X), "e^x")
    b("log", sp.log(X), "ln x", domain=X > 0)
    b("sqrt", sp.sqrt(X), "sqrt(x)", domain=X >= 0)
    b("abs", sp.Abs(X), "|x|")
    b("relu", sp.Max(X, 0), "max(x, 0)", kernel=Relu(X))
    b("sigmoid", 1 / (1 + sp.exp(-X)), "1 / (1 + e^-x)", kernel=Sigmoid(X))
    b("tanh", sp.tanh(X), "tanh x")
    b("softplus", sp.log(1 + sp.exp(X)), "log(1 + e^x)", kernel=Softplus(X))
    b("logsigmoid", -sp.log(1 + sp.exp(-X)), "log(sigmoid(x)) = -softplus(-x)", kernel=LogSigmoid(X))
    b("softsign", X / (1 + sp.Abs(X)), "x / (1 + |x|)")


_builtins()
BUILTIN_NAMES = names()

__all__ = ["X", "Elementwise", "get", "lookup", "names", "entries", "add", "evaluate", "evaluate_float",
           "user_digest", "BUILTIN_NAMES", "Sigmoid", "Softplus", "LogSigmoid", "Relu", "Step"]
