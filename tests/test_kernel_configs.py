"""Numerics at the configs the tuner can pick, not only at the one the other kernel tests run.

The catalogue tests run 16 x 16 blocks under the CPU interpreter and, on a GPU, the default config
(autotuning off). Here each kernel is launched at every config of its space in turn (on a GPU:
all of them, warps and stages included; under the interpreter: each distinct block shape, which
is what changes the generated code's behaviour there: uneven blocks, dK/dV's keys x queries tiles
with BLOCK_M != BLOCK_N, partial and skipped causal blocks), and the output and every input
gradient must match the float64 golden within the catalogue's rule."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_catalogue import BY_NAME, check_formula

from attnc.kernels import tune

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
              pytest.mark.usefixtures("kernel_env")]

HAS_CUDA = torch.cuda.is_available()
FAMILY = tune.target_family() if HAS_CUDA else "sm90"
N = 150          # several blocks of every size, the last one partial


def _space(kind: str) -> list[tune.Config]:
    cs = tune.configs(kind, head_dim=32, dtype="float16", n=N, target=FAMILY)
    if HAS_CUDA:
        return cs
    shapes = dict.fromkeys((c.block_m, c.block_n) for c in cs)
    return [tune.Config(bm, bn, 1, 1) for bm, bn in shapes]


PROFILES = max(len(_space(k)) for k in tune.SPACE)


@pytest.mark.parametrize("formula", ["causal_alibi", "epilogue_gate", "autobert_l2_simplified", "sigmoid"])
@pytest.mark.parametrize("profile", range(PROFILES))
def test_every_config_of_the_space(monkeypatch, formula, profile):
    picked = {}

    def config(self, kernel_name, run, **kw):
        space = _space(tune.KINDS[kernel_name])
        picked[kernel_name] = c = space[profile % len(space)]
        return c

    monkeypatch.setattr(tune.Tuner, "config", config)
    case = BY_NAME[formula]
    dtype = torch.float16 if HAS_CUDA else torch.float32
    check_formula(case.formula, n=N, d=32, dtype=dtype, mask="pad", batch=2, heads=1)
    assert "_attn_fwd" in picked and "_attn_bwd_dkv" in picked, picked
