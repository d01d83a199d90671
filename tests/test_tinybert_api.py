"""The public API block of issue 10 / the README, run as written, and the lazy package surface."""
from __future__ import annotations

import subprocess
import sys

import torch

from attnc.search import tinybert


def test_readme_api_block_runs_as_written(tmp_path):
    space = tinybert.Space(max_layers=4, max_hidden=256, max_ffn=1024, max_heads=4, mode="mlm",
                           vocab_size=30522)
    supernet = tinybert.SuperPLM(space)
    arch = tinybert.Arch.parse("3-200-300-3-192")
    ids = torch.randint(0, 30522, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    supernet.eval()
    supernet.set_arch(arch)
    out = supernet(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 12, 30522)
    sub = supernet.extract(arch).eval()
    assert type(sub).__name__ == "AttncBertForMaskedLM"
    with torch.no_grad():
        ref = supernet(input_ids=ids, attention_mask=mask).logits
        got = sub(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)

    # a predictor fitted on made-up latencies (ms = a known linear cost), saved, loaded, asked
    from attnc.search.tinybert.latency import arch_sequence
    archs = arch_sequence(space, 40, seed=1)
    records = [{"arch": str(a), "ms": 0.5 + 1e-6 * space.flops(a, 128)} for a in archs]
    pred, _ = tinybert.LatencyPredictor.fit(space, records, hidden=(16,), epochs=50, seed=0)
    pred.save(tmp_path / "lat")
    ms = tinybert.LatencyPredictor.load(tmp_path / "lat").predict(arch)
    assert isinstance(ms, float) and ms == pred.predict(arch)


def test_every_public_name_resolves_and_import_stays_light():
    for name in tinybert.__all__:
        assert getattr(tinybert, name) is not None, name
    code = ("import sys, attnc.search.tinybert as t; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)
