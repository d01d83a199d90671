"""attnc.runtime.trainer: the one loop behind pretrain, finetune and KD (tiny models, CPU)."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import runtime_helpers as H
import torch
from attnc.compiler.errors import ConfigError
from attnc.runtime import AttncBertForMaskedLM, AttncBertForSequenceClassification, resolve_config
from attnc.runtime import data as D
from attnc.runtime.trainer import ClassificationData, DistillConfig, MLMData, TrainConfig, train

TINY = "2-64-128-2-64"


@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer()


@pytest.fixture(scope="module")
def blocks(tok):
    return D.cached_blocks("wiki-sample", tok, 32)


def _mlm(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return AttncBertForMaskedLM(resolve_config(TINY, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **kw))


def test_mlm_training_lowers_held_out_loss(tok, blocks):
    r = train(_mlm(tok), MLMData(blocks, tok), TrainConfig(steps=40, batch_size=16, lr=2e-3,
                                                           eval_at_start=True, eval_every=20))
    m = r.metrics
    assert [e["step"] for e in m["evals"]] == [0, 20, 40]
    assert m["final_eval"]["loss"] < m["evals"][0]["loss"] - 0.5, m["evals"]
    assert m["best_eval"]["loss"] == min(e["loss"] for e in m["evals"])
    assert m["tokens"] == 40 * 16 * 32 and m["stopped"] == "steps"


def test_cached_blocks_equal_make_blocks_and_are_reused(tok, blocks, monkeypatch):
    ref = D.make_blocks(D.load_corpus("wiki-sample"), tok, 32)["input_ids"]
    assert torch.equal(blocks, torch.tensor(list(ref)))
    # a second call only reads the cache: building again would fail here
    monkeypatch.setattr(D, "make_blocks", lambda *a, **k: pytest.fail("blocks rebuilt"))
    assert torch.equal(D.cached_blocks("wiki-sample", tok, 32), blocks)
    other = D.train_wordpiece(["a b c d e f g"] * 20, vocab_size=60)   # another vocab: another key
    assert D.tokenizer_hash(other) != D.tokenizer_hash(tok)


def _cls_data(tok, n=160):
    t = D.load_task("rt-polarity")
    return ClassificationData(t, tok, 24, max_train=n, max_eval=64)


def _cls_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = resolve_config(TINY, vocab_size=len(tok), num_labels=2, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return AttncBertForSequenceClassification(cfg)


def test_grad_accum_equals_one_big_batch(tok):
    """2 micro-batches of 8 per step == 1 batch of 16 (same rows; dropout off): same losses."""
    data = _cls_data(tok)
    a = train(_cls_model(tok), data, TrainConfig(steps=6, batch_size=16, lr=1e-3)).metrics["losses"]
    b = train(_cls_model(tok), data, TrainConfig(steps=6, batch_size=8, grad_accum=2, lr=1e-3)).metrics["losses"]
    assert np.allclose(a, b, rtol=1e-4, atol=1e-5), (a, b)


def test_classification_metric_matches_an_independent_evaluation(tok):
    from sklearn.metrics import accuracy_score

    data = _cls_data(tok)
    r = train(_cls_model(tok), data, TrainConfig(steps=5, batch_size=16, lr=1e-3))
    rows = data.dev_rows["validation"]
    model = r.model.eval()
    preds = []
    with torch.no_grad():
        for row in rows:   # one example at a time: no padding involved
            ids = torch.tensor([row["input_ids"]])
            preds.append(int(model(input_ids=ids, token_type_ids=torch.tensor([row["token_type_ids"]]))
                             .logits.argmax(-1)))
    assert r.metrics["final_eval"]["accuracy"] == pytest.approx(
        accuracy_score([x["label"] for x in rows], preds))


def test_callbacks_early_stopping_and_time_budget(tok, blocks):
    seen = []

    class Stop:
        def on_step(self, step, loss, state):
            seen.append((step, loss))
            return "stop" if step == 3 else None

    r = train(_mlm(tok), MLMData(blocks, tok), TrainConfig(steps=50, batch_size=4), callbacks=[Stop()])
    assert r.metrics["stopped"] == "callback" and r.metrics["steps"] == 3
    assert [s for s, _ in seen] == [1, 2, 3] and [x for _, x in seen] == r.metrics["losses"]
    # lr 0: the eval loss never improves, so patience 2 stops after the 3rd evaluation
    r = train(_mlm(tok), MLMData(blocks, tok), TrainConfig(steps=50, batch_size=4, lr=0.0, eval_every=1,
                                                           early_stopping_patience=2))
    assert r.metrics["stopped"] == "early_stopping" and r.metrics["steps"] == 3
    r = train(_mlm(tok), MLMData(blocks, tok), TrainConfig(steps=10_000, batch_size=4, time_budget_s=0.5))
    assert r.metrics["stopped"] == "time_budget" and r.metrics["steps"] < 10_000


def test_bf16_autocast_on_cpu_tracks_fp32(tok, blocks):
    cfg = dict(steps=12, batch_size=8, lr=2e-3, eval_at_start=True)
    f = train(_mlm(tok), MLMData(blocks, tok), TrainConfig(**cfg)).metrics
    b = train(_mlm(tok), MLMData(blocks, tok), TrainConfig(precision="bf16", **cfg)).metrics
    assert b["precision"] == "bf16"
    assert abs(b["losses"][0] - f["losses"][0]) < 0.05          # same weights, same batch
    assert b["losses"][0] != f["losses"][0]                      # but really computed in bf16
    assert b["final_eval"]["loss"] < b["evals"][0]["loss"] - 0.2


def test_bad_device_and_precision_are_config_errors(tok, blocks, monkeypatch):
    data = MLMData(blocks, tok)
    with pytest.raises(ConfigError, match="unknown device"):
        train(_mlm(tok), data, TrainConfig(steps=1, device="tpu:x"))
    with pytest.raises(ConfigError, match="bf16 on the CPU"):
        train(_mlm(tok), data, TrainConfig(steps=1, device="cpu", precision="fp16"))
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(_mlm(tok), data, TrainConfig(steps=1, device="cuda"))


def test_cli_bad_device_exits_2(tmp_path):
    env_py = [sys.executable, "-m", "attnc", "pretrain", "--model", TINY, "--steps", "1", "--out",
              str(tmp_path / "x"), "--device", "cpu", "--precision", "fp16", "--no-progress"]
    p = subprocess.run(env_py, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "bf16" in p.stderr and "Traceback" not in p.stderr


def test_wrong_head_for_the_data_is_a_config_error(tok, blocks):
    with pytest.raises(ConfigError, match="classification head"):
        train(_mlm(tok), _cls_data(tok, 16), TrainConfig(steps=1))
    with pytest.raises(ConfigError, match="MLM head"):
        train(_cls_model(tok), MLMData(blocks, tok), TrainConfig(steps=1))


# ---- plans, dropout, the Triton path -----------------------------------------------------------

UNFUSABLE = "softmax(Q @ K^T) @ (softmax(Q @ K^T) @ V)"
FUSED = "softsign(cos(Q, K)) @ V"


def test_plan_shows_what_runs_and_warns_with_the_reason(monkeypatch):
    from attnc.runtime import plan_summary

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layers = [{"type": "attention"}, {"type": "attention", "formula": UNFUSABLE},
              {"type": "attention", "formula": FUSED}, {"type": "conv", "kernel_size": 3}]
    m = AttncBertForMaskedLM(H.tiny_hybrid(layers=layers, attention_backend="triton"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        text = plan_summary(m)
    lines = text.splitlines()
    assert lines[1].endswith("-> sdpa") and lines[3].endswith("-> triton-fused")
    assert "torch (triton cannot fuse it: " in lines[2] and "conv" in lines[4]
    assert sum("cannot be fused" in str(x.message) for x in w) == 1
    assert "runs='triton-fused'" in repr(m.bert.encoder.layer[2].attention.self)


def test_code_generation_errors_are_raised(monkeypatch):
    import attnc

    def broken(*a, **k):
        raise AttributeError("codegen bug")

    monkeypatch.setattr(attnc, "compile", broken)
    m = AttncBertForMaskedLM(H.tiny_hybrid(layers=[{"type": "attention", "formula": FUSED}], num_hidden_layers=1))
    with pytest.raises(AttributeError, match="codegen bug"):
        m(input_ids=torch.randint(5, 100, (2, 8)))


def test_training_step_through_the_triton_kernels_matches_the_torch_path(monkeypatch):
    """Same weights, same batch: a train step on the Triton path (interpreter) == the torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layers = [{"type": "attention", "formula": FUSED}, {"type": "attention", "formula": H.P_FORMULA}]
    cfgs = {b: H.tiny_hybrid(layers=layers, num_hidden_layers=2, attention_backend=b, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0) for b in ("torch", "triton")}
    torch.manual_seed(0)
    ref = AttncBertForMaskedLM(cfgs["torch"])
    tri = AttncBertForMaskedLM(cfgs["triton"])
    tri.load_state_dict(ref.state_dict())
    assert tri.bert.encoder.layer[0].attention.self.plan("cpu") == "triton-fused"
    ids = torch.randint(5, 120, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    grads = {}
    for name, m in (("torch", ref), ("triton", tri)):
        loss = m.mlm_loss(ids, mask, labels)
        loss.backward()
        grads[name] = (float(loss.detach()), m.bert.encoder.layer[0].attention.self.query.weight.grad.clone())
    assert grads["triton"][0] == pytest.approx(grads["torch"][0], abs=1e-4)
    assert torch.allclose(grads["triton"][1], grads["torch"][1], atol=1e-4)


def test_one_dropout_setting_for_sdpa_and_compiled_attention():
    """Training mode: the SDPA path and the compiled path of the standard formula apply the same
    dropout (on the head outputs), so with the same RNG state they give the same output."""
    cfg = H.tiny_hybrid(layers=[{"type": "attention"}], num_hidden_layers=1, attention_probs_dropout_prob=0.3)
    att = AttncBertForMaskedLM(cfg).bert.encoder.layer[0].attention.self.train()
    x = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    torch.manual_seed(1)
    a = att(x, mask, use_sdpa=True)
    torch.manual_seed(1)
    b = att(x, mask, use_sdpa=False)
    torch.manual_seed(2)
    c = att(x, mask, use_sdpa=False)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)              # padded query rows hold no meaning
    assert not torch.allclose(b, c)                               # dropout is on in training
    assert float((b == 0).float().mean()) > 0.15                  # ~30% of the outputs dropped
    att.eval()
    assert torch.equal(att(x, mask, use_sdpa=False), att(x, mask, use_sdpa=False))


# ---- distillation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from attnc.runtime.train import load_teacher

    return load_teacher("minilm-l6")


def test_kd_lowers_the_distillation_loss_with_minilm(tok, blocks, minilm):
    student = _mlm(tok)
    r = train(student, MLMData(blocks, tok), TrainConfig(steps=30, batch_size=8, lr=3e-3),
              teacher=minilm, distill=DistillConfig(hidden_mse=1.0, task_loss=0.0))
    d = r.metrics["distill_losses"]
    assert np.mean(d[-5:]) < 0.7 * np.mean(d[:5]), d
    assert all(not p.requires_grad for p in minilm.parameters()) and not minilm.training


def test_attention_score_kd_matches_a_hand_computation_and_lowers(tok, blocks, minilm):
    # a student with the teacher's 12 heads and standard attention in its last layer
    torch.manual_seed(0)
    student = AttncBertForMaskedLM(resolve_config("2-48-96-12-48", vocab_size=len(tok)))
    from attnc.runtime.trainer import _Distiller

    d = _Distiller(minilm, student, DistillConfig(hidden_mse=0.0, attn_mse=1.0))
    ids = blocks[:2, :16].clone()
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    got = d({"input_ids": ids, "attention_mask": mask}, out.hidden_states[-1], None)
    d.close()
    # by hand: the last layers' inputs are hidden_states[-2]; scores q k^T / sqrt(dh) per head
    def scores(att, x):
        B, n, _ = x.shape
        q = att.query(x).view(B, n, 12, -1).transpose(1, 2)
        k = att.key(x).view(B, n, 12, -1).transpose(1, 2)
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    with torch.no_grad():
        t_in = minilm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        ts = scores(minilm.encoder.layer[-1].attention.self, t_in)
        ss = scores(student.bert.encoder.layer[-1].attention.self, out.hidden_states[-2])
    real = mask.bool()
    keep = (real[:, None, :, None] & real[:, None, None, :]).expand_as(ss)
    assert torch.allclose(got, ((ss - ts)[keep] ** 2).mean(), rtol=1e-5)
    assert not minilm.encoder.layer[-1].attention.self._forward_pre_hooks     # hooks removed
    r = train(student, MLMData(blocks, tok), TrainConfig(steps=30, batch_size=8, lr=3e-3),
              teacher=minilm, distill=DistillConfig(hidden_mse=0.0, attn_mse=1.0, task_loss=0.0))
    dl = r.metrics["distill_losses"]
    # distillation alone reads the unmasked text (issue 20); measured: 1.67 -> 1.30 over 30 steps
    assert np.mean(dl[-5:]) < 0.85 * np.mean(dl[:5]), dl


def test_attention_score_kd_needs_the_teachers_head_count(tok, minilm):
    torch.manual_seed(0)
    student = AttncBertForMaskedLM(resolve_config("2-48-96-4-48", vocab_size=len(tok)))
    from attnc.runtime.trainer import _Distiller

    with pytest.raises(ConfigError, match="12"):
        _Distiller(minilm, student, DistillConfig(attn_mse=1.0))


def test_teacher_with_another_vocab_is_a_config_error(blocks, minilm):
    small = D.train_wordpiece(["the cat sat on the mat"] * 50, vocab_size=80)
    torch.manual_seed(0)
    student = AttncBertForMaskedLM(resolve_config(TINY, vocab_size=len(small)))
    with pytest.raises(ConfigError, match="vocabulary"):
        train(student, MLMData(blocks.clamp(max=len(small) - 1), small), TrainConfig(steps=1),
              teacher=minilm)


def test_a_given_fit_layer_starts_the_distillation(tok, blocks, minilm):
    """distill_fit= is the fit layer the distillation starts from (a SuperPLM's, sliced): the first
    step's hidden MSE is computed through it, not through a fresh random one; a wrong shape is a
    ConfigError."""
    from attnc.runtime.trainer import _Distiller

    torch.manual_seed(0)
    student = AttncBertForMaskedLM(resolve_config("2-48-96-12-48", vocab_size=len(tok)))
    fit = torch.nn.Linear(48, 384)
    with torch.no_grad():
        fit.weight.fill_(0.0)
        fit.bias.fill_(0.0)
    d = _Distiller(minilm, student, DistillConfig(hidden_mse=1.0, task_loss=0.0), fit)
    assert d.fit is fit
    d.close()
    r = train(student, MLMData(blocks, tok), TrainConfig(steps=1, batch_size=8, lr=1e-9),
              teacher=minilm, distill=DistillConfig(hidden_mse=1.0, task_loss=0.0), distill_fit=fit)
    # a zero fit layer predicts 0: the first loss is the mean square of the teacher's hidden states
    # on the unmasked text (distillation alone: no [MASK] tokens, issue 20)
    from attnc.runtime.trainer import unmasked

    with torch.no_grad():
        b = MLMData(blocks, tok)
        b.split(0)
        batch = unmasked(b.train_batch(0, 8, 0))
        hs = minilm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert r.metrics["distill_losses"][0] == pytest.approx(float((hs ** 2).mean()), rel=1e-4)
    with pytest.raises(ConfigError, match="fit layer"):
        _Distiller(minilm, student, DistillConfig(hidden_mse=1.0), torch.nn.Linear(32, 384))
