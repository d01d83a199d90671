"""Formula strategies and fixtures shared by the compiler tests."""
from hypothesis import strategies as st

from attnc.compiler import elementwise

# every built-in elementwise function of the compiler's table (a new built-in is drawn too)
UNARY = list(elementwise.BUILTIN_NAMES)


def _tame(name: str) -> bool:
    """Defined everywhere and growing at most linearly: safe on any argument."""
    e = elementwise.get(name)
    f = e.scalar_fn()
    return e.domain is None and all(abs(f(v)) <= 51 for v in (-50.0, 50.0))


SAFE_UNARY = [u for u in UNARY if _tame(u)]
INPUTS = ["Q", "K", "V", "P"]
SCALARS = ["2", "0.5", "3", "sqrt(d)", "n", "1 / sqrt(d)", "0.125"]


def _unary(name: str, x: str) -> str:
    # keep arguments in the domain (log, sqrt: positive) and fast growth (exp) bounded, so
    # values stay finite
    if elementwise.get(name).domain is not None:
        return f"{name}(1 + abs({x}))"
    if not _tame(name):
        return f"{name}(tanh({x}))"
    return f"{name}({x})"


@st.composite
def formula_of(draw, shape: str, depth: int) -> str:
    """A random DSL expression of symbolic shape nd, nn, dn, n1 or s (scalar)."""
    if shape == "s":
        return draw(st.sampled_from(SCALARS))
    if depth <= 0:
        if shape == "nd":
            return draw(st.sampled_from(INPUTS))
        if shape == "dn":
            return draw(st.sampled_from(INPUTS)) + "^T"
        if shape == "n1":
            return draw(st.sampled_from(["i", "norm(Q)", "norm(K)"]))
        a, b = draw(st.sampled_from(INPUTS)), draw(st.sampled_from(INPUTS))
        return f"({a} @ {b}^T / sqrt(d))"
    sub = lambda s: formula_of(s, depth - 1)  # noqa: E731
    choices = ["unary", "add", "sub", "scale", "div", "neg", "maxmin", "pow", "scale_op"]
    if shape == "nd":
        choices += ["matmul", "matmul", "softmax_attn", "rownorm"]
    if shape == "nn":
        choices += ["qk", "cos", "dist", "softmax", "pos", "mask", "transpose", "mul"]
    if shape == "dn":
        choices += ["transpose"]
    if shape == "n1":
        choices = ["unary", "add", "scale", "norm"]
    kind = draw(st.sampled_from(choices))
    if kind == "unary":
        return _unary(draw(st.sampled_from(UNARY)), draw(sub(shape)))
    if kind == "add":
        return f"({draw(sub(shape))} + {draw(sub(shape))})"
    if kind == "sub":
        return f"({draw(sub(shape))} - {draw(sub(shape))})"
    if kind == "mul":
        return f"({draw(sub(shape))} * {draw(sub(shape))})"
    if kind == "scale":
        return f"({draw(sub('s'))} * {draw(sub(shape))})"
    if kind == "div":
        return f"({draw(sub(shape))} / {draw(sub('s'))})"
    if kind == "neg":
        return f"-({draw(sub(shape))})"
    if kind == "maxmin":
        fn = draw(st.sampled_from(["max", "min"]))
        other = draw(st.sampled_from([draw(sub(shape)), draw(sub("s")), "0"]))
        return f"{fn}({draw(sub(shape))}, {other})"
    if kind == "pow":
        # sigmoid keeps the base positive, so fractional and negative powers stay finite
        return f"(sigmoid({draw(sub(shape))}) ^ {draw(st.sampled_from(['2', '0.5', '3', '-1']))})"
    if kind == "scale_op":
        return f"scale({draw(sub(shape))})"
    if kind == "rownorm":
        return f"({draw(sub('nd'))} / (1 + norm({draw(sub('nd'))})))"
    if kind == "norm":
        return f"norm({draw(sub('nd'))})"
    if kind == "matmul":
        return f"({_sm(draw(sub('nn')))} @ {draw(sub('nd'))})"
    if kind == "softmax_attn":
        return f"(softmax({draw(sub('nn'))}) @ {draw(sub('nd'))})"
    if kind == "qk":
        return f"({draw(sub('nd'))} @ {draw(sub('dn'))} / sqrt(d))"
    if kind in ("cos", "dist"):
        return f"{kind}({draw(sub('nd'))}, {draw(sub('nd'))})"
    if kind == "softmax":
        return f"softmax({draw(sub('nn'))})"
    if kind == "pos":
        return f"({draw(sub('nn'))} - {draw(sub('s'))} * abs(i - j))"
    if kind == "mask":
        cond = draw(st.sampled_from(["j <= i", "i - j < 3", "(j <= i) & (i - j < 4)", "j != i",
                                     "!(j > i) | (j == 0)", "abs(i - j) >= 2"]))
        return f"where({cond}, {draw(sub('nn'))}, {draw(st.sampled_from(['-inf', '0', '-3']))})"
    if kind == "transpose":
        inner = "nd" if shape == "dn" else "nn"
        return f"({draw(sub(inner))})^T"
    raise AssertionError(kind)


def _sm(x: str) -> str:
    """Keep n x n weights bounded before they multiply values (avoids overflow in float64)."""
    return f"softsign({x})"


def attention_formulas(max_depth: int = 3):
    return st.integers(1, max_depth).flatmap(lambda k: formula_of("nd", k))
