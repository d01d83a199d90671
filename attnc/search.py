"""Architecture search over attnc BERTs: OP-NAS (AutoBERT-Zero) with BIWS weight sharing.

    from attnc.search import opnas
    result = opnas.search(opnas.Space(num_layers=4), evaluate=fn, budget=100, study="runs/x/study.db")
"""
from attnc._layout import make_stage_package

make_stage_package(globals())   # its modules are the files of search/ (attnc/_layout.py)

from .evaluator import CallableEvaluator, EvalResult, Evaluator  # noqa: E402
from .proxy_fidelity import FidelityConfig, fidelity  # noqa: E402
from .space import Architecture, LayerChoice  # noqa: E402

__all__ = ["Architecture", "LayerChoice", "Evaluator", "EvalResult", "CallableEvaluator", "fidelity",
           "FidelityConfig"]
