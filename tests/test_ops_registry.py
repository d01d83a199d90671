"""User-defined elementwise functions (attnc.ops.register_elementwise), end to end.

Registered from outside the package like a user would; every result is compared with a float64
reference written here by hand (plain torch, not attnc), forward and gradients, on the torch
backend and in the fused Triton kernels (TRITON_INTERPRET=1 on a CPU, small shapes).
"""
import math

import pytest
import sympy as sp
import torch

import attnc
import attnc.ops
from attnc.compiler.errors import ConfigError

x = sp.Symbol("x")
GELU_C = math.sqrt(2 / math.pi)
GELU_EXPR = x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 1000000) * x ** 3)))


@pytest.fixture(scope="module", autouse=True)
def registered():
    attnc.ops.register_elementwise("sqr", x ** 2)
    attnc.ops.register_elementwise("gelu_tanh", GELU_EXPR, doc="GELU, tanh approximation")
    yield
    # other test files use "sqr" as an unknown name
    attnc.ops.unregister_elementwise("sqr")
    attnc.ops.unregister_elementwise("gelu_tanh")


def sqr_ref(t):
    return t * t


def gelu_ref(t):
    return 0.5 * t * (1 + torch.tanh(GELU_C * (t + 0.044715 * t ** 3)))


def softmax_ref(s, keep=None):
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    return torch.softmax(s, dim=-1)


# formula, its float64 reference (q, k, v, keep) -> out, the inputs it reads
CASES = [
    ("softmax(sqr(Q) @ K^T / sqrt(d)) @ V",
     lambda q, k, v, keep: softmax_ref(sqr_ref(q) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]),
                                       keep) @ v),
    ("softmax(Q @ K^T / sqrt(d)) @ gelu_tanh(V)",
     lambda q, k, v, keep: softmax_ref(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), keep)
     @ gelu_ref(v)),
    ("softsign(gelu_tanh(Q @ K^T / d)) @ sqr(V)",
     lambda q, k, v, keep: _masked_cols(torch.nn.functional.softsign(
         gelu_ref(q @ k.transpose(-1, -2) / q.shape[-1])), keep) @ sqr_ref(v)),
]


def _masked_cols(w, keep):
    return w if keep is None else w.masked_fill(~keep[:, None, None, :], 0.0)


def _inputs(seed, n=10, d=8, pad=True):
    gen = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(2, 2, n, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    keep = None
    if pad:
        keep = torch.ones(2, n, dtype=torch.bool)
        keep[1, n - 3:] = False
    return qkv, keep


def _check(backend, formula, ref, tol):
    (q, k, v), keep = _inputs(1)
    fn = attnc.compile(formula, backend=backend)
    if backend == "triton":
        assert fn.plan == "streaming", fn.plan
    dtype = torch.float64 if backend == "torch" else torch.float32
    a = [t.clone().to(dtype).requires_grad_(True) for t in (q, k, v)]
    b = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(q=a[0], k=a[1], v=a[2], key_padding_mask=keep)
    want = ref(*b, keep)
    gen = torch.Generator().manual_seed(2)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (out.double() * dout).sum().backward()
    (want * dout).sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for name, ta, tb in zip("qkv", a, b):
        assert ta.grad is not None and tb.grad is not None, name
        torch.testing.assert_close(ta.grad.double(), tb.grad, rtol=tol, atol=tol, msg=f"d{name}")


@pytest.mark.parametrize("formula,ref", CASES, ids=["sqr_q", "gelu_v", "gelu_score"])
def test_torch_backend_matches_float64_reference(formula, ref):
    _check("torch", formula, ref, 1e-10)


@pytest.mark.parametrize("formula,ref", CASES, ids=["sqr_q", "gelu_v", "gelu_score"])
def test_triton_kernels_match_float64_reference(formula, ref):
    _check("triton", formula, ref, 2e-4)


def test_registered_functions_simplify_like_builtins():
    # a constant argument folds through the definition: sqr(2) = 4
    a = attnc.analyze("softmax(Q @ K^T * sqr(2)) @ V")
    assert a.canonical == attnc.analyze("softmax(4 * Q @ K^T) @ V").canonical
    # f(x)^T = f(x^T), and the canonical form re-parses to itself
    b = attnc.analyze("softmax(gelu_tanh(K @ Q^T)^T) @ V")
    assert b.canonical == "softmax(gelu_tanh(Q @ K^T)) @ V"
    assert attnc.analyze(b.canonical).hash == b.hash


def test_flop_cost_comes_from_the_definition():
    from attnc.compiler.report import report
    n, d = 64, 16
    plain = report(attnc.analyze("softmax(Q @ K^T) @ V"), n=n, d=d, heads=1).flops
    sq = report(attnc.analyze("softmax(Q @ K^T) @ sqr(V)"), n=n, d=d, heads=1).flops
    assert sq - plain == n * d          # x ** 2 is one operation per entry


def test_domain_and_flops_of_a_registration():
    """domain=: a constant argument outside it is a CheckError at the call; flops=: the report
    counts that many operations per entry (hand count: one extra op per (n, d) entry times 3)."""
    from attnc.compiler.report import report
    attnc.ops.register_elementwise("log1m", sp.log(1 - x), domain=x < 1, flops=3)
    try:
        ok = attnc.analyze("softmax(Q @ K^T * log1m(0.5)) @ V")
        assert ok.canonical == "softmax(-(log(2) * Q @ K^T)) @ V"     # log(1 - 1/2) = -log 2
        bad = "softmax(Q @ K^T * log1m(2)) @ V"
        with pytest.raises(attnc.CheckError, match="outside the domain of log1m") as e:
            attnc.analyze(bad)
        assert bad[e.value.span.start:e.value.span.end] == "log1m(2)"
        n, d = 32, 8
        plain = report(attnc.analyze("softmax(Q @ K^T) @ V"), n=n, d=d, heads=1).flops
        with_f = report(attnc.analyze("softmax(Q @ K^T) @ log1m(V)"), n=n, d=d, heads=1).flops
        assert with_f - plain == 3 * n * d
        # on tensors the definition holds where it is defined
        (q, k, v), _ = _inputs(5, pad=False)
        v = v.clamp(max=0.9)
        out = attnc.compile("softmax(Q @ K^T) @ log1m(V)")(q=q, k=k, v=v)
        torch.testing.assert_close(out, torch.softmax(q @ k.transpose(-1, -2), -1) @ torch.log1p(-v))
    finally:
        attnc.ops.unregister_elementwise("log1m")


def test_attnc_ops_lists_registered_functions(capsys):
    from attnc.compiler.cli import cmd_ops
    assert cmd_ops(None) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("sqr "))
    assert "x**2" in line and "2*x" in line and "registered" in line


def test_registering_the_same_definition_again_is_a_no_op():
    again = attnc.ops.register_elementwise("sqr", x ** 2)
    assert again.expr == sp.Symbol("x", real=True) ** 2


@pytest.mark.parametrize("name,expr,match", [
    ("exp", x ** 3, "already defined"),                        # a built-in
    ("sqr", x ** 3, "already defined"),                        # a registered one, redefined
    ("softmax", x, "built-in name"),                           # a structural function
    ("Q", x, "bad elementwise function name"),
    ("pi", x, "built-in name"),
    ("cube", "x**3", "not text"),
    ("cube", x * sp.Symbol("y"), "only the symbol x"),
    ("cube", x > 0, "with a value"),
    ("cube", sp.gamma(x), "cannot evaluate gamma"),
    ("cube", dict(expr=x ** 3, flops=-1), "non-negative int"),
    ("cube", dict(expr=x ** 3, flops=1.5), "non-negative int"),
    ("cube", dict(expr=x ** 3, domain="x > 0"), "SymPy condition"),
    ("cube", dict(expr=x ** 3, domain=sp.Symbol("y") > 0), "only the symbol x"),
    ("cube", dict(expr=x ** 3, domain=sp.true), "SymPy condition"),
])
def test_bad_registrations_are_config_errors(name, expr, match):
    kw = expr if isinstance(expr, dict) else dict(expr=expr)
    with pytest.raises(ConfigError, match=match) as e:
        attnc.ops.register_elementwise(name, **kw)
    assert e.value.hint or "already defined" not in match


def test_unregister_and_register_another_definition():
    text = "softmax(Q @ K^T) @ cube3(V)"
    with pytest.raises(attnc.ParseError, match="unknown function 'cube3'"):
        attnc.analyze(text)
    (q, k, v), _ = _inputs(3, pad=False)
    want = torch.softmax(q @ k.transpose(-1, -2), -1)
    attnc.ops.register_elementwise("cube3", x ** 3)
    torch.testing.assert_close(attnc.compile(text)(q=q, k=k, v=v), want @ v ** 3)
    attnc.ops.unregister_elementwise("cube3")
    with pytest.raises(attnc.ParseError, match="unknown function 'cube3'"):
        attnc.analyze(text)
    attnc.ops.register_elementwise("cube3", -x)   # the name is free again, with a new meaning
    torch.testing.assert_close(attnc.compile(text)(q=q, k=k, v=v), want @ -v)
    attnc.ops.unregister_elementwise("cube3")
    with pytest.raises(ConfigError, match="built in"):
        attnc.ops.unregister_elementwise("exp")


def test_opnas_space_takes_registered_primitives_by_name():
    from attnc.search import opnas
    from attnc.search.paths import TABLE1, Path, to_text
    space = opnas.Space(primitives=TABLE1 + ("sqr",))
    assert "sqr" in space.primitives
    with pytest.raises(ConfigError, match="unknown primitive"):
        opnas.Space(primitives=TABLE1 + ("cube_not_registered",))
    # a path through the new primitive is an ordinary formula for the compiler
    path = Path("Q", (("matmul", "K"), ("softmax", None), ("matmul", "V"), ("sqr", None)))
    a = attnc.analyze(to_text(path))
    assert a.canonical == "sqr(softmax(Q @ K^T) @ V)"


def test_one_flop_counter_for_report_and_runtime():
    """Standard attention by hand, per head: QK^T 2n^2d, / sqrt(d) n^2, softmax 5n^2, AV 2n^2d."""
    from attnc.compiler.report import report
    from attnc.runtime.counters import formula_flops
    n, d = 48, 16
    a = attnc.analyze("softmax(Q @ K^T / sqrt(d)) @ V")
    hand = 4 * n * n * d + 6 * n * n
    assert report(a, n=n, d=d, heads=1).flops == hand
    assert formula_flops(a.simplified, n, d) == hand


def test_compiler_does_not_import_the_kernels():
    """The compiler reaches the Triton backend only through compiler/backends.py's registry."""
    import ast
    import pathlib
    compiler_dir = pathlib.Path(attnc.compiler.__path__[0])
    offenders = []
    for path in sorted(compiler_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "kernels" in (node.module or ""):
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Import) and any("kernels" in a.name for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_cli_imports_the_users_ops_module(tmp_path, monkeypatch, capsys):
    from attnc.cli import main
    (tmp_path / "my_attnc_ops.py").write_text(
        "import sympy, attnc.ops\n"
        "attnc.ops.register_elementwise('cube_cli', sympy.Symbol('x') ** 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["compile", "softmax(Q @ K^T) @ cube_cli(V)", "--ops", "my_attnc_ops"]) == 0
        assert "softmax(Q @ K^T) @ cube_cli(V)" in capsys.readouterr().out
        assert main(["ops", "--ops", "my_attnc_ops"]) == 0
        assert any(s.startswith("cube_cli ") and "3*x**2" in s
                   for s in capsys.readouterr().out.splitlines())
    finally:
        attnc.ops.unregister_elementwise("cube_cli")
    assert main(["ops", "--ops", "no_such_attnc_ops_module"]) == 2
    assert "cannot import --ops module" in capsys.readouterr().err
    assert main(["ops", "--ops", str(tmp_path / "my_attnc_ops.py")]) == 2   # a path, not a module
    assert "needs a module name" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [dict(torch=lambda t: t ** 3), dict(triton=x ** 3),
                                dict(torch="not a function")])
def test_stable_forms_must_compute_the_definition(kw):
    with pytest.raises(ConfigError):
        attnc.ops.register_elementwise("sq_forms", x ** 2, **kw)
    assert attnc.ops.lookup("sq_forms") is None


def test_stable_forms_are_used():
    """A torch form given explicitly is what the torch backend runs (here: one that records
    its calls), and an equal Triton form is accepted."""
    calls = []

    def sq(t):
        calls.append(tuple(t.shape))
        return t * t

    attnc.ops.register_elementwise("sq_forms2", x ** 2, torch=sq, triton=x * x)
    try:
        (q, k, v), _ = _inputs(4, pad=False)
        out = attnc.compile("softmax(Q @ K^T) @ sq_forms2(V)")(q=q, k=k, v=v)
        torch.testing.assert_close(out, torch.softmax(q @ k.transpose(-1, -2), -1) @ (v * v))
        assert tuple(v.shape) in calls
    finally:
        attnc.ops.unregister_elementwise("sq_forms2")


def test_cli_search_opnas_uses_a_registered_primitive(tmp_path, monkeypatch, capsys):
    """`attnc search opnas --ops MODULE --primitive NAME`: the user's module registers the
    function and scores formulas by how often they use it; the search finds formulas with it."""
    import json
    import sys

    from attnc.cli import main
    (tmp_path / "my_attnc_search_ops.py").write_text(
        "import sympy, attnc.ops\n"
        "attnc.ops.register_elementwise('sqr_search', sympy.Symbol('x') ** 2)\n"
        "def score(arch):\n"
        "    return sum(c.formula.count('sqr_search(') for c in arch.layers\n"
        "               if c.kind == 'attention')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["search", "opnas", "--layers", "2", "--budget", "10", "--population", "5",
            "--top-k", "2", "--children", "2", "--no-progress", "--json", "--primitive", "sqr_search"]
    # not registered (nothing imported the module): a user error
    assert main(args + ["--out", str(tmp_path / "r0"),
                        "--evaluator", "attnc.search.synthetic:known_ops"]) == 2
    assert "unknown primitive" in capsys.readouterr().err
    try:
        assert main(args + ["--out", str(tmp_path / "r1"), "--ops", "my_attnc_search_ops",
                            "--evaluator", "my_attnc_search_ops:score"]) == 0
        best = json.loads(capsys.readouterr().out)["best"]
        formulas = [c["formula"] for c in best["layers"] if c["kind"] == "attention"]
        assert best["score"] == sum(f.count("sqr_search(") for f in formulas) > 0
    finally:
        attnc.ops.unregister_elementwise("sqr_search")
        sys.modules.pop("my_attnc_search_ops", None)   # as in a new process
    # reporting on the study needs the function too
    report = ["search", "report", str(tmp_path / "r1"), "--json"]
    assert main(report) == 2
    assert "unknown function 'sqr_search'" in capsys.readouterr().err
    try:
        assert main(report + ["--ops", "my_attnc_search_ops"]) == 0
        assert json.loads(capsys.readouterr().out)["best"]["layers"] == best["layers"]
    finally:
        attnc.ops.unregister_elementwise("sqr_search")


def test_every_compiler_and_kernels_module_imports_on_its_own():
    """No import cycles: each module of compiler/, kernels/, grammar/ and attnc.ops imports first,
    in a fresh set of attnc modules (a cycle shows up as a partially initialised module)."""
    import pathlib
    import subprocess
    import sys
    mods = ["attnc.ops", "attnc.compiler", "attnc.kernels", "attnc.grammar"] + [
        f"attnc.{pkg}.{p.stem}" for pkg in ("compiler", "kernels", "grammar")
        for p in sorted(pathlib.Path(getattr(attnc, pkg).__path__[0]).glob("*.py"))]
    code = ("import sys, importlib\n"
            "failed = []\n"
            f"for m in {mods!r}:\n"
            "    for k in [k for k in sys.modules if k == 'attnc' or k.startswith('attnc.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except ImportError as e:\n"
            "        failed.append(f'{m}: {e}')\n"
            "print('\\n'.join(failed))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    assert "attnc.compiler.api" in mods and "attnc.kernels.launch" in mods   # the globs found them


# ---- README "Adding an operation": the worked example runs as written ---------------------------

def test_readme_adding_an_operation_example_runs(tmp_path):
    """The section's first python block is the user's module (its first line names the file),
    the second uses it; both run in a fresh process, then the `attnc ops` / `attnc compile` /
    `attnc check` lines of its sh block run as written (split with shlex, never through a
    shell), and the one-line built-in of the last python block is the form _builtins() uses."""
    import os
    import re
    import shlex
    import subprocess
    import sys

    from readme_text import code_blocks, section

    text = section("## Adding an operation")
    module, usage, builtin, _structural = code_blocks(text, "python")
    name = re.match(r"# (\w+)\.py\n", module).group(1)
    (tmp_path / f"{name}.py").write_text(module)
    (tmp_path / "use_it.py").write_text(usage)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "use_it.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "gelu_approx(Q @ K^T / sqrt(d)) @ V"
    registered = re.findall(r'register_elementwise\((?:\s|#[^\n]*)*"(\w+)"', module)
    assert registered == ["sqrelu", "gelu_approx"]
    ran = 0
    for line in code_blocks(text, "sh")[0].splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:2] not in (["attnc", "ops"], ["attnc", "compile"], ["attnc", "check"]):
            continue
        proc = subprocess.run([sys.executable, "-m", "attnc", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (line, proc.stderr)
        if argv[1] == "ops":
            listed = {row.split()[0] for row in proc.stdout.splitlines() if row.strip()}
            assert set(registered) <= listed, proc.stdout
        ran += 1
    assert ran >= 2
    # the built-in line calls _builtins()'s helper b(name, definition, doc)
    call = re.fullmatch(r'\s*b\("(\w+)", (.+), "([^"]*)"\)\s*', builtin)
    assert call is not None and call.group(1) == "sqrelu", builtin


def test_readme_structural_example_is_the_real_entry():
    """The section's structural-operation block is quoted from compiler/structural.py: every line
    but the closing comment is a line of the real class, in order, and the entry it shows is the
    one the compiler uses for norm."""
    import inspect

    from readme_text import code_blocks, section

    from attnc.compiler import structural
    from attnc.compiler.ir import Op

    block = code_blocks(section("## Adding an operation"), "python")[3]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    source = inspect.getsource(type(structural.get(Op.NORM))).splitlines()
    at = 0
    for ln in lines:
        assert ln in source[at:], f"README line not in the real class (in order): {ln!r}"
        at = source.index(ln, at) + 1
    assert lines[0] == f"class {type(structural.NORM).__name__}({type(structural.NORM).__base__.__name__}):"


def test_a_builtin_is_one_line_of_the_table():
    """What `_builtins()`'s one line does (an Elementwise with flops=1, builtin=True) is all a
    built-in needs: it parses, folds constants, counts FLOPs and runs on the torch backend and
    in the Triton kernels, gradients included, against a hand-written float64 reference."""
    from attnc.compiler import api, elementwise as table
    from attnc.compiler.report import report

    entry = table.Elementwise("sqrelu_builtin", sp.Max(table.X, 0) ** 2, "max(x, 0)^2", flops=1,
                              builtin=True)
    table.add(entry)
    try:
        assert attnc.analyze("sqrelu_builtin(3 - 1) * Q + K").canonical == "4 * Q + K"
        text = "softmax(Q @ sqrelu_builtin(K)^T / sqrt(d)) @ V"
        n, d = 12, 8
        assert report(attnc.analyze(text), n=n, d=d, heads=1).flops == n * d + 4 * n * n * d + 6 * n * n
        g = torch.Generator().manual_seed(0)
        for backend, dtype, tol in (("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)):
            ins = [torch.randn(1, 2, n, d, generator=g, dtype=torch.float64) for _ in range(3)]
            q, k, v = (t.to(dtype).requires_grad_() for t in ins)
            q64, k64, v64 = (t.clone().requires_grad_() for t in ins)
            fn = attnc.compile(text, backend=backend)
            assert fn.plan == {"torch": "torch", "triton": "streaming"}[backend]   # the fused kernel
            out = fn(q=q, k=k, v=v)
            ref = torch.softmax(q64 @ (torch.relu(k64) ** 2).transpose(-1, -2) / math.sqrt(d), -1) @ v64
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
            w = torch.randn(out.shape, generator=g, dtype=torch.float64)
            got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
            want = torch.autograd.grad((ref * w).sum(), (q64, k64, v64))
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    finally:
        del table._TABLE["sqrelu_builtin"]
        api.clear_memos()
