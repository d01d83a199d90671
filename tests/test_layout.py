"""The stage folders at the top of the source tree never shadow installed packages of the same name
(Hugging Face's `kernels`, PyPI's `compiler`, `runtime`, `grammar`), whatever the working
directory, while `attnc.<stage>` stays ours (attnc/_layout.py)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import attnc
from attnc._layout import STAGES

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, sys
from pathlib import Path
root = Path({root!r})
for stage in {stages!r}:
    top = importlib.import_module(stage)
    assert getattr(top, "MARK", None) == "not attnc", (stage, getattr(top, "__file__", None), top.__path__)
    ours = importlib.import_module("attnc." + stage)
    assert Path(ours.__path__[0]).resolve() == (root / stage).resolve(), (stage, ours.__path__)
import attnc.kernels, attnc.runtime, attnc.search
assert callable(attnc.kernels.classify) and attnc.search.Architecture and attnc.runtime.MODEL_TYPE
import attnc.kernels.plan, attnc.grammar.parser, attnc.search.tinybert
assert "MARK" not in vars(attnc.kernels.plan)
print("ok", sys.path[0] or "''")
"""


def _fake_packages(where: Path) -> Path:
    """A regular top-level package named like each stage, outside the source tree."""
    for stage in STAGES:
        (where / stage).mkdir(parents=True)
        (where / stage / "__init__.py").write_text('MARK = "not attnc"\n')
        (where / stage / "plan.py").write_text('MARK = "not attnc"\n')
    return where


def _run(args, cwd, tmp_path, **env):
    full = {**os.environ, "PYTHONPATH": str(_fake_packages(tmp_path / "site")), **env}
    full.pop("PYTHONSAFEPATH", None)       # the root must be on sys.path, as for a user
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("how", ["-c", "script", "-m"])
def test_installed_packages_named_like_stages_win_from_the_repo_root(tmp_path, how):
    """`python -c` and `python -m` from the root, and a script beside the stage folders, all put
    that folder first on sys.path; the fake packages stand later on it (PYTHONPATH)."""
    code = CHECK.format(root=str(ROOT), stages=STAGES)
    path = [str(_fake_packages(tmp_path / "site"))]
    if how == "-c":
        args, first = ["-c", code], ""
    elif how == "script":
        tree = tmp_path / "tree"
        tree.mkdir()
        for stage in STAGES:
            (tree / stage).symlink_to(ROOT / stage, target_is_directory=True)
        (tree / "check_layout.py").write_text(code)
        args, first = [str(tree / "check_layout.py")], str(tree)
    else:
        (tmp_path / "mods").mkdir()
        (tmp_path / "mods" / "check_layout_mod.py").write_text(code)
        path.append(str(tmp_path / "mods"))
        args, first = ["-m", "check_layout_mod"], str(ROOT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}   # the root on sys.path, as for a user
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": os.pathsep.join(path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", first or "''"]


def test_kernels_from_the_repo_root_is_never_ours():
    """transformers imports Hugging Face's `kernels` while it loads a model. From the root, `kernels`
    is their installed package when the distribution is installed, else at most an empty namespace."""
    code = ("import importlib.metadata as md, importlib.util, attnc.kernels\n"
            "try:\n    md.distribution('kernels'); installed = True\n"
            "except md.PackageNotFoundError:\n    installed = False\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(installed, spec.origin, attnc.kernels.__path__[0])")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    installed, origin, ours = r.stdout.split()
    if installed == "True":
        assert ROOT not in Path(origin).resolve().parents, origin
    else:
        assert origin == "None"          # a namespace portion: any regular `kernels` would win
    assert Path(ours).resolve() == ROOT / "kernels"


def test_attnc_stage_packages_are_packages():
    """importlib and pkgutil see each stage as a package of the folder's modules."""
    import pkgutil
    for stage in STAGES:
        mod = getattr(attnc, stage)
        assert mod.__spec__.submodule_search_locations == mod.__path__
        assert importlib.util.find_spec(f"attnc.{stage}").name == f"attnc.{stage}"
    names = {m.name for m in pkgutil.walk_packages(attnc.search.__path__, "attnc.search.")}
    assert {"attnc.search.opnas", "attnc.search.tinybert", "attnc.search.tinybert.evolve"} <= names
