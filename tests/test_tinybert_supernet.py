"""AutoTinyBERT search space and SuperPLM: sub-models equal their extracted stand-alone models.

References are independent of the SuperPLM's forward: the runtime's AttncBertForMaskedLM (loaded
with sliced weights, or with the whole state dict at the max arch), index lists built by hand for
the two MHA strategies, runtime.counters for FLOPs/params and brute-force enumeration of the space.
"""
import random

import pytest
import torch

import attnc  # noqa: F401  (registers attnc_bert with the Auto* classes)
from attnc.compiler.errors import ConfigError
from attnc.runtime.counters import count_flops, count_parameters
from attnc.runtime.modeling import AttncBertForMaskedLM
from attnc.search.tinybert import Arch, Space, SuperPLM

TINY = dict(max_layers=3, max_hidden=64, max_ffn=128, max_heads=4, head_dim=16, vocab_size=200,
            max_position_embeddings=32)
SOFTSIGN = "softsign(Q @ K^T / sqrt(d)) @ V"
COSINE = "softmax(cos(Q, K) * 4) @ V"


def tiny(mode="mlm", formula=None, **kw) -> Space:
    return Space(**{**TINY, **kw}, mode=mode, formula=formula)


def randomised(space: Space, seed: int = 0, **overrides) -> SuperPLM:
    """A SuperPLM whose every parameter (biases, LayerNorms, pad row included) is random, so that a
    wrong slice of any of them shows in the outputs."""
    torch.manual_seed(seed)
    sup = SuperPLM(space, config_overrides=overrides or None)
    with torch.no_grad():
        for p in sup.parameters():
            p.normal_(0.0, 0.3)
    return sup.eval()


def batch(vocab=200, B=3, n=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, n), generator=g)
    mask = torch.ones(B, n, dtype=torch.long)
    mask[1, 7:] = 0      # padded rows
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(B, n, dtype=torch.long)
    types[:, n // 2:] = 1
    labels = torch.full((B, n), -100)
    labels[0, 2], labels[1, 4], labels[2, 1], labels[0, 9] = 5, 17, 3, 99
    return ids, mask, types, labels


def edge_archs(space: Space) -> list[Arch]:
    rng = random.Random(7)
    # L=1, the smallest widths, h=1 (mlm) / one dim per head (kd)
    lo = space._make(space.min_layers, space.min_hidden, space.min_ffn, 1)
    return [lo, space.max_arch, space.sample(rng), space.sample(rng)]


# ---- Arch and Space ---------------------------------------------------------------------------------


def test_arch_parse_round_trip_and_head_dim():
    a = Arch.parse(" 3-200-300-3-192 ")
    assert a == Arch(3, 200, 300, 3, 192) and str(a) == "3-200-300-3-192" and a.head_dim == 64
    assert Arch.parse(str(a)) == a
    assert sorted([Arch(2, 8, 8, 1, 4), Arch(1, 99, 8, 1, 4)])[0] == Arch(1, 99, 8, 1, 4)


@pytest.mark.parametrize("text", ["3-200-300-3", "3-200-300-3-192-1", "a-b-c-d-e", "", "3-0-300-3-192",
                                  "3-200-300-3-100"])
def test_malformed_arch_strings_raise_config_error(text):
    with pytest.raises(ConfigError) as e:
        Arch.parse(text)
    assert e.value.hint


@pytest.mark.parametrize("mode,text,words", [
    ("mlm", "3-64-128-3-64", "not a multiple"),       # qkv not a multiple of h
    ("mlm", "4-64-128-4-64", "layers"),               # deeper than the SuperPLM
    ("mlm", "3-68-128-4-64", "outside"),              # dm beyond the SuperPLM
    ("mlm", "3-64-132-4-64", "outside"),              # df beyond the SuperPLM
    ("mlm", "3-62-128-4-64", "step"),                 # dm off the step grid
    ("mlm", "3-64-126-4-64", "step"),                 # df off the step grid
    ("mlm", "3-64-128-4-48", "head_dim"),             # mlm: qkv must be head_dim * h
    ("mlm", "3-64-128-5-80", "qkv"),                  # more heads than the SuperPLM
    ("kd", "3-64-128-2-32", "fixed"),                 # kd: h is the teacher's
    ("kd", "3-64-128-4-80", "exceeds"),               # kd: qkv beyond max_qkv
    ("mlm", "3-64-128", "malformed"),
])
def test_bad_archs_raise_config_error_with_hint(mode, text, words):
    space = tiny(mode)
    sup = SuperPLM(space)
    for call in (space.validate, sup.set_arch, sup.extract):
        with pytest.raises(ConfigError) as e:
            call(text)
        assert words in str(e.value) and e.value.hint
    assert sup.arch == space.max_arch          # a refused arch leaves the active one alone


def test_bad_spaces_raise_config_error():
    for kw in (dict(mode="big"), dict(max_hidden=66), dict(min_ffn=256), dict(max_layers=0),
               dict(formula="softmax(Q @ ")):
        with pytest.raises(ConfigError):
            tiny(**kw)
    with pytest.raises(ConfigError):
        Space.from_json({**tiny().to_json(), "colour": "red"})


def test_space_json_round_trip():
    s = tiny("kd", SOFTSIGN)
    assert Space.from_json(s.to_json()) == s
    import json
    assert Space.from_json(json.loads(json.dumps(s.to_json()))) == s


def _enumerate(space: Space):
    """Every arch of the space by brute force over all five fields (validate decides)."""
    out = []
    for L in range(1, space.max_layers + 2):
        for dm in range(1, space.max_hidden + 5):
            for df in (space.min_ffn, space.max_ffn):
                for h in range(1, space.max_heads + 2):
                    for dq in range(h, space.max_qkv + h + 1, h):
                        if (Arch(L, dm, df, h, dq)) in space:
                            out.append(Arch(L, dm, df, h, dq))
    return out


@pytest.mark.parametrize("mode", ["mlm", "kd"])
def test_sampling_is_uniform_over_the_validated_space(mode):
    space = tiny(mode)
    rng = random.Random(0)
    samples = [space.sample(rng) for _ in range(6000)]
    for a in samples:
        space.validate(a)
    # the (L, dm, h, dqkv) marginal against brute-force enumeration of the space
    members = {(a.layers, a.hidden, a.heads, a.qkv) for a in _enumerate(space)}
    seen = {(a.layers, a.hidden, a.heads, a.qkv) for a in samples}
    assert seen <= members
    heads_or_qkv = [a.heads if mode == "mlm" else a.qkv for a in samples]
    values = sorted({x for (_, _, h, q) in members for x in [h if mode == "mlm" else q]})
    expected = len(samples) / len(values)
    for v in values:   # each value within 5 sigma of a uniform count
        c = heads_or_qkv.count(v)
        assert abs(c - expected) < 5 * expected ** 0.5, (v, c, expected)
    dms = [a.hidden for a in samples]
    assert min(dms) == space.min_hidden and max(dms) == space.max_hidden


def test_uniform_mutation_redraws_each_field_over_its_range():
    space = tiny("mlm")
    rng = random.Random(3)
    a = Arch(2, 40, 64, 2, 32)
    assert all(space.mutate(a, rng, 0.0, "uniform") == a for _ in range(50))
    moved = [space.mutate(a, rng, 1.0, "uniform") for _ in range(400)]
    for m in moved:
        space.validate(m)
    # with pm=1 each field is a fresh uniform draw: L stays 2 with probability 1/3
    same_L = sum(m.layers == 2 for m in moved) / len(moved)
    assert 0.22 < same_L < 0.45
    assert max(abs(m.hidden - a.hidden) for m in moved) > 2 * space.step     # far jumps happen
    with pytest.raises(ConfigError):
        space.mutate(a, rng, 1.5)
    with pytest.raises(ConfigError, match="mutation"):
        space.mutate(a, rng, 0.5, "gaussian")


@pytest.mark.parametrize("mode", ["mlm", "kd"])
def test_local_mutation_moves_each_field_one_or_two_grid_steps(mode):
    """The default mutation (the reference implementation's): a mutated field moves 1 or 2 steps of
    its grid, up or down with equal chances among the moves that stay in the space."""
    space = tiny(mode, max_layers=6)
    rng = random.Random(5)
    a = Arch(3, 40, 64, 2, 32) if mode == "mlm" else Arch(3, 40, 64, 4, 32)     # every field mid-range
    assert all(space.mutate(a, rng, 0.0) == a for _ in range(50))
    moved = [space.mutate(a, rng, 1.0) for _ in range(2000)]
    key = (lambda x: x.heads) if mode == "mlm" else (lambda x: x.head_dim)
    grid_step = {"layers": 1, "hidden": space.step, "ffn": space.step, "k": 1}
    for name, get in (("layers", lambda x: x.layers), ("hidden", lambda x: x.hidden), ("ffn", lambda x: x.ffn),
                      ("k", key)):
        deltas = [(get(m) - get(a)) // grid_step[name] for m in moved]
        assert set(deltas) <= {-2, -1, 1, 2}, (name, sorted(set(deltas)))
        if name != "k" or mode == "kd":     # mlm: h=2 of 1..4 cannot move 2 down
            for d in (-2, -1, 1, 2):        # four equally likely moves: 500 expected each
                assert 380 < deltas.count(d) < 620, (name, d, deltas.count(d))
    for m in moved:
        space.validate(m)
    # at the edge of the space only the moves inward remain
    edge = space.max_arch
    for m in (space.mutate(edge, rng, 1.0) for _ in range(200)):
        assert edge.layers - 2 <= m.layers < edge.layers and edge.hidden - 2 * space.step <= m.hidden < edge.hidden


def test_local_mutation_of_the_issue_example_stays_near_its_parent():
    """Issue 20: in the paper's space a uniform redraw turned 4-512-2048-8-512 into 3-648-2408-1-64 in
    one step; the local mutation moves each field by at most two grid steps."""
    space = Space()
    rng = random.Random(0)
    a = Arch.parse("4-512-2048-8-512")
    for m in (space.mutate(a, rng, 0.5) for _ in range(500)):
        assert abs(m.layers - 4) <= 2 and abs(m.hidden - 512) <= 8 and abs(m.ffn - 2048) <= 8
        assert abs(m.heads - 8) <= 2 and m.qkv == 64 * m.heads


def test_paper_sized_spaces_get_the_papers_minima():
    paper, kd = Space(), Space(mode="kd")
    assert (paper.min_hidden, paper.min_ffn, paper.min_qkv) == (128, 128, 64)
    assert (kd.min_hidden, kd.min_ffn, kd.min_qkv) == (128, 128, 180)    # 12 heads x 15 dims
    rng = random.Random(1)
    samples = [kd.sample(rng) for _ in range(3000)]
    assert min(a.hidden for a in samples) == 128 and min(a.ffn for a in samples) == 128
    assert min(a.qkv for a in samples) == 180 and all(a.qkv % 12 == 0 for a in samples)
    with pytest.raises(ConfigError, match="below the space's minimum"):
        kd.validate("4-256-512-12-168")
    with pytest.raises(ConfigError, match="outside"):
        paper.validate("4-124-512-2-128")
    # smaller spaces keep the small minima; explicit values win; a JSON round trip keeps them
    small = tiny("kd")
    assert (small.min_hidden, small.min_ffn, small.min_qkv) == (32, 32, 4)
    assert Space(min_hidden=64, min_ffn=256).min_hidden == 64
    assert Space.from_json(kd.to_json()) == kd
    with pytest.raises(ConfigError, match="min_qkv"):
        Space(min_qkv=800)


@pytest.mark.parametrize("mode", ["mlm", "kd"])
def test_fast_candidates_follow_the_rule_and_are_the_widest(mode):
    space = tiny(mode, max_layers=3, max_hidden=64, max_ffn=128)
    cands = space.fast_candidates()
    assert [c.layers for c in cands] == [1, 2, 3]
    for c in cands:
        space.validate(c)
        assert 1.6 * c.hidden <= c.ffn <= 1.9 * c.hidden
        assert 0.7 * c.hidden <= c.qkv <= 1.0 * c.hidden
    # brute force: the widest dm for which SOME df (step grid) and qkv of the space obey the rule
    ok = []
    for dm in range(space.min_hidden, space.max_hidden + 1, space.step):
        dfs = [df for df in range(space.min_ffn, space.max_ffn + 1, 4) if 1.6 * dm <= df <= 1.9 * dm]
        qs = ([16 * h for h in range(1, 5)] if mode == "mlm" else [4 * k for k in range(1, 17)])
        if dfs and any(0.7 * dm <= q <= dm for q in qs):
            ok.append(dm)
    assert all(c.hidden == max(ok) for c in cands)
    # under a latency limit: the widest arch whose latency fits, per layer count
    lat = lambda a: a.layers * a.hidden   # noqa: E731 (a stand-in latency model)
    limited = space.fast_candidates(lat, 80.0)
    assert [c.layers for c in limited] == [1, 2]          # 3 layers: 3 * 32 > 80 even at the smallest dm
    assert limited[0].hidden == max(d for d in ok if d <= 80)
    assert limited[1].hidden == max(d for d in ok if 2 * d <= 80)


@pytest.mark.parametrize("formula", [None, SOFTSIGN, COSINE])
def test_features_match_runtime_counters_and_built_models(formula):
    space = tiny("mlm", formula)
    rng = random.Random(2)
    for arch in [space.max_arch, *[space.sample(rng) for _ in range(4)]]:
        f = space.features(arch)
        cfg = space.config(arch)
        assert f[:5] == [arch.layers, arch.hidden, arch.ffn, arch.heads, arch.qkv]
        assert f[5] == count_flops(cfg, 128) and space.flops(arch, 64) == count_flops(cfg, 64)
        assert f[6] == count_parameters(cfg, "mlm")
    model = AttncBertForMaskedLM(space.config(arch))
    assert f[6] == sum(p.numel() for p in model.parameters())   # named_parameters dedups the tie


def test_config_overrides_cannot_change_widths():
    with pytest.raises(ConfigError):
        tiny().config(Arch(1, 32, 32, 1, 16), hidden_size=48)
    cfg = tiny().config(Arch(1, 32, 32, 1, 16), hidden_dropout_prob=0.0)
    assert cfg.hidden_dropout_prob == 0.0 and cfg.arch == "1-32-32-1-16"


# ---- SuperPLM ---------------------------------------------------------------------------------------


def test_state_dict_is_the_max_models_and_forward_equals_it():
    space = tiny("mlm")
    sup = randomised(space)
    ref = AttncBertForMaskedLM(space.config(space.max_arch)).eval()
    assert set(ref.state_dict()) == set(sup.state_dict())
    ref.load_state_dict(sup.state_dict(), strict=True)
    ids, mask, types, labels = batch()
    with torch.no_grad():
        a = sup(ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
        b = ref(ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
    assert (a.logits - b.logits).abs().max() <= 1e-5
    assert abs(a.loss - b.loss) <= 1e-5
    assert len(a.hidden_states) == space.max_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max() <= 1e-5
    # and loading a max-model state dict into a SuperPLM works the other way round
    sup2 = SuperPLM(space).eval()
    sup2.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(sup2(ids, attention_mask=mask, token_type_ids=types).logits,
                           sup(ids, attention_mask=mask, token_type_ids=types).logits)


@pytest.mark.parametrize("mode,formula", [("mlm", None), ("kd", None), ("mlm", SOFTSIGN),
                                          ("kd", COSINE)])
def test_extracted_models_equal_sub_models_after_save_and_load(mode, formula, tmp_path):
    from transformers import AutoModelForMaskedLM

    space = tiny(mode, formula)
    sup = randomised(space, seed=3)
    ids, mask, types, labels = batch()
    for i, arch in enumerate(edge_archs(space)):
        sup.set_arch(arch)
        assert sup.arch == arch
        sub = sup.extract(arch)
        assert type(sub) is AttncBertForMaskedLM and not sub.training
        assert sub.config.arch == str(arch)
        sub.save_pretrained(tmp_path / str(i))
        back = AutoModelForMaskedLM.from_pretrained(tmp_path / str(i)).eval()
        assert type(back) is AttncBertForMaskedLM
        with torch.no_grad():
            a = sup(ids, attention_mask=mask, token_type_ids=types, labels=labels,
                    output_hidden_states=True)
            for model in (sub, back):
                b = model(ids, attention_mask=mask, token_type_ids=types, labels=labels,
                          output_hidden_states=True)
                assert (a.logits - b.logits).abs().max() <= 1e-5, arch
                assert abs(a.loss - b.loss) <= 1e-5
                assert len(a.hidden_states) == arch.layers + 1
                for x, y in zip(a.hidden_states, b.hidden_states):
                    assert x.shape[-1] == arch.hidden and (x - y).abs().max() <= 1e-5
            # the training fast path (logits at labelled positions only) agrees too
            assert abs(sup.mlm_loss(ids, mask, labels, types) - b.loss) <= 1e-5


@pytest.mark.parametrize("mode", ["mlm", "kd"])
def test_mha_strategies_take_the_right_rows(mode):
    """Strategy 1: first h heads (rows 0..h*64-1). Strategy 2: the first d dims of EVERY head.
    Index lists built by hand, independent of the slicing code."""
    space = tiny(mode)
    sup = randomised(space)
    H, dh = space.max_heads, space.head_dim
    arch = Arch(2, 40, 72, 2, 32) if mode == "mlm" else Arch(2, 40, 72, 4, 20)
    sub = sup.extract(arch)
    if mode == "mlm":
        rows = list(range(arch.heads * dh))
    else:
        rows = [hh * dh + j for hh in range(H) for j in range(arch.head_dim)]
    for li in range(arch.layers):
        big, small = sup.bert.encoder.layer[li], sub.bert.encoder.layer[li]
        for name in ("query", "key", "value"):
            w = getattr(big.attention.self, name).weight.detach()
            b = getattr(big.attention.self, name).bias.detach()
            assert torch.equal(getattr(small.attention.self, name).weight, w[rows][:, :arch.hidden])
            assert torch.equal(getattr(small.attention.self, name).bias, b[rows])
        wo = big.attention.output.dense.weight.detach()
        assert torch.equal(small.attention.output.dense.weight, wo[:arch.hidden][:, rows])
        wi = big.intermediate.dense.weight.detach()
        assert torch.equal(small.intermediate.dense.weight, wi[:arch.ffn, :arch.hidden])
    emb = sup.bert.embeddings.word_embeddings.weight.detach()
    assert torch.equal(sub.bert.embeddings.word_embeddings.weight, emb[:, :arch.hidden])
    assert sub.cls.predictions.decoder.weight is sub.bert.embeddings.word_embeddings.weight
    assert torch.equal(sub.cls.predictions.bias, sup.cls.predictions.bias.detach())
    assert len(sub.bert.encoder.layer) == arch.layers


def test_edge_shapes_and_last_scores():
    space = tiny("mlm")
    sup = randomised(space)
    ids, mask, types, _ = batch()
    for arch in (Arch(1, space.min_hidden, space.min_ffn, 1, 16), space.max_arch):
        sup.set_arch(arch)
        with torch.no_grad():
            out = sup(ids, attention_mask=mask, output_hidden_states=True, output_last_scores=True)
        B, n = ids.shape
        assert out.logits.shape == (B, n, space.vocab_size)
        assert out.last_scores.shape == (B, arch.heads, n, n)
        assert [tuple(h.shape) for h in out.hidden_states] == [(B, n, arch.hidden)] * (arch.layers + 1)
        # scores by hand from the extracted model's last layer on its input hidden state
        sub = sup.extract(arch)
        x = out.hidden_states[-2]
        att = sub.bert.encoder.layer[-1].attention.self
        q = att.query(x).view(B, n, arch.heads, arch.head_dim).transpose(1, 2)
        k = att.key(x).view(B, n, arch.heads, arch.head_dim).transpose(1, 2)
        ref = torch.einsum("bhid,bhjd->bhij", q, k) / arch.head_dim ** 0.5
        assert (out.last_scores - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["mlm", "kd"])
def test_gradients_reach_only_the_active_slices_and_equal_the_extracted_models(mode):
    space = tiny(mode)
    sup = randomised(space, seed=5)
    arch = Arch(2, 44, 80, 3, 48) if mode == "mlm" else Arch(2, 44, 80, 4, 24)
    sup.set_arch(arch)
    sub = sup.extract(arch)
    ids, mask, types, labels = batch()
    ids[0, 5] = 0   # [PAD] id at a real position: nn.Embedding(padding_idx=0) gives its row no grad
    sup.mlm_loss(ids, mask, labels, types).backward()
    sub(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
    sub_params = dict(sub.named_parameters())
    big = dict(sup.named_parameters())
    for name, p in big.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.startswith("bert.encoder.layer.") and int(name.split(".")[3]) >= arch.layers:
            assert torch.count_nonzero(g) == 0, name        # inactive layer: no gradient at all
            continue
        sl = sup.slices(name, arch)
        # expected gradient: the extracted model's, scattered into a zero tensor by hand
        expected = torch.zeros_like(p)
        sg = sub_params[name].grad
        if name.startswith("bert.encoder.layer.") and ".attention.self." in name and mode == "kd":
            H, dh, d = space.max_heads, space.head_dim, arch.head_dim
            rows = [hh * dh + j for hh in range(H) for j in range(d)]
            if p.dim() == 2:
                expected[rows, :arch.hidden] = sg
            else:
                expected[rows] = sg
        elif name.endswith("attention.output.dense.weight") and mode == "kd":
            rows = [hh * space.head_dim + j for hh in range(space.max_heads)
                    for j in range(arch.head_dim)]
            expected[:arch.hidden, rows] = sg
        else:
            idx = tuple(slice(None) if s is None else slice(0, s) for s in sl)
            expected[idx] = sg
        assert (g - expected).abs().max() <= 1e-5, name


def test_dropout_matches_the_extracted_model_in_training_mode():
    space = tiny("mlm")
    sup = randomised(space, seed=2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3).train()
    arch = Arch(2, 48, 96, 2, 32)
    sup.set_arch(arch)
    sub = sup.extract(arch)
    assert sub.training and sub.config.hidden_dropout_prob == 0.2
    ids, mask, types, _ = batch()
    torch.manual_seed(11)
    a = sup(ids, attention_mask=mask, token_type_ids=types).logits
    torch.manual_seed(11)
    b = sub(ids, attention_mask=mask, token_type_ids=types).logits
    torch.manual_seed(12)
    c = sub(ids, attention_mask=mask, token_type_ids=types).logits
    assert (a - b).abs().max() <= 1e-5          # same dropout masks, same places
    assert (b - c).abs().max() > 1e-3           # dropout is on


def test_set_arch_keeps_weights_shared():
    space = tiny("kd")
    sup = randomised(space)
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    rng = random.Random(0)
    ids, mask, _, _ = batch()
    for _ in range(5):
        sup.set_arch(space.sample(rng))
        with torch.no_grad():
            sup(ids, attention_mask=mask)
        sup.extract()
    for k, v in sup.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_issue_example_runs_end_to_end():
    from attnc.search import tinybert

    space = tinybert.Space(max_layers=4, max_hidden=256, max_ffn=1024, max_heads=4, mode="mlm",
                           vocab_size=30522)
    torch.manual_seed(0)
    supernet = tinybert.SuperPLM(space).eval()
    arch = tinybert.Arch.parse("3-200-300-3-192")
    ids, mask, _, _ = batch(vocab=30522)
    supernet.set_arch(arch)
    with torch.no_grad():
        out = supernet(input_ids=ids, attention_mask=mask)
        sub = supernet.extract(arch)
        assert (out.logits - sub(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5
    assert out.logits.shape == (3, 11, 30522)
