"""The structural operations, entry by entry (compiler/structural.py).

Each entry is checked through the whole compiler against references written here with numpy
(values) and plain torch autograd (gradients), never with attnc's own functions: the torch
backend in float64, the fused Triton kernel (interpreter on CPU) in float32 with gradients, the
FLOP count against a count by hand, and the shape rule against a wrong shape. `REFERENCE` must
name every entry of the table, so a new structural operation cannot land without these checks.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import attnc
from attnc.compiler import api, structural
from attnc.compiler.errors import ShapeError
from attnc.compiler.report import report

N, D = 12, 8


def _np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_norm(x):
    return np.sqrt((x * x).sum(-1, keepdims=True))


def _np_cos(a, b):
    return (a / _np_norm(a)) @ (b / _np_norm(b)).swapaxes(-1, -2)


def _np_dist(a, b):
    return np.sqrt(((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1))


def _t_norm(x):
    return (x * x).sum(-1, keepdim=True).sqrt()


def _t_cos(a, b):
    return (a / _t_norm(a)) @ (b / _t_norm(b)).transpose(-1, -2)


def _t_dist(a, b):
    return ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1).sqrt()


_CAUSAL = np.tril(np.ones((N, N), dtype=bool))

# name -> (formula that streams through the fused kernel, numpy reference, torch reference,
#          FLOPs per head by hand at n=N, d=D, counted on the simplified formula)
REFERENCE = {
    "matmul": ("(Q @ K^T) ^ 2 @ V / n ^ 2",
               lambda q, k, v: (q @ k.swapaxes(-1, -2)) ** 2 @ v / N ** 2,
               lambda q, k, v: (q @ k.transpose(-1, -2)) ** 2 @ v / N ** 2,
               2 * N * N * D + N * N + 2 * N * N * D + N * D),
    "transpose": ("softmax(Q @ (K + V)^T) @ V",
                  lambda q, k, v: _np_softmax(q @ (k + v).swapaxes(-1, -2)) @ v,
                  lambda q, k, v: torch.softmax(q @ (k + v).transpose(-1, -2), -1) @ v,
                  D * N + 2 * N * N * D + 5 * N * N + 2 * N * N * D),
    "scale": ("softmax(scale(Q @ K^T)) @ V",
              lambda q, k, v: _np_softmax(q @ k.swapaxes(-1, -2) / math.sqrt(N)) @ v,
              lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(N), -1) @ v,
              2 * N * N * D + N * N + 5 * N * N + 2 * N * N * D),
    "softmax": ("softmax(Q @ K^T) @ V",
                lambda q, k, v: _np_softmax(q @ k.swapaxes(-1, -2)) @ v,
                lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
                2 * N * N * D + 5 * N * N + 2 * N * N * D),
    "norm": ("softmax(Q @ K^T) @ (V / norm(V))",
             lambda q, k, v: _np_softmax(q @ k.swapaxes(-1, -2)) @ (v / _np_norm(v)),
             lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ (v / _t_norm(v)),
             # simplified to (1 / norm(V)) * V: a division per row, then a product per entry
             2 * N * N * D + 5 * N * N + (2 * N * D + N) + N + N * D + 2 * N * N * D),
    "cos": ("softmax(cos(Q, K)) @ V",
            lambda q, k, v: _np_softmax(_np_cos(q, k)) @ v,
            lambda q, k, v: torch.softmax(_t_cos(q, k), -1) @ v,
            (2 * N * N * D + 3 * 2 * N * D + N * N) + 5 * N * N + 2 * N * N * D),
    "dist": ("softmax(-dist(Q, K)) @ V",
             lambda q, k, v: _np_softmax(-_np_dist(q, k)) @ v,
             lambda q, k, v: torch.softmax(-_t_dist(q, k), -1) @ v,
             (2 * N * N * D + 2 * 2 * N * D + 4 * N * N) + N * N + 5 * N * N + 2 * N * N * D),
    "where": ("softmax(mask(Q @ K^T, j <= i)) @ V",
              lambda q, k, v: _np_softmax(np.where(_CAUSAL, q @ k.swapaxes(-1, -2), -np.inf)) @ v,
              lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)).masked_fill(
                  ~torch.tensor(_CAUSAL), -math.inf), -1) @ v,
              None),   # FLOPs: the comparison and its broadcast index nodes; see below
}

# a call with a wrong shape, per entry: (formula, the message's start, the hint)
BAD_SHAPE = {
    "matmul": ("Q @ K @ V", "'@' inner dimensions differ (d vs n); operand shapes: (n, d), (n, d)",
               "transpose the right operand, e.g. Q @ K^T"),
    "transpose": ("transpose(2) * Q", "'^T' needs matrices, not scalars", "a scalar needs no transpose"),
    "scale": ("scale(2) * Q", "scale() needs matrices, not scalars", "scale() works on the rows of a matrix"),
    "softmax": ("softmax(2) * Q", "softmax() needs matrices, not scalars",
                "softmax() works on the rows of a matrix"),
    "norm": ("norm(3) * Q", "norm() needs matrices, not scalars", "norm() works on the rows of a matrix"),
    "cos": ("cos(Q, K^T) @ V", "cos() compares rows of different lengths (d vs n); operand shapes: (n, d), (d, n)",
            "cos(x, y) needs rows of equal length, e.g. cos(Q, K)"),
    "dist": ("dist(Q, Q @ K^T) @ V", "dist() compares rows of different lengths (d vs n)",
             "dist(x, y) needs rows of equal length, e.g. dist(Q, K)"),
    "where": ("where(j <= i, Q, K @ Q^T) @ V", "where() needs shapes that match or broadcast (dim 1: n vs d)",
              "elementwise operations take equal shapes, scalars, or (x, 1)/(1, x) rows and columns; "
              "a '@' or '^T' may be missing"),
}


def test_every_entry_has_a_reference():
    assert set(REFERENCE) == set(structural.BY_NAME) == set(BAD_SHAPE)


def test_flops_of_scale_as_written():
    from attnc.compiler.report import flops_at
    g = _as_written(REFERENCE["scale"][0]).simplified
    assert flops_at(g, N, D) == 2 * N * N * D + N * N + 5 * N * N + 2 * N * N * D


@pytest.mark.parametrize("formula", ["softmax(cos(Q @ K^T, Q @ K^T)) @ V", "dist(Q @ K^T, K @ Q^T) @ V"])
def test_pairwise_of_attention_rows_falls_back_for_its_operand(formula):
    """cos / dist of n-long rows: the plan names the operand that needs an n x n matrix (the
    'product of n x n matrices' reason is matmul's)."""
    from attnc.kernels import explain
    reason = [ln for ln in explain(attnc.analyze(formula)).splitlines() if ln.startswith("reason:")]
    assert reason == ["reason: the query operand q' (Q @ K^T) depends on an n x n matrix"]


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, N, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _as_written(formula):
    """The formula compiled from its checked graph as written, without the SymPy rules (the
    graph the backends get when a simplified form has no IR): scale(x), for one, survives only
    here, since the rules turn it into a coefficient."""
    a = attnc.analyze(formula)
    return dataclasses.replace(a, simplified=a.graph)


def _build(analysis, backend):
    return api._compile_analysis(analysis, backend, None, {})


@pytest.mark.parametrize("as_written", [False, True], ids=["simplified", "as_written"])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_torch_backend_matches_numpy(name, as_written):
    formula, np_ref, _, _ = REFERENCE[name]
    a = _as_written(formula) if as_written else attnc.analyze(formula)
    if as_written or name != "scale":
        assert name in _ops_used(a.simplified), "the compiled graph must use the entry"
    q, k, v = _inputs(torch.float64)
    out = _build(a, "torch")(q=q, k=k, v=v)
    want = np_ref(q.numpy(), k.numpy(), v.numpy())
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("as_written", [False, True], ids=["simplified", "as_written"])
def test_fused_kernel_matches_numpy_and_torch_gradients(name, as_written):
    formula, np_ref, t_ref, _ = REFERENCE[name]
    a = _as_written(formula) if as_written else attnc.analyze(formula)
    fn = _build(a, "triton")
    assert fn.plan == "streaming", f"{formula} must run in the fused kernel"
    ins = _inputs(torch.float32, seed=1)
    q, k, v = (t.clone().requires_grad_() for t in ins)
    out = fn(q=q, k=k, v=v)
    want = np_ref(*(t.double().numpy() for t in ins))
    np.testing.assert_allclose(out.detach().double().numpy(), want, rtol=2e-4, atol=2e-5)
    q64, k64, v64 = (t.double().requires_grad_() for t in ins)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t_ref(q64, k64, v64).backward(grad)
    out.backward(grad.float())
    for mine, ref, label in ((q.grad, q64.grad, "dQ"), (k.grad, k64.grad, "dK"), (v.grad, v64.grad, "dV")):
        torch.testing.assert_close(mine.double(), ref, rtol=2e-4, atol=5e-5, msg=f"{name}: {label}")


@pytest.mark.parametrize("name", sorted(n for n, r in REFERENCE.items() if r[3] is not None))
def test_flops_match_a_count_by_hand(name):
    formula, _, _, flops = REFERENCE[name]
    assert report(attnc.analyze(formula), n=N, d=D, heads=1).flops == flops


def test_where_flops_count_by_hand():
    # j <= i: the comparison over (n, n), where over (n, n), plus softmax and two matmuls
    got = report(attnc.analyze(REFERENCE["where"][0]), n=N, d=D, heads=1).flops
    assert got == 2 * N * N * D + N * N + N * N + 5 * N * N + 2 * N * N * D


@pytest.mark.parametrize("name", sorted(BAD_SHAPE))
def test_shape_rule_rejects_a_wrong_shape(name):
    formula, message, hint = BAD_SHAPE[name]
    with pytest.raises(ShapeError) as e:
        attnc.analyze(formula)
    assert e.value.args[0].startswith(message)
    assert e.value.hint == hint


def test_structural_ops_are_named_in_one_place():
    """Outside compiler/structural.py (and the IR's enum) a structural operation's Op member
    appears only where the grammar spells it (parser: '@', '^T'), where SymPy's own MatMul /
    Transpose come back as IR (to_ir), and in the fused kernel's skeleton (kernels/: the one
    `weights @ values` product, the online softmax, the where mask's blocks). A new mention
    elsewhere means a stage grew its own copy of an operation's logic."""
    root = Path(attnc.__file__).resolve().parents[1]
    allowed = {
        "MATMUL": {"grammar/parser.py", "compiler/to_ir.py", "kernels/plan.py", "kernels/lower.py"},
        "TRANSPOSE": {"grammar/parser.py", "compiler/to_ir.py"},
        "SOFTMAX": {"kernels/plan.py"},
        "WHERE": {"kernels/lower.py", "kernels/structure.py"},
        "SCALE": set(), "NORM": set(), "COS": set(), "DIST": set(),
    }
    assert set(allowed) == {spec.op.name for spec in structural.TABLE.values()}
    for op, ok in allowed.items():
        found = set()
        for folder in ("grammar", "compiler", "kernels", "runtime", "search", "attnc"):
            for path in (root / folder).rglob("*.py"):
                rel = path.relative_to(root).as_posix()
                if rel in ("compiler/structural.py", "compiler/ir.py"):
                    continue
                if re.search(rf"\bOp\.{op}\b", path.read_text()):
                    found.add(rel)
        assert found <= ok, f"Op.{op} is also named in {sorted(found - ok)}"
    # nor are their SymPy classes used (constructed or tested with isinstance) anywhere else
    classes = "|".join(spec.expr_cls.__name__ for spec in structural.BY_EXPR.values())
    used = re.compile(rf"\b({classes})\(|isinstance\([^)]*\b({classes})\b")
    for folder in ("grammar", "compiler", "kernels", "runtime", "search", "attnc"):
        for path in (root / folder).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if rel != "compiler/structural.py":
                assert not used.search(path.read_text()), f"{rel} uses a structural op's SymPy class"


def _ops_used(g):
    from attnc.compiler.ir import topo
    return {structural.get(node.op).name for _, node in topo(g) if structural.get(node.op) is not None}
