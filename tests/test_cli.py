"""The `attnc` command line: reports, JSON, pictures, equivalence exit codes, clean errors."""
import json
import shutil
import subprocess
import sys

import pytest

from attnc.cli import main

STANDARD = "softmax(Q @ K^T / sqrt(d)) @ V"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compile_json_has_the_promised_fields(capsys):
    code, out, _ = run(capsys, "compile", STANDARD, "--json", "--seq", "128", "--dim", "64")
    assert code == 0
    obj = json.loads(out)
    assert obj["canonical"] == STANDARD and len(obj["hash"]) == 16
    assert obj["inputs"] == ["Q", "K", "V"]
    assert obj["params"] == 4 * (768 * 768 + 768)            # Q, K, V and output projections
    assert obj["flops"] == 12 * (4 * 64 * 128 ** 2 + 6 * 128 ** 2)


def test_compile_shows_ir_sympy_code_and_writes_dot(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    code, out, _ = run(capsys, "compile", "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
                       "--show", "ir", "--show", "sympy", "--show", "code", "--graph", str(dot))
    assert code == 0
    assert "canonical   softmax(Q @ softplus(K^T) / sqrt(d)) @ (K + Q)" in out
    assert "--- ir ---" in out and "matmul %0" in out and "@ 1:9" in out
    assert "Softmax(" in out                                  # SymPy's own printing
    assert "def forward(q, k, v, p, key_padding_mask=None):" in out
    assert dot.read_text().startswith("digraph attnc")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_compile_writes_svg(capsys, tmp_path):
    svg = tmp_path / "g.svg"
    assert run(capsys, "compile", STANDARD, "--graph", str(svg))[0] == 0
    assert "<svg" in svg.read_text()


def test_compile_file_of_named_formulas(capsys, tmp_path):
    f = tmp_path / "layers.attn"
    f.write_text("formula a = softmax(Q @ K^T / sqrt(d)) @ V\n"
                 "formula b {\n  let k = log(1 + exp(K^T))\n  softmax(Q @ k / sqrt(d)) @ (K + Q)\n}\n")
    code, out, _ = run(capsys, "compile", str(f), "--json")
    objs = json.loads(out)
    assert code == 0 and [o["name"] for o in objs] == ["a", "b"]


def test_check_and_equiv_exit_codes(capsys):
    assert run(capsys, "check", STANDARD)[0] == 0
    code, out, _ = run(capsys, "equiv", STANDARD, "softmax((K @ Q^T)^T / sqrt(d) + 1) @ V")
    assert code == 0 and "rewrite rules" in out
    code, out, _ = run(capsys, "equiv", "softplus(Q @ K^T) @ V", "--", "-logsigmoid(-(Q @ K^T)) @ V")
    assert code == 0 and "numerically equivalent" in out
    code, out, _ = run(capsys, "equiv", STANDARD, "softmax(K @ Q^T / sqrt(d)) @ V")
    assert code == 1 and "not equivalent" in out


def test_user_errors_exit_2_with_position(capsys):
    code, out, err = run(capsys, "compile", "softmax(Q @ K) @ V")
    assert code == 2 and "shape error" in err and "1:9" in err and "Traceback" not in err
    code, _, err = run(capsys, "check", "softmax(Q @ K^T) @")
    assert code == 2 and "unexpected end of formula" in err


def test_cli_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "attnc", "compile", "softmax(Q @ K^T) @ W"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown name 'W'" in proc.stderr and "Traceback" not in proc.stderr


def test_ops_lists_every_primitive(capsys):
    code, out, _ = run(capsys, "ops")
    for word in ["softmax", "logsigmoid", "softsign", "cos", "dist", "transpose", "scale", "where"]:
        assert word in out


def test_demo_compile_only(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--compile-only", "--out", str(tmp_path))
    assert code == 0
    assert out.count("canonical") == 3 and "finite=True" in out


# ---- start-up: what a command imports (measured in benchmarks/bench_cli_start.py, not timed here)

_HEAVY = ("torch", "transformers", "triton", "attnc.runtime", "attnc.kernels", "attnc.search")
_WRAPPER = """
import contextlib, io, json, sys
from attnc.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "triton")
               or m.startswith(("attnc.runtime", "attnc.kernels", "attnc.search")))
print(json.dumps({"code": code, "heavy": heavy, "out": out.getvalue()}))
"""


@pytest.mark.parametrize("argv", [
    ["check", STANDARD],
    ["compile", STANDARD],
    ["compile", STANDARD, "--json", "--show", "code", "--show", "ir", "--show", "sympy"],
    ["check", "softmax(Q @ K) @ V"],            # a user error: exit 2, still nothing heavy
    ["ops"],
])
def test_check_and_compile_import_no_torch_transformers_or_runtime(argv):
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["heavy"] == [], f"attnc {argv[0]} imported {res['heavy'][:8]}"
    assert res["code"] == (2 if argv[1:2] == ["softmax(Q @ K) @ V"] else 0)
    if "code" in argv:   # the generated PyTorch source is shown without importing torch
        assert "def forward(q, k, v, p, key_padding_mask=None):" in json.loads(res["out"])["show"]["code"]


def test_import_attnc_loads_no_compiler_until_used():
    code = ("import sys, attnc\n"
            "before = sorted(m for m in sys.modules if m.startswith('attnc.') or m in ('sympy', 'networkx', 'lark'))\n"
            "fn = attnc.analyze\n"
            "print(before, 'sympy' in sys.modules, attnc.AttncError.__module__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["['attnc._hf']", "True", "attnc.compiler.errors"]


def test_command_table_matches_what_the_stages_register():
    import argparse
    import importlib

    from attnc.cli import COMMANDS, STAGES
    found = {}
    for modname in STAGES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(modname).register(sub)
        found.update(dict.fromkeys(sub.choices, modname))
    assert found == COMMANDS


def test_help_lists_every_stage_and_unknown_commands_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("compile", "check", "bench", "pretrain", "search"):
        assert command in out
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_compile_fingerprint_is_opt_in(capsys):
    code, out, _ = run(capsys, "compile", STANDARD)
    assert code == 0 and "fingerprint" not in out
    code, out, _ = run(capsys, "compile", STANDARD, "--fingerprint", "--json")
    from attnc.compiler.api import analyze
    from attnc.compiler.equiv import fingerprint
    assert code == 0 and json.loads(out)["fingerprint"] == fingerprint(analyze(STANDARD).simplified)


def test_show_code_is_the_torch_backends_source(capsys):
    import attnc
    text = "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)"
    code, out, _ = run(capsys, "compile", text, "--json", "--show", "code")
    assert code == 0 and json.loads(out)["show"]["code"] == attnc.compile(text).source


@pytest.mark.parametrize("argv,message", [
    (["--aot", "sm_70"], "unknown AOT target(s) sm_70"),
    (["--aot", "sm_80", "--dim", "64,x"], "--dim '64,x': expected numbers"),
    (["--aot", "sm_80", "--dim", "512"], "head dims are 1..256"),
    (["--aot", "sm_80", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    ([], "timing takes one formula"),
])
def test_bench_aot_bad_options_exit_2(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["bench", *argv, "softmax(Q @ K^T) @ V", "softmax(Q @ K^T / sqrt(d)) @ V"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
