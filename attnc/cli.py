"""The `attnc` command line. Each stage registers its own subcommands:

    attnc.compiler.cli  compile, check, equiv, ops, demo
    attnc.kernels.cli   bench
    attnc.runtime.cli   pretrain, finetune, analyze, latency
    attnc.search.cli    search

A command imports only the stage that owns it (COMMANDS below), so `attnc check` loads neither
the kernels, the runtime (transformers) nor the search; `attnc --help` and unknown commands
load every stage. tests/test_cli.py checks that COMMANDS matches what the stages register.

User errors (AttncError) print their message with the formula position and exit 2, with no
traceback; argparse usage errors exit 2 as well.
"""
from __future__ import annotations

import argparse
import importlib
import sys

STAGES = ("attnc.compiler.cli", "attnc.kernels.cli", "attnc.runtime.cli", "attnc.search.cli")

# command -> the stage module that registers it
COMMANDS = {
    **dict.fromkeys(("compile", "check", "equiv", "ops", "demo"), "attnc.compiler.cli"),
    "bench": "attnc.kernels.cli",
    **dict.fromkeys(("pretrain", "finetune", "analyze", "latency"), "attnc.runtime.cli"),
    "search": "attnc.search.cli",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the stage that owns argv's command registers (when known)."""
    parser = argparse.ArgumentParser(prog="attnc", description="Symbolic attention-expression compiler.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    command = _command(argv)
    stages = (COMMANDS[command],) if command in COMMANDS else STAGES
    for modname in stages:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:   # stage without commands yet
                continue
            raise
        mod.register(sub)
    return parser


def _command(argv: list[str] | None) -> str | None:
    """The subcommand named in argv (the first word that is not an option), if any."""
    for word in argv or ():
        if not word.startswith("-"):
            return word
        if word == "--":
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    from attnc.compiler.errors import AttncError

    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_foreign_bars()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttncError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `attnc ... | head`: the reader left; stop quietly
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _quiet_foreign_bars() -> None:
    """Off a terminal (CI logs, Ray workers, `> log 2>&1`) attnc's own bars write a line every 30 s
    (attnc/_progress.py); Hugging Face's (saving shards, mapping datasets) would redraw with carriage
    returns, so they are switched off there, for this process and the ones it starts, unless the
    user set these variables."""
    from attnc._progress import is_terminal
    if not is_terminal(sys.stderr):
        import os
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")       # transformers and the hub
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets


def _version() -> str:
    from attnc import __version__
    return f"attnc {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
