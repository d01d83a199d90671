"""Hundreds of malformed or ill-shaped formulas: each raises the project's own error type,
with a position in the formula, a caret and a message; nothing else escapes."""
import random

import pytest

import attnc

SEEDS = [
    "softmax(Q @ K^T / sqrt(d)) @ V",
    "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
    "let s = Q @ K^T\nsoftmax(mask(s - 0.5 * abs(i - j), j <= i)) @ V",
    "softsign(cos(Q, K)) @ V + dist(Q, P) @ V",
]
JUNK = list("()@^*/+-,;{}=<>!&|$.?`'\"") + ["^T", "@@", "let", "formula", "inf", "q", "T", "x"]


def _mutations(seed: int):
    rng = random.Random(seed)
    base = rng.choice(SEEDS)
    kind = rng.randrange(7)
    pos = rng.randrange(len(base) + 1)
    if kind == 0:        # drop a character
        return base[:pos] + base[pos + 1:]
    if kind == 1:        # insert junk
        return base[:pos] + rng.choice(JUNK) + base[pos:]
    if kind == 2:        # truncate
        return base[:pos]
    if kind == 3:        # rename an input or function to something unknown / wrong case
        old = rng.choice(["Q", "K", "V", "softmax", "sqrt", "exp", "log", "abs"])
        new = rng.choice(["q", "X", "k", "softmx", "sqr", "Exp", "logg", "foo"])
        return base.replace(old, new, 1) if old in base else base + " " + new
    if kind == 4:        # break a shape: drop a transpose, swap @ for +, transpose the output
        return rng.choice([base.replace("^T", "", 1), base.replace("@", "+", 1),
                           f"({base})^T", f"{base} @ V", f"softmax({base.split(' @ ')[0]})",
                           base.replace(" @ V", "", 1)])
    if kind == 5:        # bad arity, conditions as numbers, numbers as conditions
        return rng.choice(["softmax(Q, K) @ V", "cos(Q) @ V", "where(Q @ K^T, Q, K)",
                           "mask(Q @ K^T) @ V", "(j <= i) @ V + Q", "softmax(Q @ K^T & 1) @ V",
                           "dist(Q, K^T) @ V", "norm(Q, K)", "scale() @ V", "softmax(j < i) @ V"])
    return rng.choice(["", "   ", "# only a comment", "let s = Q @ K^T", "1e999 * Q + K",
                       "softmax(Q @ K^T + inf) @ V", "softmax(Q @ K^T / 0) @ V", "Q + K + V + P + Q @ Q",
                       "3", "V", "softmax(Q @ Q^T) @ Q", "softmax(Q @ K^T * log(0)) @ V",
                       "let Q = K\nQ @ K^T @ V", "let a = Q\nlet a = K\na + V",
                       "formula a = Q + K\nformula a = Q + V", "Q + K\nformula b = Q + V",
                       "softmax(Q @ K^T) @ (V - V) + 0 * Q", "n * d"])


CASES = []
for s in range(2000):
    text = _mutations(s)
    try:
        attnc.analyze(text)
    except attnc.AttncError:
        if text not in CASES:
            CASES.append(text)
    if len(CASES) >= 260:
        break


def test_enough_generated_cases():
    assert len(CASES) >= 200


@pytest.mark.parametrize("text", CASES)
def test_bad_formula_gives_positioned_attnc_error(text):
    with pytest.raises(attnc.AttncError) as info:
        attnc.compile(text)
    err = info.value
    assert type(err) is not attnc.AttncError or err.kind == "error"
    assert isinstance(err, (attnc.ParseError, attnc.ShapeError, attnc.CheckError)), type(err)
    assert err.span is not None, f"no position for {text!r}: {err}"
    rendered = str(err)
    assert f":{err.span.line}:{err.span.column}" in rendered
    assert "^" in rendered and err.message in rendered
    lines = text.splitlines() or [""]
    assert 1 <= err.span.line <= max(len(lines), 1)


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
