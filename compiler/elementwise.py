"""Elementwise functions as data: the one table every stage reads.

Each entry is a name, one SymPy definition in the symbol `X` and, optionally, numerically
stable forms. Everything else is derived from the entry:

    parser / check     the DSL accepts `name(x)`; constant arguments are evaluated by `scalar_fn`
    SymPy stage        `sympy(arg)` substitutes the definition (scalars) or wraps `Ew(name, M)`
    torch backend      `torch_fn` (the stable form given, else the definition evaluated on tensors)
    Triton kernels     `kernel_expr(arg)` (the stable form given, else the definition), printed as
                       Triton; its `sympy.diff` is the fused backward's local derivative
    FLOP counter       `flop_cost` per output entry

Built-in entries are below; `attnc.ops.register_elementwise` adds entries at run time (after
checking that every backend can use them). Structural operations (matmul, transpose, softmax,
scale, norm, cos, dist, where/mask, arithmetic) are not in this table: see compiler/ir.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy as sp

from .errors import ConfigError
from .ir import Fn, fn_op

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
    kernel: sp.Expr | None = None          # stable form for the Triton kernels (SymPy in X)
    torch: Callable | str | None = None    # stable form for tensors: tensor -> tensor (a str
                                           # names a function of compiler/torch_ops.py or torch)
    scalar: Callable | None = None         # stable form for Python floats (constant folding)
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
        return (self.expr if self.kernel is None else self.kernel).xreplace({X: arg})

    @property
    def derivative(self) -> sp.Expr:
        return sp.diff(self.expr if self.kernel is None else self.kernel, X)

    def in_domain(self, value: float) -> bool:
        """Whether f is defined at the number `value` (always, without a domain)."""
        if self.domain is None:
            return True
        return bool(self.domain.xreplace({X: sp.Float(value)}))

    @property
    def flop_cost(self) -> int:
        return self.flops if self.flops is not None else max(1, int(sp.count_ops(self.expr)))

    def torch_fn(self) -> Callable:
        if isinstance(self.torch, str):
            import torch

            from . import torch_ops
            return getattr(torch_ops, self.torch, None) or getattr(torch, self.torch)
        if self.torch is not None:
            return self.torch
        expr = self.expr
        return lambda t: evaluate(expr, t, _TORCH)

    def scalar_fn(self) -> Callable:
        if self.scalar is not None:
            return self.scalar
        expr = self.expr
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

def _math_pow(a: float, b: float) -> float:
    try:
        if a < 0 and not float(b).is_integer():
            return math.nan
        return float(a ** b)
    except OverflowError:
        return math.inf
    except ZeroDivisionError:
        return math.inf


def _math_log(a: float) -> float:
    return math.log(a) if a > 0 else (-math.inf if a == 0 else math.nan)


def _math_exp(a: float) -> float:
    try:
        return math.exp(a)
    except OverflowError:
        return math.inf


def _torch_lib():
    import torch
    return {
        sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, sp.Abs: torch.abs,
        sp.sign: torch.sign, sp.erf: torch.erf, sp.sin: torch.sin, sp.cos: torch.cos,
        sp.atan: torch.atan, sp.sinh: torch.sinh, sp.cosh: torch.cosh,
        Sigmoid: torch.sigmoid, Relu: torch.relu,
        Softplus: torch.nn.functional.softplus, LogSigmoid: torch.nn.functional.logsigmoid,
        "pow": lambda a, b: a ** b,
        "max": torch.maximum, "min": torch.minimum,
        "const": lambda v, like: torch.as_tensor(v, dtype=like.dtype, device=like.device)
        if hasattr(like, "dtype") else v,
    }


def _math_lib():
    return {
        sp.exp: _math_exp, sp.log: _math_log, sp.tanh: math.tanh, sp.Abs: abs,
        sp.sign: lambda a: math.copysign(1.0, a) if a != 0 else 0.0, sp.erf: math.erf,
        sp.sin: math.sin, sp.cos: math.cos, sp.atan: math.atan, sp.sinh: math.sinh,
        sp.cosh: math.cosh, Sigmoid: lambda a: 1.0 / (1.0 + _math_exp(-a)),
        Relu: lambda a: max(a, 0.0),
        Softplus: lambda a: max(a, 0.0) + math.log1p(math.exp(-abs(a))),
        LogSigmoid: lambda a: min(a, 0.0) - math.log1p(math.exp(-abs(a))),
        "pow": _math_pow, "max": max, "min": min, "const": lambda v, like: v,
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
        if e.is_Mul:
            out = go(e.args[0])
            for a in e.args[1:]:
                out = out * go(a)
            return out
        if e.is_Pow:
            base, ex = go(e.base), e.exp
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
    # torch forms are named attributes of compiler/torch_ops.py (resolved on first use, so
    # that the compiler itself does not import torch)
    def b(name, expr, doc, torch, scalar, *, kernel=None, domain=None):
        add(Elementwise(name, expr, doc, kernel=kernel, torch=torch, scalar=scalar, domain=domain,
                        flops=1, builtin=True))

    def softplus(a: float) -> float:
        return max(a, 0.0) + math.log1p(math.exp(-abs(a)))

    b("exp", sp.exp(X), "e^x", "exp", _math_exp)
    b("log", sp.log(X), "ln x", "log", _math_log, domain=X > 0)
    b("sqrt", sp.sqrt(X), "sqrt(x)", "sqrt", lambda a: math.sqrt(a) if a >= 0 else math.nan,
      domain=X >= 0)
    b("abs", sp.Abs(X), "|x|", "abs", abs)
    b("relu", sp.Max(X, 0), "max(x, 0)", "relu", lambda a: max(a, 0.0), kernel=Relu(X))
    b("sigmoid", 1 / (1 + sp.exp(-X)), "1 / (1 + e^-x)", "sigmoid",
      lambda a: 1.0 / (1.0 + _math_exp(-a)), kernel=Sigmoid(X))
    b("tanh", sp.tanh(X), "tanh x", "tanh", math.tanh)
    b("softplus", sp.log(1 + sp.exp(X)), "log(1 + e^x)", "softplus", softplus, kernel=Softplus(X))
    b("logsigmoid", -sp.log(1 + sp.exp(-X)), "log(sigmoid(x)) = -softplus(-x)", "logsigmoid",
      lambda a: -softplus(-a), kernel=LogSigmoid(X))
    b("softsign", X / (1 + sp.Abs(X)), "x / (1 + |x|)", "softsign", lambda a: a / (1 + abs(a)))


_builtins()
BUILTIN_NAMES = names()

__all__ = ["X", "Elementwise", "get", "lookup", "names", "entries", "add", "evaluate", "evaluate_float",
           "user_digest", "BUILTIN_NAMES", "Sigmoid", "Softplus", "LogSigmoid", "Relu", "Step"]
