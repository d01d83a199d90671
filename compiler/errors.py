"""attnc's error types. Every user-facing failure is an AttncError.

An error carries the message, where in the formula it happened (a Span), the
formula text, and a hint saying how to fix it. str(error) renders all of it,
rustc-style, with a caret under the offending part of the formula.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of formula text: 1-based line/column, 0-based character offsets."""

    line: int
    column: int
    end_line: int
    end_column: int
    start: int
    end: int

    def merge(self, other: "Span | None") -> "Span":
        if other is None:
            return self
        a, b = (self, other) if self.start <= other.start else (other, self)
        last = b if b.end >= a.end else a
        return Span(a.line, a.column, last.end_line, last.end_column, a.start, last.end)

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


class AttncError(Exception):
    """Base class of every error attnc raises for bad user input."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, source: str | None = None,
                 hint: str | None = None, name: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.source = source
        self.hint = hint
        self.name = name  # formula name (file form) or file path, when known

    def with_source(self, source: str, name: str | None = None) -> "AttncError":
        if self.source is None:
            self.source = source
        if self.name is None:
            self.name = name
        return self

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def __str__(self) -> str:
        out = [f"{self.kind}: {self.message}"]
        if self.span is not None:
            where = self.name or "formula"
            out.append(f"  --> {where}:{self.span.line}:{self.span.column}")
            if self.source is not None:
                lines = self.source.splitlines() or [""]
                ln = min(self.span.line, len(lines))
                text = lines[ln - 1]
                width = len(str(ln))
                col = max(self.span.column, 1)
                if self.span.end_line == self.span.line:
                    length = max(self.span.end_column - self.span.column, 1)
                else:
                    length = max(len(text) - col + 1, 1)
                out.append(f"{' ' * width} |")
                out.append(f"{ln} | {text}")
                out.append(f"{' ' * width} | {' ' * (col - 1)}{'^' * length}")
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "hint": self.hint,
                "line": self.line, "column": self.column, "name": self.name}


class ParseError(AttncError):
    """The formula text is not in the language (syntax, unknown names, wrong arity)."""

    kind = "parse error"


class ShapeError(AttncError):
    """Operand shapes do not fit an operation, or the output is not n x d."""

    kind = "shape error"


class CheckError(AttncError):
    """A well-formed, well-shaped formula that is still illegal (inputs, constants, dependence)."""

    kind = "check error"


class BackendError(AttncError):
    """A backend cannot run this formula or these tensors (wrong call, unsupported device)."""

    kind = "backend error"


class ConfigError(AttncError):
    """A bad model/search/benchmark configuration (arch string, kernel size, widths)."""

    kind = "config error"


class DataError(AttncError):
    """A dataset or corpus cannot be loaded (offline without data, unknown name)."""

    kind = "data error"


class EvaluationError(AttncError):
    """A search's evaluator fails on every candidate (the search stops instead of spending its budget)."""

    kind = "evaluation error"
