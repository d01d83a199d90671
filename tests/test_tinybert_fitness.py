"""`superplm search --fitness mlm|kd|finetune:TASK` (issue 20): a short fine-tune of each extracted
sub-model scored on the task's held-out dev split, recorded in the study like OP-NAS's evaluator."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from attnc.cli import main
from attnc.compiler.errors import ConfigError
from attnc.search.tinybert.fitness import FinetuneConfig, FinetuneFitness, parse_fitness
from attnc.search.tinybert.space import Arch, Space

from test_tinybert_cli import setup  # noqa: F401  (the module fixture: SuperPLM, predictor, corpus)


def test_parse_fitness():
    assert parse_fitness("mlm") == ("mlm", None) and parse_fitness("kd") == ("kd", None)
    assert parse_fitness("finetune:rt-polarity") == ("finetune", "rt-polarity")
    assert parse_fitness("finetune:sst2") == ("finetune", "glue/sst2")
    for bad in ("finetune", "finetune:imdb", "accuracy", "mlm:x"):
        with pytest.raises(ConfigError):
            parse_fitness(bad)


def test_finetune_fitness_is_the_dev_metric_of_a_fine_tuned_sub_model(monkeypatch):
    """The score is the dev accuracy of the sub-model fine-tuned from the SuperPLM's weights, checked
    by counting the fine-tuned classifier's correct dev predictions by hand; the same arch scores the
    same twice (a resumed search re-scores nothing differently), and the encoder weights matter."""
    from attnc.runtime.data import load_tokenizer
    from attnc.search.tinybert.supernet import SuperPLM

    tok = load_tokenizer()
    space = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=16, vocab_size=len(tok),
                  max_position_embeddings=64)
    torch.manual_seed(0)
    sup = SuperPLM(space)
    cfg = FinetuneConfig(task="rt-polarity", steps=4, lr=1e-3, batch_size=16, max_len=32, max_train=64,
                         max_eval=80, device="cpu")
    fit = FinetuneFitness(sup, cfg, tok)
    arch = Arch(2, 32, 64, 2, 32)
    captured = {}
    from attnc.runtime import trainer as T
    real_train = T.train

    def spy(model, data, config, **kw):
        res = real_train(model, data, config, **kw)
        captured["model"] = res.model
        return res

    monkeypatch.setattr(T, "train", spy)
    score, metrics = fit(arch)
    # by hand: the fine-tuned classifier's argmax on the dev rows vs their labels
    clf = captured["model"].eval()
    rows = fit.data.dev_rows["validation"]
    assert len(rows) == 80
    correct = 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            pred = int(clf(input_ids=ids, attention_mask=torch.ones_like(ids),
                           token_type_ids=torch.tensor([r["token_type_ids"]])).logits.argmax(-1))
            correct += pred == r["label"]
    assert score == pytest.approx(correct / len(rows)) and metrics["dev_accuracy"] == score
    # the fine-tune starts from the SuperPLM's sub-model: its encoder weights before training
    assert fit(arch)[0] == score
    assert fit.identity() == {"kind": "finetune", "task": "rt-polarity", "data_dir": None, "steps": 4, "lr": 1e-3,
                              "batch_size": 16, "max_len": 32, "max_train": 64, "max_eval": 80, "seed": 0,
                              "metric": "accuracy"}
    with pytest.raises(ConfigError, match="positions"):
        FinetuneFitness(sup, FinetuneConfig(task="rt-polarity", max_len=128, device="cpu"), tok)


def test_cli_search_with_a_finetune_fitness_records_it_in_the_study(setup, tmp_path, capsys):  # noqa: F811
    root, space = setup
    base = ["search", "superplm", "search", "--supernet", str(root / "sp"), "--latency-model", str(root / "lat"),
            "--latency-ms", "4.3", "--generations", "1", "--population", "3", "--corpus", str(root / "corpus.txt"),
            "--seq-len", "32", "--eval-blocks", "8", "--no-progress", "--json", "--verify", "0"]
    ft = ["--fitness", "finetune:rt-polarity", "--finetune-steps", "2", "--max-train", "32", "--max-eval", "40",
          "--finetune-max-len", "32", "--device", "cpu"]
    assert main(base + ft + ["--out", str(tmp_path / "evo")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["fitness"].startswith("FinetuneFitness(rt-polarity")
    db = sqlite3.connect(tmp_path / "evo" / "study.db")
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    rows = db.execute("SELECT score, metrics FROM candidates WHERE status='done'").fetchall()
    db.close()
    assert meta["fitness"]["kind"] == "finetune" and meta["fitness"]["task"] == "rt-polarity"
    assert meta["fitness"]["steps"] == 2 and meta["fitness"]["metric"] == "accuracy"
    assert rows and all(score == json.loads(m)["dev_accuracy"] for score, m in rows)
    assert all(0.0 <= score <= 1.0 and round(score * 40) == score * 40 for score, _ in rows)   # 40 dev rows
    # resuming with another fitness is refused (the study knows what its scores mean)
    assert main(base + ["--resume", "--out", str(tmp_path / "evo")]) == 2
    assert "fitness" in capsys.readouterr().err
    # a kd fitness needs a kd SuperPLM
    assert main(base + ["--fitness", "kd", "--out", str(tmp_path / "kd")]) == 2
    err = capsys.readouterr().err
    assert "--mode kd" in err and "Traceback" not in err
    assert main(base + ["--fitness", "finetune:imdb", "--out", str(tmp_path / "x")]) == 2
    assert "rt-polarity" in capsys.readouterr().err
