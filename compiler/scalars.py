"""Arithmetic on Python floats, with IEEE results instead of exceptions (no torch import).

The one float form of division, powers, exp, log and sqrt: constant folding in check.py, the
float evaluation of elementwise definitions (elementwise.py) and the scalar lines of generated
code (torch_ops re-exports s_div and s_pow) all call these.
"""
from __future__ import annotations

import math


def s_div(x: float, y: float) -> float:
    if y == 0:
        return math.copysign(math.inf, x) if x != 0 else math.nan
    return x / y


def s_pow(x: float, y: float) -> float:
    try:
        if x < 0 and not float(y).is_integer():
            return math.nan
        return float(x ** y)
    except (OverflowError, ZeroDivisionError):
        return math.inf


def s_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def s_log(x: float) -> float:
    return math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)


def s_sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan


__all__ = ["s_div", "s_pow", "s_exp", "s_log", "s_sqrt"]
