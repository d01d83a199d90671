"""Hypothesis-generated streaming-class formulas: classified streaming, forward and backward
against the torch backend (float64 golden discipline, see kernel_catalogue)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from attnc.kernels import classify
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from kernel_catalogue import check_formula

import attnc

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

Q_SIDE = ["Q", "softplus(Q)", "Q + P", "Q / norm(Q)", "sigmoid(Q) * 2", "Q * (i + 1) / n", "tanh(Q) - Q"]
K_SIDE = ["K", "softplus(K)", "K + V", "K / sqrt(d) + P", "exp(K / 4)", "abs(K)"]
VALUES = ["V", "K + Q", "exp(V / 4)", "V * sigmoid(P)", "softmax(V)"]


@st.composite
def streaming_formulas(draw):
    q = draw(st.sampled_from(Q_SIDE))
    k = draw(st.sampled_from(K_SIDE))
    transposed_form = draw(st.booleans())
    kt = f"({k})^T" if transposed_form else "(" + k.replace("K", "K^T").replace("V", "V^T").replace("P", "P^T") + ")"
    score = draw(st.sampled_from([f"({q}) @ {kt}", f"cos({q}, {k})", f"-dist({q}, {k})"]))
    score = draw(st.sampled_from(["{s}", "{s} / sqrt(d)", "{s} - 0.25 * abs(i - j)",
                                  "mask({s}, j <= i)", "0.5 * {s} + 1"])).format(s=score)
    masked = score.startswith("mask(")
    norms = ["softmax({z})", "sigmoid({z})"] + ([] if masked else ["softsign({z}) / n", "({z}) / n"])
    weights = draw(st.sampled_from(norms)).format(z=score)
    value = draw(st.sampled_from(VALUES))
    out = draw(st.sampled_from(["{m}", "{m} + Q", "2 * {m}"])).format(m=f"({weights}) @ ({value})")
    return out


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch, tmp_path_factory):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnc-cache"))


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(formula=streaming_formulas(), n=st.sampled_from([5, 13, 17]), mask=st.sampled_from([None, "pad"]))
def test_generated_streaming_formulas(formula, n, mask):
    a = attnc.analyze(formula)
    c = classify(a.simplified)
    # a linear score without normalisation is reassociated by the simplifier into
    # Q' @ (K'^T @ V') (linear attention): cheaper unfused, so it is not streamed
    assume(c.streaming or "linear attention" not in (c.reason or ""))
    assert c.streaming, (formula, a.canonical, c.reason)
    check_formula(formula, n=n, d=16, mask=mask)
