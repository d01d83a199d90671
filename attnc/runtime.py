"""attnc.runtime — a BERT runtime on Hugging Face transformers with per-layer compiled attention.

    import attnc.runtime as rt
    config = rt.resolve_config("tiny-hybrid")           # or "5-564-1054-8-512", a JSON file, ...
    model = rt.AttncBertForMaskedLM(config)
    model.save_pretrained("out"); transformers.AutoModelForMaskedLM.from_pretrained("out")

After `import attnc`, model_type "attnc_bert" is registered with AutoConfig, AutoModel,
AutoModelForMaskedLM, AutoModelForPreTraining and AutoModelForSequenceClassification as soon
as transformers loads them (attnc/_hf.py), without importing transformers up front.
"""
import importlib

from attnc._lazy import lazy_getattr

from attnc._layout import make_stage_package

make_stage_package(globals())   # its modules are the files of runtime/ (attnc/_layout.py)

# Names load on first use (module __getattr__): `attnc.runtime.cli` is imported by every `attnc`
# command to build the parser, and importing transformers/torch up front costs seconds and
# hundreds of MB (`attnc check` must stay fast).
_LAZY = {
    **dict.fromkeys(("AUTOBERT_ZERO_FORMULAS", "KERNEL_SIZES", "MODEL_TYPE", "PRESETS", "STANDARD_FORMULA",
                     "AttncBertConfig", "parse_arch", "parse_layer", "resolve_config"), "config"),
    **dict.fromkeys(("count_flops", "count_parameters", "flops_breakdown"), "counters"),
    **dict.fromkeys(("AttncBertForMaskedLM", "AttncBertForPreTraining", "AttncBertForSequenceClassification",
                     "AttncBertModel", "AttncBertPreTrainedModel", "from_bert", "load_bert_weights",
                     "plan_summary"), "modeling"),
}


__getattr__ = lazy_getattr(globals(), _LAZY)


def register_auto_classes() -> None:
    """Register the attnc BERT classes with the transformers Auto* factories now (idempotent).

    `import attnc` already arranges this (attnc/_hf.py) as soon as transformers loads its Auto
    classes; call it to force the registration eagerly."""
    from attnc import _hf

    for name, hook in _hf._HOOKS.items():
        hook(importlib.import_module(name))

__all__ = [
    "AUTOBERT_ZERO_FORMULAS",
    "KERNEL_SIZES",
    "MODEL_TYPE",
    "PRESETS",
    "STANDARD_FORMULA",
    "AttncBertConfig",
    "AttncBertForMaskedLM",
    "AttncBertForPreTraining",
    "AttncBertForSequenceClassification",
    "AttncBertModel",
    "AttncBertPreTrainedModel",
    "count_flops",
    "count_parameters",
    "flops_breakdown",
    "from_bert",
    "load_bert_weights",
    "parse_arch",
    "parse_layer",
    "plan_summary",
    "register_auto_classes",
    "resolve_config",
]
