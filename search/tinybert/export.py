"""Saving a found sub-model as a Hugging Face folder: a vanilla BERT whenever it is one.

    from attnc.search.tinybert.export import save_model
    info = save_model(supernet.extract(arch), "runs/best", tokenizer=tok)   # {"format", "how", "reason"}

An AutoTinyBERT architecture L-dm-df-h-dqkv is a plain BERT when its qkv width equals its hidden
size and every layer runs standard attention: it is then written as `transformers.BertForMaskedLM`
(config `model_type: bert`), a folder any transformers install loads with `BertModel` /
`AutoModel*` and no `import attnc`. Otherwise (dqkv != dm, another attention formula) it stays an
`attnc_bert` folder, which loads after `import attnc`, and the reason is returned (and printed by the
CLI): BertConfig has no separate qkv width.
"""
from __future__ import annotations

from pathlib import Path

from attnc.compiler.errors import ConfigError

FORMATS = ("auto", "bert", "attnc")


def save_model(model, folder: str | Path, *, tokenizer=None, format: str = "auto") -> dict:
    """Write `model` (an attnc model, e.g. SuperPLM.extract's) to `folder` with save_pretrained (and
    the tokenizer when given). format "auto": vanilla BERT when expressible, else attnc_bert; "bert":
    vanilla BERT or a ConfigError saying why not; "attnc": attnc_bert. Returns {"format": "bert" |
    "attnc_bert", "how": how to load it, "reason": why it is not a vanilla BERT (None when it is)}."""
    from attnc.runtime.modeling import bert_incompatibility, to_bert

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}", hint=f"use one of {', '.join(FORMATS)}")
    why = bert_incompatibility(model.config)
    if format == "bert" and why is not None:
        raise ConfigError(f"cannot export a vanilla BERT: {why}",
                          hint="export with --format auto or attnc (an attnc_bert folder, loads after `import attnc`)")
    if format != "attnc" and why is None:
        out, info = to_bert(model), {"format": "bert", "reason": None,
                                     "how": "a vanilla BERT: transformers.BertModel / AutoModelForMaskedLM, "
                                            "no `import attnc` needed"}
    else:
        out = model
        info = {"format": "attnc_bert", "reason": why or "asked for with format='attnc'",
                "how": "AutoModelForMaskedLM after `import attnc`"}
    out.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return info
