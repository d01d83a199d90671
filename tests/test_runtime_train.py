"""attnc.runtime training, data, metrics, analysis and CLI (tiny models, offline data)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import runtime_helpers as H
import torch
from attnc.compiler.errors import DataError
from attnc.runtime import data as D

TINY = "2-64-128-2-64"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from attnc.runtime.train import pretrain

    out = tmp_path_factory.mktemp("pre")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    summary = pretrain(TINY, out, corpus="wiki-sample", steps=40, batch_size=16, seq_len=32, lr=2e-3,
                       train_vocab=3000, save_every=20, seed=3, progress=False)
    return out, summary


def test_pretraining_lowers_mlm_loss_and_saves(pretrained):
    out, s = pretrained
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.5, s
    for f in ("config.json", "model.safetensors", "tokenizer.json", "attnc_pretrain.json"):
        assert (out / f).is_file(), f
    assert (out / "checkpoints" / "step-000020" / "trainer_state.pt").is_file()
    assert not list(out.glob(".tmp-*"))
    from attnc.runtime import AttncBertForMaskedLM, AttncBertModel
    from transformers import AutoModel, AutoModelForMaskedLM
    assert type(AutoModelForMaskedLM.from_pretrained(out)) is AttncBertForMaskedLM
    assert type(AutoModel.from_pretrained(out)) is AttncBertModel


def test_resume_continues_exactly(pretrained, tmp_path):
    from attnc.runtime.train import pretrain

    out, s = pretrained
    again = tmp_path / "again"
    shutil.copytree(out, again)
    r = pretrain(TINY, again, corpus="wiki-sample", steps=40, batch_size=16, seq_len=32, lr=2e-3,
                 train_vocab=3000, save_every=20, seed=3, progress=False, resume=True)
    assert r["resumed_from"] == 20
    a = json.loads((out / "attnc_pretrain_log.json").read_text())
    b = json.loads((again / "attnc_pretrain_log.json").read_text())
    assert len(a) == len(b) == 40
    assert a == b                                       # bit-identical on the CPU
    assert r["eval_loss_before"] == pytest.approx(s["eval_loss_before"])


def test_finetune_beats_majority_on_rt_polarity(pretrained, tmp_path):
    from attnc.runtime.train import finetune

    out, _ = pretrained
    m = finetune(out, "rt-polarity", out_dir=tmp_path / "ft", epochs=3, batch_size=32, lr=1e-3,
                 max_length=32, max_train=3000, max_eval=800, progress=False)
    acc, major = m["dev"]["validation"]["accuracy"], m["majority_baseline"]["validation"]
    assert acc > major + 0.02, m
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert saved["dev"] == m["dev"]
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft").num_labels == 2


def test_analyze_token_uniformity(pretrained):
    from attnc.runtime.analyze import format_table, token_uniformity, uniformity_of

    out, _ = pretrained
    r = token_uniformity(out, num_sequences=8, seq_len=32, progress=False)
    assert len(r["layers"]) == 3 and r["layers"][0]["kind"] == "embeddings"
    for row in r["layers"]:
        assert 0 < row["relative_residual"] <= 1 and -1 <= row["avg_cosine"] <= 1
        assert row["rank1_residual"] <= row["relative_residual"] + 1e-9
    assert "avg cosine" in format_table(r)
    same = torch.ones(5, 1) * torch.randn(1, 8)                  # all tokens equal: uniform
    u = uniformity_of(same)
    assert u["relative_residual"] < 1e-9 and u["avg_cosine"] == pytest.approx(1.0)


def test_corpora_and_blocks():
    tok = D.load_tokenizer()
    assert len(tok) == 30522
    wiki = D.load_corpus("wiki-sample")
    assert len(wiki) > 100 and "Anarchism" in wiki[0]["text"]
    blocks = D.make_blocks(wiki.select(range(3)), tok, 32)
    row = blocks[0]["input_ids"]
    assert len(row) == 32 and row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
    pairs = D.make_sentence_pairs(wiki.select(range(4)), tok, 48)
    ex = pairs[0]
    assert len(ex["input_ids"]) <= 48 and len(ex["token_type_ids"]) == len(ex["input_ids"])
    assert set(pairs["next_sentence_label"]) == {0, 1}
    assert len(D.load_corpus("bbc-news")) == 2225


def test_local_text_corpus_and_wordpiece(tmp_path):
    (tmp_path / "a.txt").write_text("The cat sat on the mat. The dog sat on the log.\n" * 50)
    ds = D.load_corpus(str(tmp_path))
    tok = D.train_wordpiece(ds["text"], vocab_size=200)
    enc = tok("the cat sat")["input_ids"]
    assert enc[0] == tok.cls_token_id and enc[-1] == tok.sep_token_id and tok.mask_token_id is not None


def test_masking_is_dynamic_and_bert_like():
    tok = D.load_tokenizer()
    masker = D.MLMMasker(tok, 0.15)
    ids = torch.randint(1000, 20000, (64, 64))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    mask = torch.ones_like(ids)
    mask[:, 50:] = 0
    x1, l1 = masker(ids, mask, torch.Generator().manual_seed(0))
    _, l2 = masker(ids, mask, torch.Generator().manual_seed(1))
    picked = l1 != -100
    assert not torch.equal(l1, l2)
    assert 0.12 < picked[:, 1:50].float().mean() < 0.18
    assert not picked[:, 0].any() and not picked[:, 50:].any()
    frac_mask = (x1[picked] == tok.mask_token_id).float().mean()
    assert 0.72 < frac_mask < 0.88
    assert torch.equal(l1[picked], ids[picked])


def test_tasks_offline():
    t = D.load_task("rt-polarity")
    assert t.num_labels == 2 and len(t.train) + len(t.dev["validation"]) == 12808
    b = D.load_task("bbc-topic")
    assert b.num_labels == 5 and len(b.train) + len(b.dev["validation"]) == 2225
    with pytest.raises(DataError) as e:
        D.load_task("glue/sst2")
    assert "--data-dir" in str(e.value)
    with pytest.raises(DataError, match="unknown task"):
        D.load_task("glue/nope")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_glue_local_folder(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \t0\n")
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nfine \t1\n")
    _write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tThe cat sat.\nga\t0\t*\tCat the sat.\n")
    _write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tA dog ran.\n")
    mnli_h = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t" \
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
    row = "0\t1\t2\tg\tx\tx\tx\tx\tA man sleeps.\tA person rests.\tentailment\tentailment\n"
    for f in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write(tmp_path / "MNLI" / f, mnli_h + row + row.replace("entailment", "contradiction"))
    _write(tmp_path / "STS-B" / "train.tsv",
           "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
           "0\tmain\tf\t2012\t1\ts\ts\tA plane takes off.\tAn air plane is taking off.\t5.000\n")
    shutil.copy(tmp_path / "STS-B" / "train.tsv", tmp_path / "STS-B" / "dev.tsv")
    sst = D.load_task("glue/sst2", tmp_path)
    assert sst.train["label"][:] == [1, 0] and not sst.pair
    cola = D.load_task("glue/cola", tmp_path / "CoLA")
    assert cola.train["text_a"][:] == ["The cat sat.", "Cat the sat."] and cola.metric == "matthews"
    mnli = D.load_task("glue/mnli", tmp_path)
    assert set(mnli.dev) == {"validation_matched", "validation_mismatched"}
    assert mnli.train["label"][:] == [0, 2] and mnli.pair and mnli.num_labels == 3
    sts = D.load_task("glue/stsb", tmp_path)
    assert sts.is_regression and sts.train["label"][:] == [5.0]
    with pytest.raises(DataError, match="missing"):
        D.load_task("glue/rte", tmp_path)


def test_finetune_regression_and_pairs_on_local_glue(tmp_path, pretrained):
    from attnc.runtime.train import finetune

    rows = "".join(f"{i}\tmain\tf\t2012\t1\ts\ts\tsentence {i} a\tsentence {i} b\t{i % 5}.0\n" for i in range(24))
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(tmp_path / "STS-B" / "train.tsv", head + rows)
    _write(tmp_path / "STS-B" / "dev.tsv", head + rows)
    out, _ = pretrained
    m = finetune(out, "glue/stsb", data_dir=str(tmp_path), max_steps=3, batch_size=8, max_length=16,
                 progress=False, save=False)
    assert set(m["dev"]["validation"]) == {"pearson", "spearman", "combined"}


def test_metrics_match_references():
    pearsonr = pytest.importorskip("scipy.stats").pearsonr
    spearmanr = pytest.importorskip("scipy.stats").spearmanr
    f1_score = pytest.importorskip("sklearn.metrics").f1_score
    matthews_corrcoef = pytest.importorskip("sklearn.metrics").matthews_corrcoef

    rng = np.random.RandomState(0)
    y, p = rng.randint(0, 2, 200), rng.randint(0, 2, 200)
    assert D.f1_binary(p, y) == pytest.approx(f1_score(y, p))
    assert D.matthews(p, y) == pytest.approx(matthews_corrcoef(y, p))
    a, b = rng.rand(100), rng.rand(100)
    b[:10] = b[10:20]                                      # ties
    assert D.pearson(a, b) == pytest.approx(pearsonr(a, b)[0])
    assert D.spearman(a, b) == pytest.approx(spearmanr(a, b)[0])
    m = D.compute_metrics("f1", p, y)
    assert set(m) == {"accuracy", "f1", "combined"}


# ---- CLI --------------------------------------------------------------------------------------------


def test_cli_commands(pretrained, tmp_path, capsys):
    from attnc.cli import main

    out, _ = pretrained
    assert main(["latency", "--arch", "2-32-64-2-32", "--seq", "16", "--runs", "3", "--warmup", "1"]) == 0
    assert "ms median" in capsys.readouterr().out
    assert main(["analyze", str(out), "--sequences", "4", "--seq-len", "16", "--no-progress",
                 "--json", str(tmp_path / "u.json")]) == 0
    assert "rel. residual" in capsys.readouterr().out and (tmp_path / "u.json").is_file()
    assert main(["finetune", str(out), "--task", "rt-polarity", "--steps", "2", "--max-train", "64",
                 "--max-eval", "32", "--max-length", "16", "--no-progress", "--out", str(tmp_path / "f")]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "rt-polarity"
    assert main(["pretrain", "--model", "2-32-64-2-32", "--corpus", "wiki-sample", "--steps", "2",
                 "--batch-size", "4", "--seq-len", "16", "--train-vocab", "500", "--no-progress",
                 "--layer", "conv:3", "--layer", "attn:" + H.P_FORMULA,
                 "--out", str(tmp_path / "p")]) == 0
    assert "held-out MLM loss" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["latency", "--arch", "5-564-1054-8"], "malformed arch string"),
    (["latency", "--arch", "2-32-64-2-32", "--layer", "conv:4"], "kernel size 4"),
    (["finetune", "NOPE", "--task", "rt-polarity"], "no config.json"),
    (["pretrain", "--model", "tiny-hybrid", "--corpus", "no-such-corpus", "--steps", "1", "--out", "X"],
     "unknown corpus"),
    (["pretrain", "--model", "2-32-64-2-32", "--steps", "1", "--out", "X", "--device", "nope"], "unknown device"),
    (["finetune", "NOPE", "--task", "rt-polarity", "--device", "cpu", "--precision", "fp16"], "bf16"),
    (["pretrain", "--model", "2-32-64-2-32", "--steps", "1", "--out", "X", "--teacher", "minilm-l6",
      "--train-vocab", "300", "--seq-len", "16"], "vocabulary"),
    (["pretrain", "--model", "2-32-64-2-32", "--steps", "1", "--out", "X", "--distill", "hidden_mse=1"],
     "--distill needs --teacher"),
    (["pretrain", "--model", "2-32-64-2-32", "--steps", "1", "--out", "X", "--teacher", "no-such-teacher"],
     "neither a known name"),
])
def test_cli_user_errors(argv, words, capsys, tmp_path, monkeypatch):
    from attnc.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_bad_model_spec_fails_before_any_data_work(tmp_path):
    """A bad layer spec is reported even when the corpus would also fail to load."""
    from attnc import ConfigError
    from attnc.runtime.train import pretrain

    with pytest.raises(ConfigError, match="kernel size 4"):
        pretrain("2-64-128-2-64", tmp_path / "out", corpus=str(tmp_path / "no-such-corpus"),
                 steps=1, layers=["conv:4"], progress=False)
