"""Malformed and mutated formulas, each judged by its own expectation, none chosen by the compiler.

2000 mutations of a few seed formulas are all kept. Each mutation kind declares what it makes:

    MUST_REJECT  the result is not a formula (an unknown name, a listed bad formula): the
                 compiler must raise the declared error class, at a position in the text
    MAY_BE_VALID dropping / inserting a character, truncating, breaking a shape: the result may
                 still be a good formula. An oracle written here (a small recursive-descent
                 parser of the documented grammar and an interpreter in plain numpy, run at two
                 sizes with n != d) decides. A syntax error by the oracle must be a ParseError;
                 another rejection any positioned ParseError / ShapeError / CheckError; a valid
                 formula must compile, run on the torch backend, and equal the oracle's numpy
                 value where that is finite.

The oracle knows the language from its documentation (README "The language", grammar/
attention.lark), not from the compiler's code: inputs Q K V P (n x d), sizes n d, positions
i (n x 1) and j (1 x n), constants inf pi e; output n x d; 2-4 distinct inputs, counted after
terms that cancel (tested here by perturbing each input); inf only as a where()/mask() fill;
scalar sub-expressions finite; no division by a constant 0.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import attnc

SEEDS = [
    "softmax(Q @ K^T / sqrt(d)) @ V",
    "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
    "let s = Q @ K^T\nsoftmax(mask(s - 0.5 * abs(i - j), j <= i)) @ V",
    "softsign(cos(Q, K)) @ V + dist(Q, P) @ V",
]
JUNK = list("()@^*/+-,;{}=<>!&|$.?`'\"") + ["^T", "@@", "let", "formula", "inf", "q", "T", "x"]
UNKNOWN_NAMES = ["q", "X", "k", "softmx", "sqr", "Exp", "logg", "foo"]

# Listed bad formulas, each with the error class the language's rules give it.
LISTED = [
    ("softmax(Q, K) @ V", attnc.ParseError),                 # arity
    ("cos(Q) @ V", attnc.ParseError),
    ("mask(Q @ K^T) @ V", attnc.ParseError),
    ("norm(Q, K)", attnc.ParseError),
    ("scale() @ V", attnc.ParseError),
    ("where(Q @ K^T, Q, K)", attnc.ShapeError),              # a number as a condition
    ("(j <= i) @ V + Q", attnc.ShapeError),                  # a condition as a number
    ("softmax(Q @ K^T & 1) @ V", attnc.ShapeError),
    ("softmax(j < i) @ V", attnc.ShapeError),
    ("dist(Q, K^T) @ V", attnc.ShapeError),                  # rows of different lengths
    ("Q + K + V + P + Q @ Q", attnc.ShapeError),             # (n, d) @ (n, d)
    ("3", attnc.ShapeError),                                 # output not (n, d)
    ("n * d", attnc.ShapeError),
    ("softmax(Q @ K^T) @ (V - V) + 0 * Q", attnc.CheckError),  # cancels to no input
    ("V", attnc.CheckError),                                 # one input
    ("softmax(Q @ Q^T) @ Q", attnc.CheckError),
    ("1e999 * Q + K", attnc.CheckError),                     # overflowing literal
    ("softmax(Q @ K^T + inf) @ V", attnc.CheckError),        # inf outside a fill
    ("softmax(Q @ K^T / 0) @ V", attnc.CheckError),          # division by zero
    ("softmax(Q @ K^T * log(0)) @ V", attnc.CheckError),     # log outside its domain
    ("", attnc.ParseError),                                  # empty
    ("   ", attnc.ParseError),
    ("# only a comment", attnc.ParseError),
    ("let s = Q @ K^T", attnc.ParseError),                   # no value
    ("let Q = K\nQ @ K^T @ V", attnc.ParseError),            # rebinding an input
    ("let a = Q\nlet a = K\na + V", attnc.ParseError),       # rebinding a let
    ("formula a = Q + K\nformula a = Q + V", attnc.ParseError),
    ("Q + K\nformula b = Q + V", attnc.ParseError),
]


@dataclass
class Case:
    text: str
    kind: str
    must_reject: type | None = None     # MUST_REJECT: the declared error class
    name: str | None = None             # for unknown names: the name the error must point at


def _mutation(seed: int) -> Case:
    rng = random.Random(seed)
    base = rng.choice(SEEDS)
    kind = rng.randrange(7)
    pos = rng.randrange(len(base) + 1)
    if kind == 0:
        return Case(base[:pos] + base[pos + 1:], "drop a character")
    if kind == 1:
        return Case(base[:pos] + rng.choice(JUNK) + base[pos:], "insert junk")
    if kind == 2:
        return Case(base[:pos], "truncate")
    if kind == 3:        # an unknown name or wrong case: always a ParseError at that name
        old = rng.choice(["Q", "K", "V", "softmax", "sqrt", "exp", "log", "abs"])
        new = rng.choice(UNKNOWN_NAMES)
        text = base.replace(old, new, 1) if old in base else base + " " + new
        return Case(text, "unknown name", attnc.ParseError, new)
    if kind == 4:
        return Case(rng.choice([base.replace("^T", "", 1), base.replace("@", "+", 1),
                                f"({base})^T", f"{base} @ V", f"softmax({base.split(' @ ')[0]})",
                                base.replace(" @ V", "", 1)]), "break a shape")
    text, cls = LISTED[rng.randrange(len(LISTED))]
    return Case(text, "listed", cls)


CASES = [_mutation(s) for s in range(2000)]


# ---- the oracle: the documented grammar and semantics, in numpy --------------------------------

class Syntax(Exception):
    """Not in the grammar: the compiler must say ParseError."""


class Invalid(Exception):
    """In the grammar but not a legal formula (names, shapes, inputs, constants)."""


_TOKEN = re.compile(r"""
    (?P<skip>[ \t\f\r]+ | \\\r?\n | \#[^\n]*)
  | (?P<NL>\n)
  | (?P<NUMBER>(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)
  | (?P<NAME>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<TRANSPOSE>\^T|\u1d40)
  | (?P<CMP><=|>=|==|!=|<|>)
  | (?P<OP>[()@*/+\-^,;{}=!&|])
""", re.VERBOSE)


def tokenize(text: str) -> list[tuple[str, str]]:
    out, depth, pos = [], 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise Syntax(f"character {text[pos]!r}")
        pos = m.end()
        kind, value = m.lastgroup, m.group()
        if kind == "skip":
            continue
        if kind == "NL":
            if depth:          # newlines inside parentheses are spaces
                continue
            kind, value = "OP", ";"
        if value == "(":
            depth += 1
        elif value == ")":
            depth = max(depth - 1, 0)
        out.append((kind if kind != "OP" else value, value))
    out.append(("EOF", ""))
    return out


class Parser:
    """Recursive descent over the grammar of grammar/attention.lark; builds tuples."""

    def __init__(self, text: str):
        self.toks, self.k = tokenize(text), 0

    def peek(self, ahead=0):
        return self.toks[self.k + ahead][0]

    def take(self, kind=None):
        tok = self.toks[self.k]
        if kind is not None and tok[0] != kind:
            raise Syntax(f"expected {kind}, got {tok}")
        self.k += 1
        return tok[1]

    def program(self):
        stmts = self.stmts(end="EOF")
        self.take("EOF")
        return stmts

    def stmts(self, end):
        out = []
        while self.peek() == ";":
            self.take()
        while self.peek() != end:
            out.append(self.stmt())
            if self.peek() == end:
                break
            self.take(";")
            while self.peek() == ";":
                self.take()
        return out

    def stmt(self):
        word = self.toks[self.k][1] if self.peek() == "NAME" else None
        if word == "let":           # keywords only where a statement starts
            self.take()
            name = self.take("NAME")
            self.take("=")
            return ("let", name, self.expr())
        if word == "formula":
            self.take()
            name = self.take("NAME")
            if self.peek() == "=":
                self.take()
                return ("formula", name, [self.expr()])
            self.take("{")
            body = self.stmts(end="}")
            self.take("}")
            return ("formula", name, body)
        return self.expr()

    def expr(self):
        return self.or_()

    def _left(self, sub, ops):
        a = sub()
        while self.peek() in ops:
            op = self.take()
            a = ("bin", op, a, sub())
        return a

    def or_(self):
        return self._left(self.and_, ("|",))

    def and_(self):
        return self._left(self.not_, ("&",))

    def not_(self):
        if self.peek() == "!":
            self.take()
            return ("not", self.not_())
        return self.compare()

    def compare(self):
        a = self.sum()
        if self.peek() == "CMP":
            op = self.take()
            return ("bin", op, a, self.sum())
        return a

    def sum(self):
        return self._left(self.product, ("+", "-"))

    def product(self):
        return self._left(self.unary, ("@", "*", "/"))

    def unary(self):
        if self.peek() == "-":
            self.take()
            return ("neg", self.unary())
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        a = self.postfix()
        if self.peek() == "^":
            self.take()
            return ("pow", a, self.unary())
        return a

    def postfix(self):
        a = self.atom()
        while self.peek() == "TRANSPOSE":
            self.take()
            a = ("T", a)
        return a

    def atom(self):
        kind = self.peek()
        if kind == "NUMBER":
            return ("num", self.take())
        if kind == "NAME":
            name = self.take()
            if self.peek() != "(":
                return ("name", name)
            self.take("(")
            args = []
            if self.peek() != ")":
                args.append(self.expr())
                while self.peek() == ",":
                    self.take()
                    args.append(self.expr())
            self.take(")")
            return ("call", name, args)
        if kind == "(":
            self.take()
            a = self.expr()
            self.take(")")
            return a
        raise Syntax(f"unexpected {self.toks[self.k]}")


def _softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    return e / np.where(s > 0, s, 1.0)


def _norm(x):
    return np.sqrt((x * x).sum(axis=-1, keepdims=True))


def _cos(a, b):
    return (a / np.maximum(_norm(a), 1e-8)) @ (b / np.maximum(_norm(b), 1e-8)).T


def _dist(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


ELEMENTWISE = {
    "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "abs": np.abs, "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0), "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "softplus": lambda x: np.logaddexp(0.0, x), "logsigmoid": lambda x: -np.logaddexp(0.0, -x),
    "softsign": lambda x: x / (1 + np.abs(x)),
}
MATRIX_FNS = {"softmax": _softmax, "norm": _norm, "scale": lambda x: x / math.sqrt(x.shape[-1]),
              "transpose": lambda x: x.T}
PAIR_FNS = {"cos": _cos, "dist": _dist}
ARITHMETIC = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "^": np.power,
              "max": np.maximum, "min": np.minimum}
COMPARE = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
           "==": np.equal, "!=": np.not_equal}
ARITY = {**dict.fromkeys(ELEMENTWISE, 1), **dict.fromkeys(MATRIX_FNS, 1), "neg": 1,
         **dict.fromkeys(PAIR_FNS, 2), "max": 2, "min": 2, "pow": 2, "add": 2, "matmul": 2,
         "mask": 2, "where": 3}
RESERVED = {"Q", "K", "V", "P", "n", "d", "i", "j", "inf", "pi", "e", *ARITY}


@dataclass(frozen=True)
class Val:
    x: np.ndarray                        # float64 (bool for conditions); 0-d for scalars
    deps: frozenset = frozenset()        # the inputs it reads
    bad: frozenset = frozenset()         # rule broken on the way (counts if the output uses it)
    inf_literal: bool = False            # a written inf / -inf (allowed only as a fill)
    cond: bool = field(default=False)


class Interp:
    def __init__(self, n: int, d: int, inputs: dict):
        self.n, self.d, self.inputs = n, d, inputs

    def run(self, stmts):
        defs = [s for s in stmts if isinstance(s, tuple) and s[0] == "formula"]
        if not defs:
            return self.formula(stmts)
        shared, bodies, seen = [], [], set()
        for s in stmts:
            if s[0] == "let":
                shared.append(s)
            elif s[0] == "formula":
                if s[1] in seen:
                    raise Invalid(f"formula {s[1]} twice")
                seen.add(s[1])
                bodies.append(shared + list(s[2]))
            else:
                raise Invalid("a bare expression among named formulas")
        if len(bodies) != 1:
            raise Invalid("analyze takes one formula")
        return self.formula(bodies[0])

    def formula(self, stmts):
        env, result = {}, None
        if not stmts:
            raise Invalid("empty formula")
        for k, s in enumerate(stmts):
            last = k == len(stmts) - 1
            if s[0] == "formula":
                raise Invalid("nested formula")
            if s[0] == "let":
                if s[1] in RESERVED or s[1] in env:
                    raise Invalid(f"let {s[1]} rebinds a name")
                env[s[1]] = self.ev(s[2], env)
                if last:
                    raise Invalid("ends with a let")
            elif not last:
                raise Invalid("a bare expression before the last statement")
            else:
                result = self.ev(s, env)
        return result

    def ev(self, t, env) -> Val:
        kind = t[0]
        if kind == "num":
            v = float(t[1])
            if not math.isfinite(v):
                raise Invalid("literal overflows")
            return Val(np.array(v))
        if kind == "name":
            return self.name(t[1], env)
        if kind == "neg":   # of a written number or inf: a negative constant, not arithmetic
            a = t[1]
            if a[0] == "num":
                return Val(-self.ev(a, env).x)
            if a == ("name", "inf"):
                return Val(np.array(-math.inf), inf_literal=True)
            return self.arith("-", [Val(np.array(0.0)), self.ev(t[1], env)], neg=True)
        if kind == "pow" and t[2] == ("name", "T"):   # x ^ T is x^T
            return self.matrix_fn("transpose", self.ev(t[1], env))
        if kind == "pow":
            return self.arith("^", [self.ev(t[1], env), self.ev(t[2], env)])
        if kind == "T":
            return self.matrix_fn("transpose", self.ev(t[1], env))
        if kind == "not":
            return self.logic("!", [self.ev(t[1], env)])
        if kind == "bin":
            op, a, b = t[1], self.ev(t[2], env), self.ev(t[3], env)
            if op == "@":
                return self.matmul(a, b)
            if op in ("&", "|"):
                return self.logic(op, [a, b])
            if op in COMPARE:
                return self.compare(op, a, b)
            return self.arith(op, [a, b])
        if kind == "call":
            return self.call(t[1], t[2], env)
        raise AssertionError(t)

    def name(self, name, env) -> Val:
        if name in env:
            return env[name]
        n, d = self.n, self.d
        if name in self.inputs:
            return Val(self.inputs[name], deps=frozenset({name}))
        consts = {"n": float(n), "d": float(d), "pi": math.pi, "e": math.e}
        if name in consts:
            return Val(np.array(consts[name]))
        if name == "inf":
            return Val(np.array(math.inf), inf_literal=True)
        if name in ("i", "j"):
            r = np.arange(n, dtype=float)
            return Val(r.reshape(n, 1) if name == "i" else r.reshape(1, n))
        raise Invalid(f"unknown name {name}")   # function names and T included

    def call(self, fname, args, env) -> Val:
        if fname not in ARITY:
            raise Invalid(f"unknown function {fname}")
        if len(args) != ARITY[fname]:
            raise Invalid(f"{fname} arity")
        vals = [self.ev(a, env) for a in args]
        if fname in ELEMENTWISE:
            return self.arith(fname, vals)
        if fname in MATRIX_FNS:
            return self.matrix_fn(fname, vals[0])
        if fname in PAIR_FNS:
            return self.pairwise(fname, *vals)
        if fname == "neg":
            return self.arith("-", [Val(np.array(0.0)), vals[0]], neg=True)
        if fname == "matmul":
            return self.matmul(*vals)
        if fname in ("pow", "add"):
            return self.arith({"pow": "^", "add": "+"}[fname], vals)
        if fname in ("max", "min"):
            return self.arith(fname, vals)
        if fname == "mask":
            x, c = vals
            return self.where(c, x, Val(np.array(-math.inf), inf_literal=True))
        return self.where(*vals)

    # -- rules ------------------------------------------------------------------------------------
    @staticmethod
    def _numbers(vals):
        if any(v.cond for v in vals):
            raise Invalid("a condition where a number is needed")

    @staticmethod
    def _shape(vals):
        try:
            return np.broadcast_shapes(*(v.x.shape for v in vals))
        except ValueError:
            raise Invalid("shapes do not broadcast") from None

    @staticmethod
    def _join(vals, extra=()):
        return (frozenset().union(*(v.deps for v in vals)),
                frozenset().union(*(v.bad for v in vals), extra))

    def arith(self, op, vals, neg=False) -> Val:
        self._numbers(vals)
        self._shape(vals)
        bad = set()
        if any(v.inf_literal for v in vals):
            bad.add("inf in arithmetic")
        if op == "/" and vals[1].x.ndim == 0 and vals[1].x == 0:
            bad.add("division by zero")
        f = ELEMENTWISE.get(op) or ARITHMETIC.get(op)
        with np.errstate(all="ignore"):
            x = np.asarray(-vals[1].x if neg else f(*(v.x for v in vals)), dtype=float)
        if x.ndim == 0 and not math.isfinite(float(x)):
            bad.add("a scalar is not finite")
        return Val(x, *self._join(vals, bad))

    def compare(self, op, a, b) -> Val:
        self._numbers([a, b])
        self._shape([a, b])
        bad = {"inf in arithmetic"} if a.inf_literal or b.inf_literal else set()
        return Val(COMPARE[op](a.x, b.x), *self._join([a, b], bad), cond=True)

    def logic(self, op, vals) -> Val:
        if not all(v.cond for v in vals):
            raise Invalid("logic on numbers")
        self._shape(vals)
        f = {"&": np.logical_and, "|": np.logical_or, "!": np.logical_not}[op]
        return Val(f(*(v.x for v in vals)), *self._join(vals), cond=True)

    def where(self, c, a, b) -> Val:
        if not c.cond:
            raise Invalid("where() needs a condition")
        self._numbers([a, b])
        self._shape([c, a, b])
        bad = {"inf in arithmetic"} if c.inf_literal else set()
        with np.errstate(all="ignore"):
            x = np.where(c.x, a.x, b.x).astype(float)
        return Val(x, *self._join([c, a, b], bad))

    @staticmethod
    def _matrices(vals):
        Interp._numbers(vals)
        if any(v.x.ndim != 2 for v in vals):
            raise Invalid("a matrix operation on a scalar")
        return ({"inf in arithmetic"} if any(v.inf_literal for v in vals) else set())

    def matrix_fn(self, fname, a) -> Val:
        bad = self._matrices([a])
        with np.errstate(all="ignore"):
            return Val(np.asarray(MATRIX_FNS[fname](a.x), dtype=float), *self._join([a], bad))

    def matmul(self, a, b) -> Val:
        bad = self._matrices([a, b])
        if a.x.shape[1] != b.x.shape[0]:
            raise Invalid("inner dimensions differ")
        with np.errstate(all="ignore"):
            return Val(a.x @ b.x, *self._join([a, b], bad))

    def pairwise(self, fname, a, b) -> Val:
        bad = self._matrices([a, b])
        if a.x.shape[1] != b.x.shape[1]:
            raise Invalid("rows of different lengths")
        with np.errstate(all="ignore"):
            return Val(PAIR_FNS[fname](a.x, b.x), *self._join([a, b], bad))


SIZES = ((7, 5), (6, 9))   # n != d, neither 1


def _inputs(n, d, seed, sign=1):
    """Inputs in [0.5, 1.5] (sign 1), [-1.5, -0.5] (sign -1) or standard normal (sign 0)."""
    rng = np.random.default_rng(seed)
    if sign == 0:
        return {k: rng.standard_normal(size=(n, d)) for k in "QKVP"}
    return {k: sign * rng.uniform(0.5, 1.5, size=(n, d)) for k in "QKVP"}


def _same(a, b) -> bool:
    both = np.isfinite(a) & np.isfinite(b)
    return bool(np.array_equal(np.isnan(a), np.isnan(b))
                and np.allclose(a[both], b[both], rtol=1e-9, atol=1e-12))


def oracle(text: str):
    """("syntax" | "invalid" | "valid", why, the numpy value at SIZES[0] on _inputs(7, 5, 0))."""
    try:
        program = Parser(text).program()
    except Syntax as e:
        return "syntax", str(e), None
    value = None
    try:
        for n, d in SIZES:
            ins = _inputs(n, d, 0)
            out = Interp(n, d, ins).run(program)
            if out.cond or out.x.shape != (n, d):
                raise Invalid(f"the output is {'a condition' if out.cond else out.x.shape}")
            if out.bad:
                raise Invalid(", ".join(sorted(out.bad)))
            if not 2 <= len(out.deps) <= 4:
                raise Invalid(f"{len(out.deps)} distinct inputs")
            # inputs that cancel do not count: perturb each and see whether the value moves
            # (on positive, negative and signed inputs, so a function's domain cannot hide it)
            moved = set()
            for sign in (1, -1, 0):
                base, other = _inputs(n, d, 2, sign), _inputs(n, d, 3, sign)
                ref = Interp(n, d, base).run(program).x
                moved |= {k for k in out.deps if not _same(
                    ref, Interp(n, d, {**base, k: other[k]}).run(program).x)}
            if len(moved) < 2:
                raise Invalid(f"after cancellation it reads only {sorted(moved)}")
            if value is None:
                value = out.x
    except Invalid as e:
        return "invalid", str(e), None
    return "valid", "", value


# ---- the tests ----------------------------------------------------------------------------------

def _positioned(err: attnc.AttncError, text: str) -> None:
    assert isinstance(err, (attnc.ParseError, attnc.ShapeError, attnc.CheckError)), type(err)
    assert err.span is not None, f"no position for {text!r}: {err}"
    rendered = str(err)
    assert f":{err.span.line}:{err.span.column}" in rendered
    assert "^" in rendered and err.message in rendered
    assert 1 <= err.span.line <= max(len(text.splitlines()), 1)
    assert 0 <= err.span.start <= len(text)


def _compile_run_and_compare(text: str, expected: np.ndarray) -> None:
    fn = attnc.compile(text)
    n, d = SIZES[0]
    ins = _inputs(n, d, 0)
    t = {k.lower(): torch.from_numpy(v).expand(2, 3, n, d).contiguous() for k, v in ins.items()}
    out = fn(**{k: t[k] for k in "qkvp" if k.upper() in fn.inputs})
    assert tuple(out.shape) == (2, 3, n, d)
    got = out[1, 2].numpy()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6, atol=1e-8,
                               err_msg=f"{text!r} -> {fn.canonical}")


def _judge(case: Case):
    """Run one case against its expectation; returns what happened (for the tally)."""
    if case.must_reject is not None:
        with pytest.raises(case.must_reject) as info:
            attnc.compile(case.text)
        _positioned(info.value, case.text)
        if case.name is not None:    # the error points at the unknown name
            s = info.value.span
            assert case.text[s.start:s.end] == case.name, (case.text, str(info.value))
        return "rejected as declared"
    verdict, why, value = oracle(case.text)
    if verdict == "valid":
        _compile_run_and_compare(case.text, value)
        return "valid: compiled and ran"
    with pytest.raises(attnc.AttncError) as info:
        attnc.compile(case.text)
    if verdict == "syntax":
        assert isinstance(info.value, attnc.ParseError), (case.text, why, str(info.value))
    _positioned(info.value, case.text)
    return f"{verdict}: rejected"


CHUNKS = 20


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_every_mutation_meets_its_own_expectation(chunk):
    failures = []
    for case in CASES[chunk::CHUNKS]:
        try:
            _judge(case)
        except BaseException as e:   # collect every disagreement of the chunk, then fail
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(f"{case.kind}: {case.text!r} (oracle: {oracle(case.text)[:2]}): "
                            f"{type(e).__name__}: {str(e)[:300]}")
    assert not failures, "\n".join(failures[:10])


def test_mutations_cover_valid_and_each_kind_of_rejection():
    """The tally is a property of the seeded generator and the oracle alone (not the compiler)."""
    tally = Counter()
    for case in CASES:
        if case.must_reject is not None:
            tally[case.must_reject.__name__] += 1
        else:
            tally[oracle(case.text)[0]] += 1
    assert sum(tally.values()) == len(CASES) == 2000
    assert tally["valid"] >= 100 and tally["syntax"] >= 200 and tally["invalid"] >= 100, tally
    assert {"ParseError", "ShapeError", "CheckError"} <= set(tally), tally


# ---- the oracle itself is checked on formulas whose verdict is known by hand -------------------

@pytest.mark.parametrize("text,verdict", [
    ("softmax(Q @ K^T / sqrt(d)) @ V", "valid"),
    ("softmax(Q @ K ^ T / d ^ 0.5) @ V", "valid"),
    ("let s = Q @ K^T\nsoftmax(mask(s, j <= i)) @ V", "valid"),
    ("formula a {\n let k = log(1 + exp(K^T))\n softmax(Q @ k) @ (K + Q)\n}", "valid"),
    ("(softmax(Q @ K^T)\n @ V)", "valid"),
    ("softmax(Q @ K^T)\n @ V", "syntax"),
    ("softmax(Q @ K^T) @ V @", "syntax"),
    ("Q < K < V", "syntax"),
    ("softmax(Q @ K) @ V", "invalid"),
    ("softmax(Q @ K^T) @ V + inf", "invalid"),
    ("where(j <= i, Q, -inf) + K", "invalid"),          # (n, n) and (n, d) do not broadcast
    ("softmax(where(j <= i, Q @ K^T, -inf)) @ V", "valid"),
    ("Q + K - K", "invalid"),
    ("Q / (d - d) + K", "invalid"),
    ("softmax(Q @ K^T)", "invalid"),
])
def test_oracle_on_known_formulas(text, verdict):
    assert oracle(text)[0] == verdict, oracle(text)[:2]


def test_error_messages_name_op_shapes_and_fix():
    with pytest.raises(attnc.ShapeError) as e:
        attnc.compile("softmax(Q @ K / sqrt(d)) @ V")
    msg = str(e.value)
    assert "'@'" in msg and "(n, d), (n, d)" in msg and "Q @ K^T" in msg
    assert "1:9" in msg and "    ^^^^^" in msg.replace("|", " ")
    with pytest.raises(attnc.ShapeError, match=r"must be \(n, d\).*\(n, n\)"):
        attnc.compile("softmax(Q @ K^T)")
    with pytest.raises(attnc.CheckError, match="1 distinct input"):
        attnc.compile("softmax(Q @ Q^T) @ Q")
    with pytest.raises(attnc.ParseError, match="upper-case: Q"):
        attnc.compile("softmax(q @ K^T) @ V")


def test_input_count_is_configurable():
    three = "softmax(Q @ K^T) @ V"
    with pytest.raises(attnc.CheckError):
        attnc.compile(three, checks=attnc.CheckOptions(max_inputs=2))
    assert attnc.compile("softmax(Q @ Q^T) @ Q", checks=attnc.CheckOptions(min_inputs=1)).inputs == ("Q",)
