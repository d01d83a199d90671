"""The language: every construct parses to the IR with shapes and spans."""
import math

import pytest

import attnc
from attnc.compiler.ir import Op, fn_op, inputs_used, node_of, op_counts, output_of, path_length
from attnc.compiler.picture import to_dot
from attnc.grammar.parser import parse, parse_file

PAPER = [
    "softmax(Q @ K^T / sqrt(d)) @ V",
    "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
    "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V",
]


@pytest.mark.parametrize("text", PAPER)
def test_paper_formulas_parse_to_n_by_d(text):
    g = parse(text)
    assert node_of(g, output_of(g)).shape == ("n", "d")


def test_ir_helpers():
    g = parse(PAPER[1])
    assert inputs_used(g) == ("Q", "K")
    assert op_counts(g) == {"add": 2, "div": 1, "exp": 1, "log": 1, "matmul": 2, "softmax": 1,
                            "sqrt": 1, "transpose": 1}
    # Q -> matmul -> div -> softmax -> matmul is 4 ops; K^T -> exp -> add -> log -> matmul ... is 8
    assert path_length(g) == 8
    dot = to_dot(g)
    assert dot.startswith("digraph") and dot.count("->") == sum(len(node_of(g, x).operands) for x in g)


def test_every_node_is_one_frozen_node_with_span():
    g = parse("let s = Q @ K^T\nsoftmax(s) @ V")
    for nid in g:
        node = node_of(g, nid)
        with pytest.raises(Exception):
            node.op = Op.ADD  # frozen
        assert node.span is not None
    mm = [node_of(g, x) for x in g if node_of(g, x).op is Op.MATMUL]
    assert {(m.span.line, m.span.column) for m in mm} == {(1, 9), (2, 1)}


def test_operator_precedence_and_transpose_forms():
    a = attnc.analyze("softmax(Q @ K^T / sqrt(d)) @ V")
    b = attnc.analyze("softmax((Q @ transpose(K)) / sqrt(d)) @ V")
    c = attnc.analyze("softmax(Q @ K ^ T / d ^ 0.5) @ V")
    assert a.hash == b.hash == c.hash
    # unary minus binds tighter than @ and looser than ^: -Q^T is -(Q^T)
    g = parse("-Q^T^T @ K^T @ V")
    assert node_of(g, output_of(g)).shape == ("n", "d")


def test_let_comments_newlines_in_parens_and_semicolons():
    text = """
    # scores, scaled
    let s = (Q @ K^T      # newline inside parens is whitespace
             / sqrt(d))
    let w = softmax(s); w @ V
    """
    assert attnc.analyze(text).hash == attnc.analyze(PAPER[0]).hash


def test_positions_masks_and_constants():
    g = parse("softmax(where(j <= i, Q @ K^T - 0.5 * abs(i - j), -inf)) @ V")
    ops = {node_of(g, x).op for x in g}
    assert {Op.WHERE, Op.LE, Op.INDEX, fn_op("abs")} <= ops
    consts = sorted(node_of(g, x).value for x in g if node_of(g, x).op is Op.CONST)
    assert consts == [-math.inf, 0.5]
    g2 = parse("softmax(mask(Q @ K^T, j <= i & i - j < 16 | j == 0)) @ V")
    assert node_of(g2, output_of(g2)).shape == ("n", "d")
    assert attnc.analyze("softmax(mask(Q @ K^T, j <= i)) @ V").hash == \
        attnc.analyze("softmax(where(j <= i, Q @ K^T, -inf)) @ V").hash


def test_all_functions_of_the_op_table():
    text = ("softmax(scale(Q @ K^T) + cos(Q, K) - dist(P, K) + logsigmoid(Q @ K^T) + "
            "softsign(Q @ K^T) + sigmoid(Q @ K^T) * tanh(Q @ K^T) + relu(Q @ K^T) + "
            "softplus(Q @ K^T) + sqrt(abs(Q @ K^T)) + exp(-(Q @ K^T)) + log(1 + abs(Q @ K^T)) + "
            "max(Q @ K^T, 0) + min(Q @ K^T, 1) + pow(abs(Q @ K^T), 2) + (Q @ K^T) ^ 2) @ V "
            "+ Q / norm(Q)")
    g = parse(text)
    used = {node_of(g, x).op for x in g}
    fns = ("logsigmoid", "softsign", "sigmoid", "tanh", "relu", "softplus", "sqrt", "abs", "exp", "log")
    expected = {Op.SCALE, Op.COS, Op.DIST, *map(fn_op, fns), Op.MAX, Op.MIN, Op.POW, Op.NEG,
                Op.NORM, Op.DIV, Op.MUL, Op.SUB, Op.ADD, Op.MATMUL, Op.TRANSPOSE, Op.SOFTMAX}
    assert expected <= used
    assert attnc.analyze(text).inputs == ("Q", "K", "V", "P")


def test_file_form_with_shared_lets():
    text = """
    let scores = Q @ K^T / sqrt(d)
    formula standard = softmax(scores) @ V
    formula layer2 {
        let k = log(1 + exp(K^T))
        softmax(Q @ k / sqrt(d)) @ (K + Q)
    }
    formula layer12 = softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V
    """
    fs = parse_file(text)
    assert [f.name for f in fs] == ["standard", "layer2", "layer12"]
    compiled = attnc.compile_file(text)
    assert list(compiled) == ["standard", "layer2", "layer12"]
    for (name, fn), paper in zip(compiled.items(), PAPER):
        assert fn.hash == attnc.analyze(paper).hash, name


def test_parse_rejects_two_bare_formulas_and_duplicate_names():
    with pytest.raises(attnc.ParseError) as e:
        parse("formula a = softmax(Q @ K^T) @ V\nformula a = Q + K")
    assert "twice" in e.value.message and e.value.span.line == 2
