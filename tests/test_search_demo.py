"""`attnc demo`'s search part at a tiny budget: a real BIWS proxy search, the export, and a resume."""
from __future__ import annotations

import json
import sqlite3


def test_search_demo_runs_exports_and_resumes(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from attnc.runtime.demo import run_search_demo
    from attnc.search.space import Architecture

    kw = dict(budget=2, progress=False, num_layers=1, hidden_size=32, shared_steps=2)
    first = run_search_demo(tmp_path, **kw)
    s = first["search"]
    db = sqlite3.connect(tmp_path / "search" / "study.db")
    rows = db.execute("SELECT arch, score, metrics, steps FROM candidates WHERE status='done'").fetchall()
    db.close()
    assert len(rows) == 2 and all(steps == 2 for *_, steps in rows)
    best = max(rows, key=lambda r: r[1])
    assert s["best_score"] == best[1] == -json.loads(best[2])["mlm_loss"]     # score = -held-out MLM loss
    arch = Architecture.from_json(json.loads(best[0]))
    model = AutoModel.from_pretrained(first["export"])
    assert model.config.layers == arch.to_config().layers
    assert len(AutoTokenizer.from_pretrained(first["export"])) == model.config.vocab_size
    again = run_search_demo(tmp_path, **kw)                        # the study is complete: nothing re-run
    assert again["search"]["best_score"] == s["best_score"] and again["search"]["evaluated"] == 2
    more = run_search_demo(tmp_path, **{**kw, "budget": 3})        # a larger budget continues the study
    assert more["search"]["evaluated"] == 3 and more["search"]["best_so_far"][:2] == s["best_so_far"]
