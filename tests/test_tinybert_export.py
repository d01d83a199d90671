"""Found architectures export as vanilla BERT folders whenever they are one (qkv size = hidden size,
standard attention): `model_type: bert`, loaded by transformers.BertModel in a process that never
imports attnc, with outputs equal to the SuperPLM's sub-model; otherwise attnc_bert, with the reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attnc.cli import main
from attnc.compiler.errors import ConfigError
from attnc.search.tinybert.export import save_model
from attnc.search.tinybert.space import Arch, Space
from attnc.search.tinybert.supernet import SuperPLM

SPACE = Space(max_layers=3, max_hidden=64, max_ffn=128, max_heads=4, head_dim=16, vocab_size=120,
              max_position_embeddings=32)

# runs in a fresh interpreter: transformers only (attnc must not be imported, directly or not)
LOADER = textwrap.dedent("""
    import json, sys, torch, transformers
    folder, ids, mask, out = sys.argv[1], *sys.argv[2:]
    ids, mask = torch.load(ids), torch.load(mask)
    enc = transformers.BertModel.from_pretrained(folder).eval()
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = mlm(input_ids=ids, attention_mask=mask).logits
    torch.save({"hidden": h, "logits": logits, "type": type(mlm).__name__,
                "attnc": any(m == "attnc" or m.startswith("attnc.") for m in sys.modules)}, out)
""")


def _randomised(space, seed=0):
    torch.manual_seed(seed)
    sup = SuperPLM(space)
    with torch.no_grad():
        for p in sup.parameters():
            p.normal_(0.0, 0.3)
    return sup.eval()


def _batch(n=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (2, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_a_bert_shaped_arch_exports_as_a_vanilla_bert_loaded_without_attnc(tmp_path):
    sup = _randomised(SPACE)
    arch = Arch(2, 48, 96, 3, 48)                    # qkv = hidden
    sub = sup.extract(arch)
    info = save_model(sub, tmp_path / "m")
    assert info["format"] == "bert" and info["reason"] is None
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertForMaskedLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"]) \
        == (48, 2, 96, 3)
    ids, mask = _batch()
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(mask, tmp_path / "mask.pt")
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "m"), str(tmp_path / "ids.pt"),
                        str(tmp_path / "mask.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["attnc"] is False and got["type"] == "BertForMaskedLM"
    sup.set_arch(arch)
    with torch.no_grad():
        want = sup(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert torch.allclose(got["hidden"][real], want.hidden_states[-1][real], atol=1e-5)
    assert torch.allclose(got["logits"][real], want.logits[real], atol=1e-4)


@pytest.mark.parametrize("arch, formula, words", [
    (Arch(2, 48, 96, 2, 32), None, "qkv size 32 and hidden size 48"),
    (Arch(2, 48, 96, 3, 48), "softsign(Q @ K^T / sqrt(d)) @ V", "not BERT's"),
])
def test_other_archs_stay_attnc_bert_and_say_why(tmp_path, arch, formula, words):
    space = Space(**{**SPACE.to_json(), "formula": formula})
    sub = SuperPLM(space).extract(arch)
    info = save_model(sub, tmp_path / "m")
    assert info["format"] == "attnc_bert" and words in info["reason"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "attnc_bert"
    with pytest.raises(ConfigError, match=words.split()[0]):
        save_model(sub, tmp_path / "n", format="bert")
    assert not (tmp_path / "n").exists()
    # asked for: attnc_bert even when a vanilla BERT is possible
    bert_shaped = SuperPLM(SPACE).extract(Arch(1, 32, 64, 2, 32))
    assert save_model(bert_shaped, tmp_path / "a", format="attnc")["format"] == "attnc_bert"


def test_extract_cli_exports_a_vanilla_bert_and_refuses_format_bert_when_impossible(tmp_path, capsys):
    from transformers import BertForMaskedLM

    from attnc.runtime.data import load_tokenizer
    from attnc.search.tinybert.train import save_superplm

    space = Space(max_layers=2, max_hidden=64, max_ffn=128, max_heads=2, head_dim=32, vocab_size=len(load_tokenizer()),
                  max_position_embeddings=64)
    torch.manual_seed(0)
    sup = SuperPLM(space)
    save_superplm(sup, tmp_path / "sp")
    assert main(["search", "superplm", "extract", "--supernet", str(tmp_path / "sp"), "--arch", "2-64-96-2-64",
                 "--json", "--out", str(tmp_path / "m")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["export"]["format"] == "bert"
    bert = BertForMaskedLM.from_pretrained(tmp_path / "m")
    want = sup.extract(Arch.parse("2-64-96-2-64"))
    for (k, a), (k2, b) in zip(bert.state_dict().items(), want.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert main(["search", "superplm", "extract", "--supernet", str(tmp_path / "sp"), "--arch", "2-60-96-1-32",
                 "--format", "bert", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "qkv size 32 and hidden size 60" in err and "Traceback" not in err and not (tmp_path / "n").exists()
    assert main(["search", "superplm", "extract", "--supernet", str(tmp_path / "sp"), "--arch", "2-60-96-1-32",
                 "--out", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    assert "as attnc_bert" in out and "qkv size 32 and hidden size 60" in out
