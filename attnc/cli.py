"""The `attnc` command line. Each stage registers its own subcommands:

    attnc.compiler.cli  compile, check, equiv, ops, demo
    attnc.kernels.cli   bench
    attnc.runtime.cli   pretrain, finetune, analyze, latency

User errors (AttncError) print their message with the formula position and exit 2, with no
traceback; argparse usage errors exit 2 as well.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from attnc.compiler.errors import AttncError

STAGES = ("attnc.compiler.cli", "attnc.kernels.cli", "attnc.runtime.cli", "attnc.search.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnc", description="Symbolic attention-expression compiler.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for modname in STAGES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:   # stage without commands yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttncError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from attnc import __version__
    return f"attnc {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
