"""Registration of the attnc BERT classes with Hugging Face's Auto* factories.

Importing transformers' model classes costs seconds, so `import attnc` does not import it.
Instead: if transformers' auto modules are already loaded, the classes are registered at once;
otherwise an import hook registers them right after transformers loads its auto modules. Either
way, after `import attnc`, `AutoConfig` / `AutoModel*.from_pretrained` load attnc checkpoints
with no trust_remote_code.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys

log = logging.getLogger("attnc")

_CONFIG_MOD = "transformers.models.auto.configuration_auto"
_MODEL_MOD = "transformers.models.auto.modeling_auto"


def _register_config(auto) -> None:
    """auto: transformers.models.auto.configuration_auto (just executed)."""
    from attnc.runtime.config import MODEL_TYPE, AttncBertConfig
    try:
        auto.AutoConfig.register(MODEL_TYPE, AttncBertConfig)
    except ValueError:   # already registered
        pass


def _register_models(auto) -> None:
    """auto: transformers.models.auto.modeling_auto (just executed)."""
    from attnc.runtime import modeling as m
    pairs = ((auto.AutoModel, m.AttncBertModel), (auto.AutoModelForMaskedLM, m.AttncBertForMaskedLM),
             (auto.AutoModelForPreTraining, m.AttncBertForPreTraining),
             (auto.AutoModelForSequenceClassification, m.AttncBertForSequenceClassification))
    for factory, cls in pairs:
        try:
            factory.register(cls.config_class, cls)
        except ValueError:   # already registered
            pass


_HOOKS = {_CONFIG_MOD: _register_config, _MODEL_MOD: _register_models}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration function right after one of transformers' auto modules executes."""

    def find_spec(self, name, path, target=None):
        if name not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module, _run=run, _name=name):
            _run(module)
            _safe(_HOOKS[_name], module)

        loader.exec_module = exec_module
        return spec


def _safe(fn, module) -> None:
    try:
        fn(module)
    except Exception as e:  # never break the user's transformers import
        log.warning("attnc: could not register with transformers' Auto classes: %s", e)


def install() -> None:
    """Register now with whatever of transformers is loaded, and hook what is not loaded yet."""
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            _safe(hook, sys.modules[name])
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
