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
