"""The trainer on a CUDA device (marked gpu: skipped without CUDA; `pytest -m gpu` on a GPU machine)."""
from __future__ import annotations

import pytest
import runtime_helpers as H
import torch
from attnc.runtime import AttncBertForMaskedLM, plan_summary
from attnc.runtime.trainer import MLMData, TrainConfig, train

pytestmark = pytest.mark.gpu

FUSED = "softsign(cos(Q, K)) @ V"
LAYERS = [{"type": "attention"}, {"type": "attention", "formula": FUSED},
          {"type": "attention", "formula": H.P_FORMULA}, {"type": "conv", "kernel_size": 5}]


class _Tok:
    """The few tokenizer fields MLMData needs, for a 120-token toy vocabulary."""

    pad_token_id, mask_token_id, cls_token_id, sep_token_id = 0, 1, 2, 3
    all_special_ids = [0, 1, 2, 3]

    def __len__(self):
        return 120


def _blocks(n=256, seq=32):
    """Counting sequences from random starts: a masked token follows from its neighbours."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 116, (n, 1), generator=g)
    b = 4 + (start + torch.arange(seq)) % 116
    b[:, 0], b[:, -1] = 2, 3
    return b


def _model(**kw):
    torch.manual_seed(0)
    return AttncBertForMaskedLM(H.tiny_hybrid(layers=LAYERS, **kw))


def test_auto_device_places_everything_on_cuda_and_runs_triton():
    model = _model()
    seen = []

    class Where:
        def on_step(self, step, loss, state):
            seen.append({p.device.type for p in state["model"].parameters()})

    r = train(model, MLMData(_blocks(), _Tok()), TrainConfig(steps=3, batch_size=8), callbacks=[Where()])
    assert r.metrics["device"].startswith("cuda") and seen == [{"cuda"}] * 3
    summary = plan_summary(r.model)
    assert "-> sdpa" in summary and "-> triton-fused" in summary, summary


def test_triton_training_step_matches_the_torch_backend_on_cuda():
    ref = _model(attention_backend="torch", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).cuda()
    tri = _model(attention_backend="triton", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).cuda()
    tri.load_state_dict(ref.state_dict())
    assert tri.bert.encoder.layer[1].attention.self.plan("cuda") == "triton-fused"
    assert ref.bert.encoder.layer[1].attention.self.plan("cuda") == "torch"
    ids = _blocks(4, 32).cuda()
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 1] = ids[0, 1]
    out = {}
    for name, m in (("torch", ref), ("triton", tri)):
        loss = m.mlm_loss(ids, mask, labels)
        loss.backward()
        out[name] = (float(loss.detach()), m.bert.encoder.layer[1].attention.self.query.weight.grad.clone())
    assert abs(out["triton"][0] - out["torch"][0]) < 1e-3
    assert torch.allclose(out["triton"][1], out["torch"][1], atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(precision):
    # fp32 on the same weights and batches is the reference: the low-precision run must learn as it does
    cfg = dict(steps=100, batch_size=16, lr=2e-3, warmup=0.1, eval_at_start=True, device="cuda")
    f32 = train(_model(), MLMData(_blocks(), _Tok()), TrainConfig(**cfg)).metrics
    low = train(_model(), MLMData(_blocks(), _Tok()), TrainConfig(precision=precision, **cfg)).metrics
    assert low["precision"] == precision
    assert abs(low["losses"][0] - f32["losses"][0]) < 0.05    # same weights and batch, lower precision
    assert low["losses"][0] != f32["losses"][0]               # but really computed in low precision
    learned = f32["evals"][0]["loss"] - f32["final_eval"]["loss"]
    assert learned > 0.05                                     # the reference run learns something
    assert abs(low["final_eval"]["loss"] - f32["final_eval"]["loss"]) < 0.25 * learned
