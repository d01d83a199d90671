"""attnc.runtime model: BERT equivalence, HF Auto* round trips, counters, conv layers, bad configs."""
from __future__ import annotations

import copy

import pytest
import runtime_helpers as H
import torch
from attnc.compiler.errors import ConfigError
from attnc.runtime import (
    AUTOBERT_ZERO_FORMULAS,
    STANDARD_FORMULA,
    AttncBertConfig,
    AttncBertForMaskedLM,
    AttncBertForPreTraining,
    AttncBertForSequenceClassification,
    AttncBertModel,
    count_flops,
    count_parameters,
    flops_breakdown,
    from_bert,
    parse_arch,
    resolve_config,
)
from attnc.runtime.modeling import LightweightConv, lightweight_conv_reference


def _inputs(vocab=120, batch=3, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    if batch >= 3:
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


# ---- equivalence with transformers.BertModel -----------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("sdpa_path", [True, False])
def test_equivalent_to_bert_model(impl, sdpa_path):
    from transformers import BertModel

    bc = H.tiny_bert_config()
    bc._attn_implementation = impl
    torch.manual_seed(0)
    bert = BertModel(bc).eval()
    ours = from_bert(bert)
    for layer in ours.encoder.layer:
        layer.attention.self.use_sdpa = sdpa_path
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = bert(ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, attention_mask=mask, token_type_ids=types)
        ref0, out0 = bert(ids).last_hidden_state, ours(ids).last_hidden_state   # no mask, no types
    assert (ref.last_hidden_state - out.last_hidden_state).abs().max() <= 1e-5   # padding included
    assert (ref.pooler_output - out.pooler_output).abs().max() <= 1e-5
    assert (ref0 - out0).abs().max() <= 1e-5


def test_fast_and_compiled_paths_agree_with_grads():
    cfg = resolve_config("2-32-48-4-32", vocab_size=120, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AttncBertModel(cfg)
    ids, mask, _ = _inputs()
    outs, grads = [], []
    for path in (True, False):
        for layer in model.encoder.layer:
            layer.attention.self.use_sdpa = path
        model.zero_grad()
        y = model(ids, attention_mask=mask).last_hidden_state
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append(model.encoder.layer[0].attention.self.query.weight.grad.clone())
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert (grads[0] - grads[1]).abs().max() <= 1e-4


def test_from_pretrained_on_a_standard_bert_folder(tmp_path):
    from transformers import BertForMaskedLM, BertModel

    torch.manual_seed(1)
    BertForMaskedLM(H.tiny_bert_config()).save_pretrained(tmp_path)
    ids, mask, types = _inputs()
    bert = BertModel.from_pretrained(tmp_path).eval()
    ours = AttncBertModel.from_pretrained(tmp_path).eval()
    assert ours.config.model_type == "attnc_bert"
    assert all(s["formula"] == STANDARD_FORMULA for s in ours.config.layers)
    mlm_ref = BertForMaskedLM.from_pretrained(tmp_path).eval()
    mlm = AttncBertForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = bert(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        b = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        c = mlm_ref(ids, attention_mask=mask).logits
        d = mlm(ids, attention_mask=mask).logits
    assert (a - b).abs().max() <= 1e-5
    assert (c - d).abs().max() <= 1e-5


# ---- Hugging Face Auto* round trips -----------------------------------------------------------------


def test_auto_classes_round_trip(tmp_path):
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForPreTraining,
        AutoModelForSequenceClassification,
    )

    cfg = H.tiny_hybrid()
    torch.manual_seed(0)
    mlm = AttncBertForMaskedLM(cfg).eval()
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight  # tied
    mlm.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layers == cfg.layers
    back = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(back) is AttncBertForMaskedLM
    ids, mask, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(back(ids, attention_mask=mask).logits, mlm(ids, attention_mask=mask).logits)
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is AttncBertModel
        assert torch.equal(base(ids, attention_mask=mask).last_hidden_state,
                           mlm.bert(ids, attention_mask=mask).last_hidden_state)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(clf) is AttncBertForSequenceClassification and clf.classifier.out_features == 3
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path)) is AttncBertForPreTraining


def test_heads_forward_and_losses():
    cfg = H.tiny_hybrid()
    ids, mask, types = _inputs()
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    pt = AttncBertForPreTraining(cfg)
    out = pt(ids, attention_mask=mask, token_type_ids=types, labels=labels,
             next_sentence_label=torch.tensor([0, 1, 0]))
    assert out.prediction_logits.shape == (3, 11, 120) and out.seq_relationship_logits.shape == (3, 2)
    assert torch.isfinite(out.loss)
    mlm = AttncBertForMaskedLM(cfg).eval()
    with torch.no_grad():
        full = mlm(ids, attention_mask=mask, labels=labels).loss
        fast = mlm.mlm_loss(ids, mask, labels)
    assert torch.allclose(full, fast, atol=1e-5)
    reg = AttncBertForSequenceClassification(AttncBertConfig(**{**cfg.to_dict(), "num_labels": 1}))
    r = reg(ids, attention_mask=mask, labels=torch.tensor([0.5, 1.0, 2.0]))
    assert r.logits.shape == (3, 1) and torch.isfinite(r.loss)
    hs = mlm.bert(ids, output_hidden_states=True).hidden_states
    assert len(hs) == cfg.num_hidden_layers + 1


def test_padding_contributes_nothing_in_hybrid():
    cfg = H.tiny_hybrid()
    torch.manual_seed(0)
    model = AttncBertModel(cfg).eval()
    ids, _, _ = _inputs(batch=1, n=6)
    junk = torch.randint(1, 120, (1, 5))
    padded = torch.cat([ids, junk], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = model(padded, attention_mask=mask).last_hidden_state[:, :6]
    assert (a - b).abs().max() <= 1e-5


def test_deepcopy_and_compiled_backend_is_torch_on_cpu():
    model = AttncBertModel(H.tiny_hybrid())
    ids, mask, _ = _inputs()
    model(ids, attention_mask=mask)
    att = model.encoder.layer[0].attention.self
    assert att.compiled_for(torch.device("cpu")).backend == "torch"
    assert not att.use_sdpa and model.encoder.layer[2].attention.self.use_sdpa
    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(twin(ids, attention_mask=mask).last_hidden_state,
                           model(ids, attention_mask=mask).last_hidden_state)


# ---- lightweight convolution ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 7, 65])
def test_lightweight_conv_matches_reference(k):
    cfg = AttncBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=16, qkv_size=12, attention_probs_dropout_prob=0.0,
                          layers=[{"type": "conv", "kernel_size": k}])
    torch.manual_seed(0)
    conv = LightweightConv(cfg, cfg.layers[0])
    torch.nn.init.normal_(conv.kernel)
    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    assert (conv(x, mask) - conv(x, mask, reference=True)).abs().max() <= 1e-5
    w = torch.softmax(conv.kernel, -1)
    assert torch.allclose(w.sum(-1), torch.ones(4))
    # one kernel per head, shared by its 3 channels: a unit impulse in channel 0 and 2 spreads identically
    u = torch.zeros(1, 9, 12)
    u[0, 4, 0] = u[0, 4, 2] = 1
    y = lightweight_conv_reference(u, w)
    assert torch.equal(y[..., 0], y[..., 2])


# ---- counters -------------------------------------------------------------------------------------


def test_bert_base_parameter_count():
    assert count_parameters(resolve_config("bert-base")) == 109_482_240
    assert count_parameters(resolve_config("12-768-3072-12-768")) == 109_482_240


def test_parameter_counts_match_built_models():
    from transformers import BertForMaskedLM, BertModel

    bc = H.tiny_bert_config()
    cfg = AttncBertConfig(**{k: v for k, v in bc.to_dict().items() if k != "model_type"})
    assert count_parameters(cfg) == sum(p.numel() for p in BertModel(bc).parameters())
    assert count_parameters(cfg, "mlm") == sum(p.numel() for p in BertForMaskedLM(bc).parameters())
    hy = H.tiny_hybrid()
    for cls, head in ((AttncBertModel, None), (AttncBertForMaskedLM, "mlm"),
                      (AttncBertForPreTraining, "pretraining"), (AttncBertForSequenceClassification,
                                                                 "classification")):
        assert count_parameters(hy, head) == sum(p.numel() for p in cls(hy).parameters()), cls


def test_two_input_formula_and_conv_have_fewer_parameters():
    dm, dq = 32, 24
    base = dict(vocab_size=50, hidden_size=dm, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=48, qkv_size=dq)
    std = AttncBertModel(AttncBertConfig(**base))
    two = AttncBertModel(AttncBertConfig(**base, layers=[{"formula": AUTOBERT_ZERO_FORMULAS[0]}]))
    conv = AttncBertModel(AttncBertConfig(**base, layers=[{"type": "conv", "kernel_size": 9}]))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(std) - n(two) == dm * dq + dq                         # no value projection
    assert not hasattr(two.encoder.layer[0].attention.self, "value")
    # conv: GLU input projection dm -> 2 dq plus one K-tap kernel per head, instead of Q, K, V
    assert n(std) - n(conv) == 3 * (dm * dq + dq) - (dm * 2 * dq + 2 * dq + 4 * 9)
    assert count_parameters(conv.config) == n(conv)


def test_one_input_formula_is_a_layer_without_token_mixing():
    # search spaces may allow min_inputs=1 (e.g. `softsign(V)`); the model must build it, and such a
    # layer mixes nothing across positions: changing token 3 changes only position 3's output
    cfg = AttncBertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=48, layers=[{"formula": "softsign(V)"}],
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = AttncBertModel(cfg, add_pooling_layer=False).eval()
    assert not hasattr(m.encoder.layer[0].attention.self, "query")
    ids = torch.randint(1, 50, (1, 8))
    ids2 = ids.clone()
    ids2[0, 3] = (ids[0, 3] % 49) + 1
    with torch.no_grad():
        a, b = m(ids).last_hidden_state, m(ids2).last_hidden_state
    changed = (a - b).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [i == 3 for i in range(8)]


def test_autotinybert_shape():
    assert parse_arch("5-564-1054-8-512") == (5, 564, 1054, 8, 512)
    cfg = resolve_config("5-564-1054-8-512", vocab_size=1000)
    model = AttncBertModel(cfg)
    assert cfg.arch == "5-564-1054-8-512"
    assert model.encoder.layer[0].attention.self.query.weight.shape == (512, 564)
    assert model.encoder.layer[0].attention.output.dense.weight.shape == (564, 512)
    assert model.encoder.layer[0].intermediate.dense.weight.shape == (1054, 564)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_flops():
    """Exact forward FLOPs, computed here by hand from the documented convention (2 per
    multiply-add, 1 per arithmetic op or elementwise function, softmax 5, LayerNorm 5, GELU 8
    per entry); n differs from every width so that a mix-up of sizes changes the numbers."""
    def bert_base(n, L=12, dm=768, df=3072, heads=12, dh=64):
        return {"embeddings": 5 * n * dm,
                "projections": L * 3 * 2 * n * dm * dm,                      # Q, K, V
                "mixing": L * heads * (2 * n * n * dh + n * n + 5 * n * n + 2 * n * n * dh),
                "output": L * (2 * n * dm * dm + 5 * n * dm),                # dense + LayerNorm
                "ffn": L * (2 * n * dm * df + 8 * n * df + 2 * n * df * dm + 5 * n * dm)}

    for n in (128, 200):
        want = bert_base(n)
        want["total"] = sum(want.values())
        assert flops_breakdown(resolve_config("bert-base"), n) == want
        assert count_flops(resolve_config("bert-base"), n) == want["total"]
    assert count_flops(resolve_config("bert-base"), 128) == 22_411_444_224

    # tiny hybrid at n = 32, hidden 32, FFN 48; per layer (heads x head dim):
    n, dm, df = 32, 32, 48
    mixing = (4 * (2 * n * n * 6 + n * 6 + n * n + 5 * n * n + n * 6 + 2 * n * n * 6)  # softplus(K^T), K + Q
              + 2 * n * 24 * 5                                                   # conv, kernel 5, 24 channels
              + 4 * (2 * n * n * 6 + n * n + 5 * n * n + 2 * n * n * 6)           # standard
              + 2 * (2 * n * n * 8 + n * n + 5 * n * n + n * 8 + 2 * n * n * 8))  # ... @ (V + P)
    projections = (2 * 2 * n * dm * 24 + (2 * n * dm * 48 + n * 24) + 3 * 2 * n * dm * 24
                   + 4 * 2 * n * dm * 16)
    output = 3 * (2 * n * 24 * dm + 5 * n * dm) + (2 * n * 16 * dm + 5 * n * dm)
    ffn = 4 * (2 * n * dm * df + 8 * n * df + 2 * n * df * dm + 5 * n * dm)
    want = {"embeddings": 5 * n * dm, "projections": projections, "mixing": mixing, "output": output,
            "ffn": ffn}
    want["total"] = sum(want.values())
    hy = H.tiny_hybrid()
    assert flops_breakdown(hy, n) == want
    assert count_flops(hy, n) == want["total"] == 1_871_104


# ---- bad configs give clear errors -------------------------------------------------------------------


@pytest.mark.parametrize("make, words", [
    (lambda: AttncBertConfig(num_hidden_layers=1, layers=[{"type": "conv", "kernel_size": 4}]),
     ["kernel size 4", "3, 5, 7, 9, 15, 31, 65"]),
    (lambda: AttncBertConfig(num_hidden_layers=1, layers=[{"formula": "softmax(Q @ K^T"}]),
     ["layer 0", "bad attention formula"]),
    (lambda: AttncBertConfig(num_hidden_layers=1, layers=[{"formula": "softmax(Q @ X^T) @ V"}]),
     ["layer 0", "bad attention formula"]),
    (lambda: AttncBertConfig(num_attention_heads=5, qkv_size=768), ["not divisible by 5 heads"]),
    (lambda: resolve_config("5-564-1054-8-510"), ["not divisible by 8 heads"]),
    (lambda: resolve_config("5-564-1054-8"), ["malformed arch string"]),
    (lambda: parse_arch("5-564-x-8-512"), ["malformed arch string", "L-dm-df-h-dqkv"]),
    (lambda: parse_arch("0-564-1054-8-512"), ["must be positive"]),
    (lambda: AttncBertConfig(num_hidden_layers=2, layers=[{"type": "conv", "kernel_size": 3}]),
     ["1 layer specs for num_hidden_layers=2"]),
    (lambda: AttncBertConfig(num_hidden_layers=1, layers=[{"type": "mlp"}]), ["unknown layer type"]),
    (lambda: AttncBertConfig(num_hidden_layers=1, layers=[{"type": "conv", "kernel_size": 3,
                                                           "formula": "x"}]), ["unknown key(s) formula"]),
    (lambda: AttncBertConfig(attention_backend="cuda"), ["unknown attention_backend"]),
    (lambda: resolve_config("no-such-preset"), ["unknown model"]),
])
def test_bad_configs(make, words):
    with pytest.raises(ConfigError) as e:
        make()
    text = str(e.value)
    for w in words:
        assert w in text, text
    assert e.value.hint or "hint" in text or "parse error" in text


def test_resolve_config_sources(tmp_path):
    import json

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"arch": "2-32-48-4-16", "vocab_size": 99,
                             "layers": ["conv:3", {"formula": AUTOBERT_ZERO_FORMULAS[1]}]}))
    cfg = resolve_config(str(f))
    assert cfg.arch == "2-32-48-4-16" and cfg.vocab_size == 99
    assert cfg.layers[0] == {"type": "conv", "kernel_size": 3, "heads": 4, "qkv_size": 16}
    cfg2 = resolve_config("tiny-hybrid", layers=["std", "conv:65", "attn:" + AUTOBERT_ZERO_FORMULAS[0],
                                                 AUTOBERT_ZERO_FORMULAS[1]])
    assert [s["type"] for s in cfg2.layers] == ["attention", "conv", "attention", "attention"]
    cfg3 = resolve_config("2-32-48-4-16", formula=AUTOBERT_ZERO_FORMULAS[0])
    assert all(s["formula"] == AUTOBERT_ZERO_FORMULAS[0] for s in cfg3.layers)


def test_plain_import_attnc_registers_auto_classes_lazily(tmp_path):
    """`import attnc` is cheap (no transformers import) and still makes AutoModel load attnc."""
    import subprocess
    import sys

    from attnc.runtime import AttncBertModel, resolve_config
    AttncBertModel(resolve_config("bert-tiny")).save_pretrained(tmp_path)
    code = (
        "import sys, attnc\n"
        "assert 'transformers' not in sys.modules, 'import attnc imported transformers'\n"
        "from transformers import AutoConfig, AutoModel\n"
        f"print(type(AutoConfig.from_pretrained({str(tmp_path)!r})).__name__)\n"
        f"print(type(AutoModel.from_pretrained({str(tmp_path)!r})).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AttncBertConfig", "AttncBertModel"]
