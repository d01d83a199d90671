"""`attnc search superplm train|search|extract|report` and `attnc search latency` (this module prints).

Only argparse work at import time: the heavy modules load inside the command functions.
"""
from __future__ import annotations


def register(sub) -> None:
    """Add the AutoTinyBERT subcommands to `attnc search`'s subparsers."""
    # filled in by the AutoTinyBERT work (issue 10)
    return None
