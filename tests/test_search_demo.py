"""`attnc demo`'s search part at a tiny budget: a real BIWS proxy search, the export, and a resume."""
from __future__ import annotations

import json
import sqlite3


def test_search_demo_runs_exports_and_resumes(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from attnc.runtime.demo import run_search_demo
    from attnc.search.space import Architecture

    kw = dict(budget=2, progress=False, num_layers=1, hidden_size=32, shared_steps=2, warmup_children=2,
              rescore_seeds=2)
    first = run_search_demo(tmp_path, **kw)
    s = first["search"]
    db = sqlite3.connect(tmp_path / "search" / "study.db")
    rows = db.execute("SELECT arch, score, metrics, steps FROM candidates WHERE status='done'").fetchall()
    warm = db.execute("SELECT status, steps FROM warmup").fetchall()
    finals = db.execute("SELECT r.candidate, r.score, c.arch FROM rescores r JOIN candidates c ON c.id = r.candidate "
                        "WHERE kind='final' AND r.status='done'").fetchall()
    db.close()
    assert len(rows) == 2 and all(steps == 2 for *_, steps in rows)
    assert warm == [("done", 2), ("done", 2)] and s["warmup_children"] == 2    # the supernet warm-up, recorded
    assert all(-json.loads(m)["mlm_loss"] == score for _, score, m, _ in rows)  # score = -held-out MLM loss
    # the printed best is the top re-scored from the final supernet (2 seeds each), by its mean
    means = {}
    for cid, score, arch_json in finals:
        means.setdefault((cid, arch_json), []).append(score)
    assert len(finals) == 2 * 2
    (cid, arch_json), scores = max(means.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    assert s["best_score"] == sum(scores) / 2
    arch = Architecture.from_json(json.loads(arch_json))
    model = AutoModel.from_pretrained(first["export"])
    assert model.config.layers == arch.to_config().layers
    assert len(AutoTokenizer.from_pretrained(first["export"])) == model.config.vocab_size
    again = run_search_demo(tmp_path, **kw)                        # the study is complete: nothing re-run
    assert again["search"]["best_score"] == s["best_score"] and again["search"]["evaluated"] == 2
    more = run_search_demo(tmp_path, **{**kw, "budget": 3})        # a larger budget continues the study
    assert more["search"]["evaluated"] == 3 and more["search"]["best_so_far"][:2] == s["best_so_far"]
    db = sqlite3.connect(tmp_path / "search" / "study.db")
    made_after = {g for (g,) in db.execute("SELECT generation FROM rescores WHERE kind='final'")}
    db.close()
    assert made_after == {3}     # re-scored again from the supernet after the third evaluation
