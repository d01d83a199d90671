"""`attnc search opnas | report | export` with synthetic evaluators defined in this module."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from attnc.cli import main
from attnc.search import Architecture, EvalResult, Evaluator, opnas


def score_conv_free(arch) -> float:
    """Synthetic evaluator for --evaluator test_search_cli:score_conv_free."""
    return sum(c.formula.count("softsign(") for c in arch.layers if c.kind == "attention") \
        - sum(c.kind == "conv" for c in arch.layers)


def test_cli_search_report_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "opnas", "--out", str(out), "--layers", "2", "--budget", "8", "--population", "4",
            "--top-k", "2", "--children", "2", "--evaluator", "test_search_cli:score_conv_free",
            "--no-progress", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["evaluated"] + first["failed"] == 8
    # the reported best is the best row of the study, and its score is the evaluator's
    db = sqlite3.connect(out / "study.db")
    top = db.execute("SELECT MAX(score) FROM candidates WHERE status='done'").fetchone()[0]
    db.close()
    best = Architecture.from_json(first["best"]["architecture"])
    assert first["best"]["score"] == top == score_conv_free(best)

    assert main(args) == 2                           # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    args[args.index("8")] = "12"
    assert main(args + ["--resume"]) == 0            # continue to a larger budget
    assert json.loads(capsys.readouterr().out)["evaluated"] == 12

    plot = tmp_path / "search.png"
    assert main(["search", "report", str(out), "--json", "--plot", str(plot)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"evaluated", "failed", "duplicates", "best"} <= set(rep) and rep["evaluated"] == 12
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def score_mixed(arch) -> float:
    """Synthetic evaluator for --evaluator test_search_cli:score_mixed: one conv layer is best."""
    return -abs(sum(c.kind == "conv" for c in arch.layers) - 1)


def test_report_params_and_flops_match_hand_counts(tmp_path, capsys):
    """`search report --json`: per layer params / FLOPs and the encoder's params, against hand counts
    (attention: the projections of the formula's inputs + output dense; conv: GLU projection, the
    (h, K) kernel, output dense, 2·n·C·K multiply-adds) and the real model's parameters."""
    from attnc.compiler.api import analyze
    from attnc.runtime.modeling import AttncBertModel

    out = tmp_path / "run"
    assert main(["search", "opnas", "--out", str(out), "--layers", "2", "--budget", "6", "--population", "4",
                 "--hidden", "32", "--ffn", "48", "--heads", "4", "--evaluator", "test_search_cli:score_mixed",
                 "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "report", str(out), "--json", "--top", "6"]) == 0
    rep = json.loads(capsys.readouterr().out)
    d, h, n = 32, 4, 128
    kinds = set()
    for entry in rep["top"]:
        arch = Architecture.from_json(entry["architecture"])
        for layer in entry["layers"]:
            kinds.add(layer["kind"])
            if layer["kind"] == "conv":
                k = layer["kernel_size"]
                assert layer["params"] == (d * 2 * d + 2 * d) + h * k + (d * d + d)
                assert layer["flops"] == 2 * n * d * k
            else:
                inputs = analyze(layer["formula"]).inputs
                assert layer["params"] == len(inputs) * (d * d + d) + (d * d + d)
        model = AttncBertModel(arch.to_config(), add_pooling_layer=False)
        assert entry["params"] == sum(p.numel() for p in model.encoder.parameters())
    assert kinds == {"conv", "attention"}   # both counts were checked


@pytest.mark.parametrize("spec", ["nope", "os:system(1)", "no_such_module_xyz:f", "json:no_such_fn"])
def test_cli_bad_evaluator_is_exit_2(tmp_path, capsys, spec):
    assert main(["search", "opnas", "--out", str(tmp_path / "r"), "--evaluator", spec, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "evaluator" in err


def test_cli_export_without_supernet_warns_and_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "opnas", "--out", str(out), "--layers", "2", "--budget", "4", "--population", "4",
                 "--evaluator", "test_search_cli:score_conv_free", "--no-progress", "--json"]) == 0
    best = Architecture.from_json(json.loads(capsys.readouterr().out)["best"]["architecture"])
    assert main(["search", "export", str(out), "--rank", "1", "--out", str(tmp_path / "m")]) == 0
    assert "freshly initialised" in capsys.readouterr().err
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(tmp_path / "m")
    assert model.config.layers == best.to_config().layers
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")           # the proxy's tokenizer goes with it
    assert len(tok) == model.config.vocab_size and tok.mask_token == "[MASK]"
    assert main(["search", "export", str(out), "--rank", "99", "--out", str(tmp_path / "m2")]) == 2


class _SupernetEvaluator(Evaluator):
    """Weight sharing stand-in: a real BIWS supernet whose weights the 'training' scales by 2."""

    weight_sharing = True

    def __init__(self, space):
        from attnc.search.biws import Supernet
        self.net = Supernet(space, vocab_size=64, max_position_embeddings=32)

    def runner(self):
        return _score

    def commit(self, arch, result):
        with torch.no_grad():
            self.net.shared.bert.embeddings.word_embeddings.weight.mul_(2.0)

    def state_dict(self):
        return {"supernet": self.net.state_copy()}


def _score(arch, payload, seed):
    return EvalResult(score=float(score_conv_free(arch)))


def test_cli_export_uses_the_studys_supernet(tmp_path, capsys):
    from attnc.search.biws import Supernet, export_model
    space = opnas.Space(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2)
    ev = _SupernetEvaluator(space)
    r = opnas.search(space, ev, budget=3, population=3, study=tmp_path / "run" / "study.db")
    assert main(["search", "export", str(tmp_path / "run"), "--rank", "1", "--out", str(tmp_path / "m")]) == 0
    assert "supernet weights" in capsys.readouterr().out
    from transformers import AutoModelForMaskedLM
    got = AutoModelForMaskedLM.from_pretrained(tmp_path / "m")
    want = export_model(ev.net, r.best_architecture)    # the in-memory supernet after 3 commits
    for (k, a), (k2, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    emb = got.state_dict()["bert.embeddings.word_embeddings.weight"]
    fresh = Supernet(space, vocab_size=64, max_position_embeddings=32).shared.bert.embeddings.word_embeddings.weight
    assert torch.allclose(emb, fresh * 8)            # three write-backs, each x2


def test_resume_takes_the_studys_settings(tmp_path, capsys):
    """--resume needs only --out and a budget: the space and algorithm settings come from the study;
    a flag that contradicts them is an error (exit 2), and nothing is lost."""
    out = tmp_path / "run"
    base = ["search", "opnas", "--out", str(out), "--evaluator", "test_search_cli:score_conv_free",
            "--no-progress", "--json"]
    assert main(base + ["--layers", "2", "--hidden", "32", "--ffn", "48", "--heads", "2", "--budget", "6",
                        "--population", "4", "--top-k", "2", "--children", "2", "--seed", "3",
                        "--algorithm", "ea"]) == 0
    capsys.readouterr()
    assert main(base + ["--budget", "10", "--resume"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["evaluated"] + s["failed"] == 10
    arch = Architecture.from_json(s["best"]["architecture"])
    assert (len(arch.layers), arch.hidden_size, arch.num_heads) == (2, 32, 2)
    db = sqlite3.connect(out / "study.db")
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    n = db.execute("SELECT COUNT(*) FROM candidates WHERE status IN ('done', 'failed')").fetchone()[0]
    db.close()
    assert (meta["algorithm"], meta["seed"], meta["population"]) == ("ea", 3, 4) and n == 10
    assert main(base + ["--budget", "12", "--resume", "--population", "9"]) == 2
    assert "population" in capsys.readouterr().err


class NotAnEvaluator:
    pass


@pytest.mark.parametrize("extra, needle", [
    (["--ray", "0"], "--ray"), (["--ray", "-1"], "--ray"), (["--ray", "2", "--ray-address", "x:1"], "one of"),
    (["--ray-address", "127.0.0.1:1"], "Ray cluster"),
    (["--evaluator", "test_search_cli:NotAnEvaluator"], "class"),
    (["--evaluator", "test_search_cli:score_conv_free", "--task", "mlm"], "--evaluator"),
    (["--task", "glue/nope"], "task"), (["--shared-steps", "0"], "shared_pretrain_steps"),
])
def test_cli_bad_search_settings_exit_2_before_any_study(tmp_path, capsys, extra, needle):
    out = tmp_path / "r"
    assert main(["search", "opnas", "--out", str(out), "--layers", "1", "--budget", "2", "--no-progress",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err
    assert not (out / "study.db").exists()


def test_resuming_a_function_scored_study_needs_its_evaluator(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "opnas", "--out", str(out), "--layers", "1", "--budget", "2", "--population", "2",
            "--evaluator", "test_search_cli:score_conv_free", "--no-progress", "--json"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["search", "opnas", "--out", str(out), "--budget", "3", "--resume", "--no-progress"]) == 2
    assert "test_search_cli:score_conv_free" in capsys.readouterr().err
    assert main(args[:args.index("--budget")] + ["--budget", "3", "--resume"] + args[args.index("--budget") + 2:]) == 0


def test_cli_unwritable_outputs_are_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "opnas", "--out", str(out), "--layers", "1", "--budget", "2", "--population", "2",
                 "--evaluator", "test_search_cli:score_conv_free", "--no-progress", "--json"]) == 0
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    for argv in (["search", "export", str(out), "--out", str(tmp_path / "afile")],
                 ["search", "report", str(out), "--plot", str(out / "study.db" / "x.png")],
                 ["search", "opnas", "--out", str(tmp_path / "afile"), "--budget", "2"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(tmp_path) in err
    assert (tmp_path / "afile").read_text() == "x"


def test_cli_report_bad_plot_format_is_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "opnas", "--out", str(out), "--layers", "1", "--budget", "2", "--population", "2",
                 "--evaluator", "test_search_cli:score_conv_free", "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "report", str(out), "--plot", str(tmp_path / "x.bogus")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ".png" in err and not (tmp_path / "x.bogus").exists()


def db_rows(out, sql):
    db = sqlite3.connect(out / "study.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_cli_proxy_flags_reach_the_proxy(tmp_path, capsys):
    """--task mlm --shared-steps 3: each weight-shared child trains 3 MLM steps and is scored by its
    held-out MLM loss (a negative number; no fine-tune)."""
    out = tmp_path / "run"
    assert main(["search", "opnas", "--out", str(out), "--layers", "1", "--hidden", "32", "--ffn", "48",
                 "--heads", "2", "--budget", "2", "--population", "2", "--task", "mlm", "--shared-steps", "3",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    db = sqlite3.connect(out / "study.db")
    rows = db.execute("SELECT steps, score, metrics FROM candidates WHERE status='done'").fetchall()
    db.close()
    assert len(rows) == 2 and all(steps == 3 for steps, _, _ in rows)
    for _, score, metrics in rows:
        assert score == -json.loads(metrics)["mlm_loss"] and "task" not in json.loads(metrics)
    # the best is the top re-scored from the final supernet (3 seeds by default): the best mean
    finals = db_rows(out, "SELECT candidate, score FROM rescores WHERE kind='final' AND status='done'")
    means = {}
    for cid, score in finals:
        means.setdefault(cid, []).append(score)
    assert len(finals) == 2 * 3
    best_id = max(means, key=lambda c: sum(means[c]) / 3)
    assert s["best"]["id"] == best_id and s["best"]["rescored"]["score"] == pytest.approx(sum(means[best_id]) / 3)
    # resumed without the flags: the study's own proxy settings (every score an MLM loss)
    base = ["search", "opnas", "--out", str(out), "--no-progress", "--json", "--resume"]
    assert main(base + ["--budget", "3"]) == 0
    capsys.readouterr()
    db = sqlite3.connect(out / "study.db")
    rows = db.execute("SELECT steps, score, metrics FROM candidates WHERE status='done'").fetchall()
    db.close()
    assert len(rows) == 3 and all(steps == 3 and score == -json.loads(m)["mlm_loss"] for steps, score, m in rows)
    # another task, or another evaluator, would mix scores of different meaning: refused
    assert main(base + ["--budget", "4", "--task", "rt-polarity"]) == 2
    assert "evaluator" in capsys.readouterr().err
    assert main(base + ["--budget", "4", "--evaluator", "test_search_cli:score_conv_free"]) == 2
    assert "evaluator" in capsys.readouterr().err
