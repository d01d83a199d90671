"""A SuperPLM remembers how it was trained (recipe.json; kd: its fit layer), and `superplm search` /
`extract` follow it: the held-out data are the training run's own split, and a SuperPLM trained by
distillation is scored and trained further by distillation (its MLM head is never trained)."""
from __future__ import annotations

import json
import random
import sqlite3

import pytest
import torch
import torch.nn.functional as F

from attnc.cli import main
from attnc.compiler.errors import ConfigError
from attnc.search.tinybert.space import Arch, Space

from test_tinybert_cli import WORDS, synthetic_ms


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    rng = random.Random(1)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
                                               .capitalize() + "." for _ in range(400)))
    return root


def _predictor(space, out):
    from attnc.search.tinybert.latency import LatencyPredictor

    c = space._choices()
    archs = [space._make(L, dm, df, k) for L in c["layers"] for dm in c["hidden"] for df in c["ffn"]
             for k in c["heads"]]
    archs = random.Random(0).sample(archs, min(120, len(archs)))
    pred, _ = LatencyPredictor.fit(space, [{"arch": str(a), "ms": synthetic_ms(a)} for a in archs],
                                   hidden=(16,), epochs=200, seed=0)
    pred.save(out)
    return pred


def _train(root, out, *extra):
    return main(["search", "superplm", "train", "--max-layers", "2", "--max-hidden", "32", "--max-ffn", "64",
                 "--corpus", str(root / "corpus.txt"), "--seq-len", "24", "--steps", "4", "--batch-size", "8",
                 "--sub-batches", "2", "--seed", "3", "--lr", "3e-3", "--no-progress", "--json",
                 "--out", str(out), *extra])


def _search(root, sp, lat, out, target, *extra):
    return main(["search", "superplm", "search", "--supernet", str(sp), "--latency-model", str(lat),
                 "--latency-ms", str(target), "--generations", "1", "--population", "4", "--eval-blocks", "8",
                 "--no-progress", "--json", "--out", str(out), *extra])


def _target(pred, space) -> float:
    """A latency limit that admits the arch below and, with the predictor's margin, not all of them."""
    return pred.predict(space._make(1, 32, 64, 1 if space.mode == "mlm" else space.head_dim)) * 1.2


def test_search_reads_the_training_recipe(corpus, tmp_path, capsys):
    """Trained with --seq-len 24 --seed 3 on a local corpus; searched without data flags: the held-out
    split is the training run's (same corpus, length and seed), and the recipe says so."""
    from attnc.search.tinybert.train import load_superplm

    assert _train(corpus, tmp_path / "sp", "--max-heads", "2", "--head-dim", "8") == 0
    capsys.readouterr()
    rec = json.loads((tmp_path / "sp" / "supernet" / "recipe.json").read_text())
    assert rec == {"objective": "mlm", "corpus": str(corpus / "corpus.txt"), "seq_len": 24, "seed": 3,
                   "eval_blocks": rec["eval_blocks"], "teacher": None}
    space = load_superplm(tmp_path / "sp").space
    pred = _predictor(space, tmp_path / "lat")
    assert _search(corpus, tmp_path / "sp", tmp_path / "lat", tmp_path / "evo", _target(pred, space)) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["fitness"].startswith("SuperPLMFitness")
    db = sqlite3.connect(tmp_path / "evo" / "study.db")
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    db.close()
    assert meta["heldout"]["corpus"] == str(corpus / "corpus.txt")
    assert (meta["heldout"]["seq_len"], meta["heldout"]["data_seed"]) == (24, 3)


def _teacher(folder):
    from transformers import BertConfig, BertModel

    from attnc.runtime.data import load_tokenizer

    torch.manual_seed(11)
    cfg = BertConfig(vocab_size=len(load_tokenizer()), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)


def test_kd_superplm_is_scored_and_trained_further_by_distillation(corpus, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, BertModel

    from attnc.runtime.data import cached_blocks, load_tokenizer
    from attnc.runtime.trainer import MLMData
    from attnc.search.tinybert.train import load_superplm, new_fit_layer

    _teacher(tmp_path / "teacher")
    assert _train(corpus, tmp_path / "sp", "--mode", "kd", "--teacher", str(tmp_path / "teacher")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["final_eval"]["kind"] == "distill"
    sp = load_superplm(tmp_path / "sp")
    teacher = BertModel.from_pretrained(tmp_path / "teacher").eval()
    fit = torch.load(tmp_path / "sp" / "supernet" / "fit.pt", weights_only=True)
    init = new_fit_layer(sp.space, teacher, 3).state_dict()
    assert not torch.equal(fit["weight"], init["weight"])          # the trained fit layer was kept

    pred = _predictor(sp.space, tmp_path / "lat")
    assert _search(corpus, tmp_path / "sp", tmp_path / "lat", tmp_path / "evo", _target(pred, sp.space)) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["fitness"].startswith("SuperPLMDistillFitness")

    # the best score by hand: the extracted sub-model and the teacher on the held-out split of the
    # training run, last hidden states through the fit layer + last-layer scores, real tokens only
    tok = load_tokenizer()
    data = MLMData(cached_blocks(str(corpus / "corpus.txt"), tok, 24), tok, eval_blocks=8)
    data.split(3)
    ids = data.tensor[data.eval_idx]
    mask = (ids != tok.pad_token_id).long()
    real = mask.bool()
    best = Arch.parse(s["best"])
    student = sp.extract(best).eval()

    def scores(att, x, h):
        B, n, _ = x.shape
        q = att.query(x).view(B, n, h, -1).transpose(1, 2)
        k = att.key(x).view(B, n, h, -1).transpose(1, 2)
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5

    with torch.no_grad():
        so = student.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        to = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hs = so.hidden_states[-1] @ fit["weight"][:, :best.hidden].T + fit["bias"]
        ss = scores(student.bert.encoder.layer[-1].attention.self, so.hidden_states[-2], best.heads)
        ts = scores(teacher.encoder.layer[-1].attention.self, to.hidden_states[-2], 2)
        keep = (real[:, None, :, None] & real[:, None, None, :]).expand_as(ss)
        want = F.mse_loss(hs[real], to.hidden_states[-1][real]) + F.mse_loss(ss[keep], ts[keep])
    assert s["score"] == pytest.approx(-float(want), rel=1e-4)

    # further training distils (the loss falls), and the model still loads as an HF folder
    assert main(["search", "superplm", "extract", "--supernet", str(tmp_path / "sp"), "--arch", s["best"],
                 "--train-steps", "8", "--lr", "3e-3", "--batch-size", "8", "--eval-blocks", "8", "--device", "cpu",
                 "--no-progress", "--json", "--out", str(tmp_path / "best")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["objective"] == "kd" and info["distill_loss_last"] < info["distill_loss_first"]
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "best").config.num_hidden_layers == best.layers


def test_predictor_for_another_formula_is_refused(tmp_path):
    from attnc.search.tinybert.cli import check_predictor_fits
    from attnc.search.tinybert.latency import LatencyPredictor

    plain = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=8, vocab_size=100)
    cos = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=8, vocab_size=100,
                formula="softsign(cos(Q, K)) @ V")
    pred = _predictor(plain, tmp_path / "lat")
    check_predictor_fits(pred, plain, tmp_path / "lat")                     # the same formula: accepted
    with pytest.raises(ConfigError, match="formula"):
        check_predictor_fits(pred, cos, tmp_path / "lat")
    # the same formula written another way is the same canonical formula
    pred_cos = _predictor(cos, tmp_path / "lat2")
    check_predictor_fits(pred_cos, Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=8,
                                         vocab_size=100, formula="softsign(cos(K, Q)^T) @ V"), tmp_path / "lat2")
    assert isinstance(LatencyPredictor.load(tmp_path / "lat2").space.formula, str)


def test_a_search_that_fails_before_scoring_leaves_no_study(corpus, tmp_path, capsys):
    from attnc.search.tinybert.supernet import SuperPLM
    from attnc.search.tinybert.train import save_superplm
    from attnc.runtime.data import load_tokenizer

    space = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=8,
                  vocab_size=len(load_tokenizer()), max_position_embeddings=64)
    torch.manual_seed(0)
    save_superplm(SuperPLM(space), tmp_path / "sp")
    pred = _predictor(space, tmp_path / "lat")
    args = ("--corpus", str(corpus / "corpus.txt"), "--seq-len", "24")
    assert _search(corpus, tmp_path / "sp", tmp_path / "lat", tmp_path / "evo", 0.001, *args) == 2
    assert "latency limit" in capsys.readouterr().err
    assert not (tmp_path / "evo" / "study.db").exists()
    assert _search(corpus, tmp_path / "sp", tmp_path / "lat", tmp_path / "evo", _target(pred, space), *args) == 0


def test_kd_with_the_real_minilm_teacher(corpus, tmp_path, capsys):
    """`--mode kd --teacher minilm-l6` distils from the real MiniLM-L6 weights shipped offline: the
    space takes the teacher's 12 heads, the fit layer maps to its 384 features, and training lowers
    the distillation loss."""
    assert _train(corpus, tmp_path / "sp", "--mode", "kd", "--teacher", "minilm-l6", "--steps", "12") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["space"]["max_heads"] == 12 and out["space"]["head_dim"] == 32
    assert out["recipe"]["teacher"] == "minilm-l6" and out["final_eval"]["kind"] == "distill"
    fit = torch.load(tmp_path / "sp" / "supernet" / "fit.pt", weights_only=True)
    assert tuple(fit["weight"].shape) == (384, 32)
    assert out["loss_last10"] < out["loss_first10"]
