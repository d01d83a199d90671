"""Formula text -> IR graph. Lark (LALR) parses `attention.lark`; `_Builder` walks the tree
into frozen IR nodes, inferring shapes as it goes and keeping each node's source span.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import networkx as nx
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from attnc.compiler import shapes, structural
from attnc.compiler.errors import AttncError, CheckError, ParseError, Span
from attnc.compiler.ir import INDEX_NAMES, INPUT_NAMES, SYMBOL_NAMES, GraphBuilder, Node, Op
from attnc.compiler.names import function, function_names

_BINOPS = {"add": Op.ADD, "sub": Op.SUB, "mul": Op.MUL, "div": Op.DIV, "matmul": Op.MATMUL,
           "pow": Op.POW, "and_": Op.AND, "or_": Op.OR}
_CMP = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE}
_CONSTANTS = {"inf": math.inf, "pi": math.pi, "e": math.e}
RESERVED_NAMES = set(INPUT_NAMES) | set(SYMBOL_NAMES) | set(INDEX_NAMES) | set(_CONSTANTS)


def reserved() -> set[str]:
    """Names a `let` cannot bind: inputs, sizes, positions, constants and every function name
    (registered elementwise functions included, so computed on each call)."""
    return RESERVED_NAMES | set(function_names())


class ParenNewlines:
    """Post-lexer: newlines inside parentheses are whitespace, not statement separators."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type == "LPAR":
                depth += 1
            elif tok.type == "RPAR":
                depth = max(depth - 1, 0)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


GRAMMAR_PATH = Path(__file__).with_name("attention.lark")
_LARK_OPTIONS = dict(parser="lalr", propagate_positions=True, maybe_placeholders=False)


@lru_cache(maxsize=1)
def _lark() -> Lark:
    """The LALR parser. Building its tables costs ~40 ms per process, so the built parser is kept
    in attnc's cache folder (beside the generated code, see compiler/cache.py) under a name
    that hashes the grammar, the options and the Lark and Python versions; Lark checks that hash
    again when it loads the file and rebuilds on any mismatch or unreadable file. Without a
    writable cache folder the parser is built in memory, with a warning."""
    grammar = GRAMMAR_PATH.read_text(encoding="utf-8")
    return Lark(grammar, postlex=ParenNewlines(), cache=_lark_cache_file(grammar) or False,
                **_LARK_OPTIONS)


def _lark_cache_file(grammar: str) -> str | None:
    import hashlib
    import sys

    import lark

    from attnc.compiler.cache import default_cache_dir
    key = f"{grammar}\n{sorted(_LARK_OPTIONS.items())}\n{lark.__version__}\n{sys.version_info[:2]}"
    folder = default_cache_dir() / "parser"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        import warnings
        warnings.warn(f"attnc cannot write its parser cache in {folder} ({e}): the parser is built in "
                      "every process (about 40 ms more per start); set ATTNC_CACHE_DIR to a writable folder",
                      stacklevel=3)
        return None
    return str(folder / f"lark_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pickle")


@dataclass(frozen=True)
class Formula:
    """One parsed formula: its name (None for a bare formula), text and IR graph."""

    name: str | None
    source: str          # the whole text the formula came from (spans refer to it)
    graph: nx.DiGraph
    snippet: str         # this formula's own text


def parse(text: str, name: str | None = None) -> nx.DiGraph:
    """Parse a single formula (statements + final expression) into an IR graph."""
    formulas = parse_file(text, name=name)
    if len(formulas) != 1:
        names = ", ".join(f.name or "?" for f in formulas)
        second = formulas[1].graph
        span = second.nodes[second.graph["output"]]["node"].span
        raise ParseError(f"expected one formula, found {len(formulas)} ({names})", span, text,
                         hint="compile a file of several formulas with parse_file / attnc compile FILE")
    return formulas[0].graph


def parse_file(text: str, name: str | None = None) -> list[Formula]:
    """Parse a bare formula or a file of `formula NAME ...` definitions."""
    if not isinstance(text, str):
        raise ParseError(f"a formula must be a string, got {type(text).__name__}",
                         hint='e.g. attnc.compile("softmax(Q @ K^T / sqrt(d)) @ V")')
    try:
        try:
            tree = _lark().parse(text)
        except UnexpectedInput as e:
            raise _syntax_error(e, text) from None
        return _Builder(text, name).program(tree)
    except AttncError as e:
        raise e.with_source(text, name)


def _syntax_error(e: UnexpectedInput, text: str) -> ParseError:
    line = getattr(e, "line", None) or 1
    col = getattr(e, "column", None) or 1
    pos = getattr(e, "pos_in_stream", None) or 0
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        lines = text.splitlines() or [""]
        line, col, pos = len(lines), len(lines[-1]) + 1, len(text)
        msg, width = "unexpected end of formula", 1
    elif isinstance(e, UnexpectedToken):
        tok = e.token
        msg, width = f"unexpected {_describe(tok)}", max(len(str(tok)), 1)
    elif isinstance(e, UnexpectedCharacters):
        msg, width = f"unexpected character {text[pos]!r}", 1
    else:  # pragma: no cover - lark's other subclasses
        msg, width = "syntax error", 1
    names = set(getattr(e, "expected", None) or getattr(e, "allowed", None) or set())
    if text[:pos].count("{") <= text[:pos].count("}"):   # not inside a formula block
        names.discard("RBRACE")
    expected = _expected(names)
    hint = f"expected {expected}" if expected else None
    span = Span(line, col, line, col + width, pos, pos + width)
    return ParseError(msg, span, text, hint=hint)


def _describe(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    return f"{tok.type.lower()} {str(tok)!r}" if tok.type in ("NAME", "NUMBER") else repr(str(tok))


_TOKEN_TEXT = {"NAME": "a name", "NUMBER": "a number", "LPAR": "'('", "RPAR": "')'", "COMMA": "','",
               "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "AT": "'@'",
               "CIRCUMFLEX": "'^'", "TRANSPOSE": "'^T'", "CMP": "a comparison", "EQUAL": "'='",
               "_NL": "end of line", "SEMICOLON": "';'", "$END": "end of formula",
               "LBRACE": "'{'", "RBRACE": "'}'", "LET": "'let'", "FORMULA": "'formula'",
               "BANG": "'!'", "AMPERSAND": "'&'", "VBAR": "'|'"}


def _expected(names) -> str:
    names = set(names)
    if names - {"_NL", "SEMICOLON", "$END"}:   # newlines are always accepted by the post-lexer
        names -= {"_NL", "SEMICOLON"}
    words = sorted({_TOKEN_TEXT.get(n, n.lower()) for n in names})
    if not words:
        return ""
    return ", ".join(words[:-1]) + (" or " if len(words) > 1 else "") + words[-1]


def _span(meta_or_tok) -> Span | None:
    m = meta_or_tok
    if isinstance(m, Token):
        return Span(m.line, m.column, m.end_line, m.end_column, m.start_pos, m.end_pos)
    if getattr(m, "empty", True):
        return None
    return Span(m.line, m.column, m.end_line, m.end_column, m.start_pos, m.end_pos)


class _Builder:
    """Walks a lark tree into IR graphs, one GraphBuilder per formula."""

    def __init__(self, text: str, name: str | None):
        self.text = text
        self.name = name

    # -- statements ---------------------------------------------------------------------------
    def program(self, tree: Tree) -> list[Formula]:
        stmts = list(tree.children)
        defs = [s for s in stmts if isinstance(s, Tree) and s.data in ("formula_line", "formula_block")]
        if not defs:
            return [self._formula(self.name, stmts, {}, _span(tree.meta))]
        shared: list = []
        out: list[Formula] = []
        seen: dict[str, Span | None] = {}
        for s in stmts:
            if isinstance(s, Tree) and s.data == "let":
                shared.append(s)
            elif isinstance(s, Tree) and s.data in ("formula_line", "formula_block"):
                fname = str(s.children[0])
                if fname in seen:
                    raise ParseError(f"formula {fname!r} is defined twice", _span(s.children[0]),
                                     hint=f"the first definition is at {seen[fname]}; rename one")
                seen[fname] = _span(s.children[0])
                body = s.children[1:]
                spans = [_span(c.meta) if isinstance(c, Tree) else _span(c) for c in body]
                spans = [x for x in spans if x is not None]
                body_span = spans[0].merge(spans[-1]) if spans else _span(s.meta)
                out.append(self._formula(fname, shared + list(body), {}, body_span))
            else:
                raise ParseError("a file of named formulas cannot also hold a bare expression",
                                 _span(s.meta) if isinstance(s, Tree) else _span(s),
                                 hint="put it in its own definition: formula NAME = ...")
        return out

    def _formula(self, fname, stmts, env, span) -> Formula:
        self.gb = GraphBuilder(self.text, fname)
        env = dict(env)
        let_spans: dict[str, Span | None] = {}
        result = None
        for k, s in enumerate(stmts):
            if isinstance(s, Tree) and s.data == "let":
                tok, expr = s.children
                var = str(tok)
                if var in reserved():
                    raise ParseError(f"'let {var}' would rebind a built-in name", _span(tok),
                                     hint="pick another name; Q K V P n d i j inf pi e and the "
                                          "function names are reserved")
                if var in env and let_spans.get(var) is not None:
                    raise ParseError(f"{var!r} is already bound", _span(tok),
                                     hint=f"the first 'let {var}' is at {let_spans[var]}; use a new name")
                env[var] = self.expr(expr, env)
                let_spans[var] = _span(tok)
                if k == len(stmts) - 1:
                    raise ParseError("the formula ends with a 'let' and has no value", _span(s.meta),
                                     hint=f"end with an expression, e.g. add a line: softmax({var}) @ V")
            elif isinstance(s, Tree) and s.data in ("formula_line", "formula_block"):
                raise ParseError("formula definitions cannot be nested", _span(s.meta))
            else:
                if k != len(stmts) - 1:
                    raise ParseError("only the last statement may be a bare expression",
                                     _span(s.meta) if isinstance(s, Tree) else _span(s),
                                     hint="bind intermediate values with 'let NAME = ...'")
                result = self.expr(s, env)
        if result is None:
            span = span or Span(1, 1, 1, 2, 0, 1)
            raise ParseError("empty formula", span, hint="write an expression such as "
                             "softmax(Q @ K^T / sqrt(d)) @ V")
        graph = self.gb.finish(result)
        snippet = self.text[span.start:span.end] if span is not None else self.text
        graph.graph["source"] = snippet
        return Formula(fname, self.text, graph, snippet)

    # -- expressions --------------------------------------------------------------------------
    def node(self, op: Op, operands: list[int], span: Span | None, **attrs) -> int:
        nodes = [self.gb.g.nodes[o]["node"] for o in operands]
        shape = shapes.infer(op, nodes, span)
        return self.gb.add(Node(op, tuple(operands), shape, span=span, **attrs))

    def const(self, value: float, span: Span | None) -> int:
        return self.gb.add(Node(Op.CONST, (), (), value=float(value), span=span))

    def expr(self, t, env) -> int:
        if isinstance(t, Token):
            raise ParseError(f"unexpected {t!r}", _span(t))  # pragma: no cover - grammar prevents it
        span = _span(t.meta)
        kind = t.data
        if kind == "number":
            value = float(t.children[0])
            if not math.isfinite(value):
                raise CheckError(f"number {t.children[0]} overflows to infinity", span,
                                 hint="use inf explicitly (only meaningful in where/mask) or a "
                                      "smaller constant")
            return self.const(value, span)
        if kind == "name":
            return self.name_ref(t.children[0], env)
        if kind in _BINOPS:
            a, b = t.children
            op = _BINOPS[kind]
            if op is Op.POW and isinstance(b, Tree) and b.data == "name" and str(b.children[0]) == "T":
                return self.node(Op.TRANSPOSE, [self.expr(a, env)], span)
            return self.node(op, [self.expr(a, env), self.expr(b, env)], span)
        if kind == "compare":
            a, cmp, b = t.children
            return self.node(_CMP[str(cmp)], [self.expr(a, env), self.expr(b, env)], span)
        if kind == "neg":
            (a,) = t.children
            if isinstance(a, Tree) and a.data == "number":
                return self.const(-float(a.children[0]), span)
            if isinstance(a, Tree) and a.data == "name" and str(a.children[0]) == "inf":
                return self.const(-math.inf, span)
            return self.node(Op.NEG, [self.expr(a, env)], span)
        if kind == "not_":
            return self.node(Op.NOT, [self.expr(t.children[0], env)], span)
        if kind == "transpose":
            return self.node(Op.TRANSPOSE, [self.expr(t.children[0], env)], span)
        if kind == "call":
            return self.call(t, env, span)
        raise ParseError(f"unsupported construct {kind!r}", span)  # pragma: no cover

    def name_ref(self, tok: Token, env) -> int:
        name, span = str(tok), _span(tok)
        if name in env:
            return env[name]
        if name in INPUT_NAMES:
            return self.gb.add(Node(Op.INPUT, (), ("n", "d"), name=name, span=span))
        if name in SYMBOL_NAMES:
            return self.gb.add(Node(Op.SYMBOL, (), (), name=name, span=span))
        if name in INDEX_NAMES:
            shape = ("n", 1) if name == "i" else (1, "n")
            return self.gb.add(Node(Op.INDEX, (), shape, name=name, span=span))
        if name in _CONSTANTS:
            return self.const(_CONSTANTS[name], span)
        if function(name) is not None:
            raise ParseError(f"{name!r} is a function", span, hint=f"call it: {name}(...)")
        raise ParseError(f"unknown name {name!r}", span, hint=_name_hint(name, env))

    def call(self, t: Tree, env, span) -> int:
        fn_tok, *args = t.children
        fname = str(fn_tok)
        found = function(fname)
        if found is None:
            known = function_names()
            hint = _suggest(fname, known)
            raise ParseError(f"unknown function {fname!r}", _span(fn_tok),
                             hint=f"did you mean {hint}(...)?" if hint else
                             "functions: " + ", ".join(sorted(known)))
        op, arity = found
        if len(args) != arity:
            raise ParseError(f"{fname}() takes {arity} argument{'s' * (arity != 1)}, got {len(args)}",
                             span, hint=structural.call_hint(fname))
        ids = [self.expr(a, env) for a in args]
        spec = structural.get(op)
        if spec is not None:   # e.g. mask(x, cond) is where(cond, x, -inf)
            ids = spec.arguments(fname, ids, lambda v: self.const(v, span))
        return self.node(op, ids, span)


def _name_hint(name: str, env) -> str:
    if name.upper() in INPUT_NAMES:
        return f"inputs are upper-case: {name.upper()}"
    if name == "T":
        return "transpose with x^T (no space) or transpose(x)"
    close = _suggest(name, list(env) + list(INPUT_NAMES) + list(SYMBOL_NAMES) + list(INDEX_NAMES))
    if close:
        return f"did you mean {close}?"
    return "names are the inputs Q K V P, the sizes n d, positions i j, constants inf pi e, and let-bound names"


def _suggest(word: str, options) -> str | None:
    import difflib
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return match[0] if match else None
