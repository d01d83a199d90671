"""Each rewrite rule: the expected canonical form, and numeric equality before and after."""
import pytest

import attnc
from attnc.compiler.check import CheckOptions
from attnc.compiler.equiv import numeric_diff
from attnc.compiler.symbolic import RULES

LOOSE = CheckOptions(min_inputs=1)

# (formula, expected canonical form) — one line per law
CASES = [
    ("(Q @ K^T)^T^T @ V", "Q @ K^T @ V"),                                     # x^T^T = x
    ("(K @ Q^T)^T @ V", "Q @ K^T @ V"),                                       # (AB)^T = B^T A^T
    ("softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
     "softmax(Q @ (K^T / d + V^T / sqrt(d))) @ V"),                         # (A + B)^T = A^T + B^T
    ("-(-(softmax(Q @ K^T) @ V))", "softmax(Q @ K^T) @ V"),                   # neg∘neg
    ("softmax(Q @ K^T) @ V + softmax(Q @ K^T) @ V", "2 * softmax(Q @ K^T) @ V"),  # x + x = 2x
    ("softmax((2 * Q) @ (3 * K)^T) @ V", "softmax(6 * Q @ K^T) @ V"),      # constants leave @
    ("softmax(Q @ K^T * 2 * 0.5) @ V", "softmax(Q @ K^T) @ V"),               # scalar folding
    ("softmax(Q @ K^T / sqrt(d) * sqrt(d)) @ V", "softmax(Q @ K^T) @ V"),     # symbolic folding
    ("softmax(scale(Q @ K^T)) @ V", "softmax(Q @ K^T / sqrt(n)) @ V"),        # scale = / sqrt(cols)
    ("softmax(scale(Q) @ K^T) @ V", "softmax(Q @ K^T / sqrt(d)) @ V"),
    ("softmax(Q @ K^T + 3) @ V", "softmax(Q @ K^T) @ V"),                     # softmax shift: const
    ("softmax(Q @ K^T + i) @ V", "softmax(Q @ K^T) @ V"),                     # shift: row index
    ("softmax(Q @ K^T - norm(Q)) @ V", "softmax(Q @ K^T) @ V"),               # shift: row vector
    ("softmax(Q @ log(1 + exp(K^T))) @ V", "softmax(Q @ softplus(K^T)) @ V"),  # log(1+e^x) = softplus
    ("log(sigmoid(Q @ K^T)) @ V", "logsigmoid(Q @ K^T) @ V"),                 # log∘sigmoid
    ("softmax(log(exp(Q @ K^T))) @ V", "softmax(Q @ K^T) @ V"),               # log∘exp
    ("abs(abs(-(Q @ K^T))) @ V", "abs(Q @ K^T) @ V"),                         # |−x| = |x|, |·| idempotent
    ("relu(relu(Q @ K^T)) @ V", "relu(Q @ K^T) @ V"),
    ("sqrt((Q @ K^T) ^ 2) @ V", "abs(Q @ K^T) @ V"),                          # sqrt(x^2) = |x|
    ("((Q @ K^T) * (Q @ K^T)) @ V", "(Q @ K^T) ^ 2 @ V"),                     # x * x = x^2
    ("softsign(cos(2 * Q, K)) @ V", "softsign(cos(Q, K)) @ V"),               # cos ignores c > 0
    ("dist(3 * Q, 3 * K) @ V", "3 * dist(Q, K) @ V"),                       # dist(cA, cB) = |c| dist
    ("where(j <= i, Q @ K^T, Q @ K^T) @ V", "Q @ K^T @ V"),                   # where(c, x, x) = x
    ("softmax(Q @ K^T) @ (V - V + Q)", "softmax(Q @ K^T) @ Q"),               # x - x = 0
    ("(2 * Q) * K + V", "2 * K * Q + V"),                                   # c out of ∘, sorted
    ("-softplus(-(Q @ K^T)) @ V", "logsigmoid(Q @ K^T) @ V"),                 # -softplus(-x)
    ("(Q + 1) * 2 + K", "2 + 2 * Q + K"),                                   # broadcasts fold
    ("exp(i - i) * Q + K", "K + Q"),                                        # exp(0) = 1
    ("max(i - i, 1) * Q + K", "K + Q"),                                     # max(0, 1) = 1
    ("(Q ^ 2) ^ 3 + K", "K + Q ^ 6"),                                       # (x^a)^b = x^ab
    ("Q / norm(2 * Q) + K", "(1 / norm(Q)) * Q / 2 + K"),                   # norm(cx) = |c| norm(x)
    ("Q * (sqrt(d) + 1) * (n + 1) + K", "(1 + n + n * sqrt(d) + sqrt(d)) * Q + K"),  # expanded
]


@pytest.mark.parametrize("text,expected", CASES)
def test_rule(text, expected):
    a = attnc.analyze(text, checks=LOOSE)
    assert a.canonical == expected
    same, worst = numeric_diff(a.graph, a.simplified)
    assert same, f"simplified differs from the formula by {worst}"
    # the canonical text re-parses to itself (idempotent, stable hash)
    b = attnc.analyze(a.canonical, checks=LOOSE)
    assert (b.canonical, b.hash) == (a.canonical, a.hash)


def test_every_named_rule_fires_on_some_case(monkeypatch):
    """Each rule of the table has a unique name and rewrites at least one formula of CASES (a
    rule that never fires, or a case list that misses one, fails here)."""
    from attnc.compiler import api, rules

    names = [name for name, _ in RULES]
    assert len(set(names)) == len(names) and all(isinstance(x, str) and x for x in names)
    fired = set()

    def traced(name, rule):
        def run(x):
            y = rule(x)
            if y is not None and y != x:
                fired.add(name)
            return y
        return run

    monkeypatch.setattr(rules, "RULES", [(name, traced(name, rule)) for name, rule in RULES])
    api.clear_memos()
    try:
        for text, _ in CASES:
            attnc.analyze(text, checks=LOOSE)
    finally:
        api.clear_memos()
    assert sorted(set(names) - fired) == []


def test_equal_under_rules_same_hash():
    forms = ["softmax(Q @ K^T / sqrt(d)) @ V",
             "softmax((K @ Q^T)^T * d ^ -0.5 + 7) @ V",
             "softmax(scale(Q) @ K^T - i) @ V",
             "let s = Q @ K^T\nsoftmax(s / sqrt(d)) @ V"]
    assert len({attnc.analyze(f).hash for f in forms}) == 1


def test_different_formulas_different_hash():
    forms = ["softmax(Q @ K^T) @ V", "softmax(K @ Q^T) @ V", "softmax(Q @ K^T) @ P",
             "softmax(Q @ K^T + j) @ V", "softmax(Q @ K^T / sqrt(n)) @ V"]
    assert len({attnc.analyze(f).hash for f in forms}) == len(forms)


def test_matrix_chain_lowered_in_cheapest_order():
    from attnc.compiler.ir import Op, node_of, output_of
    a = attnc.analyze("Q @ K^T @ V")
    g = a.simplified
    out = node_of(g, output_of(g))
    assert out.op is Op.MATMUL
    # Q @ (K^T @ V): the right operand is the (d, d) product
    assert node_of(g, out.operands[1]).shape == ("d", "d")
