"""Architecture search over attnc BERTs: OP-NAS (AutoBERT-Zero) with BIWS weight sharing.

    from attnc.search import opnas
    result = opnas.search(opnas.Space(num_layers=4), evaluate=fn, budget=100, study="runs/x/study.db")
"""
from .evaluator import CallableEvaluator, EvalResult, Evaluator
from .space import Architecture, LayerChoice

__all__ = ["Architecture", "LayerChoice", "Evaluator", "EvalResult", "CallableEvaluator"]
