"""The README's search API blocks, run from the README text itself (so the README cannot drift from
the code): OP-NAS at a tiny budget with a synthetic evaluator, AutoTinyBERT as written."""
from __future__ import annotations

import os

import torch
from readme_text import code_blocks, section


def python_block(heading: str) -> str:
    """The first ```python block of the README section headed `heading`."""
    blocks = code_blocks(section(heading), "python")
    assert blocks, f"no python block in {heading!r}"
    return blocks[0]


def test_opnas_block(tmp_path):
    code = python_block("### OP-NAS: evolved attention formulas (AutoBERT-Zero)")
    # the same calls at a test's size: a synthetic evaluator instead of the proxy, a tiny budget
    small = (code.replace("evaluate=None", "evaluate=known_ops").replace("budget=100", "budget=6")
             .replace("population=100", "population=4").replace('"runs/x/study.db"', repr(str(tmp_path / "s.db"))))
    assert small.count("known_ops") == 1 and "budget=6" in small and str(tmp_path) in small
    from attnc.search.synthetic import known_ops
    ns = {"known_ops": known_ops}
    exec(compile(small, "README.md", "exec"), ns)
    result = ns["result"]
    assert len(result.evaluations) == 6 and result.best_score == max(e.score for e in result.evaluations)
    assert result.best_score == known_ops(result.best_architecture)


def test_tinybert_block(tmp_path, monkeypatch):
    from attnc.search import tinybert
    from attnc.search.tinybert.latency import arch_sequence

    code = python_block("### AutoTinyBERT: searched widths under a latency limit")
    # the block loads a predictor from runs/lat: fit one on a known linear cost there first
    space = tinybert.Space(max_layers=4, max_hidden=256, max_ffn=1024, max_heads=4, mode="mlm", vocab_size=30522)
    records = [{"arch": str(a), "ms": 0.5 + 1e-6 * space.flops(a, 128)} for a in arch_sequence(space, 40, seed=1)]
    pred, _ = tinybert.LatencyPredictor.fit(space, records, hidden=(16,), epochs=50, seed=0)
    monkeypatch.chdir(tmp_path)
    pred.save("runs/lat")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["out"].logits.shape == (2, 16, 30522)
    assert type(ns["sub"]).__name__ == "AttncBertForMaskedLM"
    supernet, sub, ids, mask = ns["supernet"], ns["sub"].eval(), ns["ids"], ns["mask"]
    supernet.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub(input_ids=ids, attention_mask=mask).logits,
                                   supernet(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    assert pred.predict(ns["arch"]) == tinybert.LatencyPredictor.load(os.path.join("runs", "lat")).predict(ns["arch"])
