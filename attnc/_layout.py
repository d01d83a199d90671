"""How attnc finds its stages, and why no stage folder can shadow an installed package.

The stages live in folders at the top of the source tree (`grammar/`, `compiler/`, `kernels/`,
`runtime/`, `search/`) and import as `attnc.<stage>`. Those names are common: Hugging Face's
`kernels` (which transformers imports while it loads a model), and PyPI's `compiler`, `runtime` and
`grammar`. Whenever the source tree's root is on `sys.path` — `python -m ...` or `python -m pytest`
started there, a script or notebook in the clone, a subprocess started with it as working
directory — a folder with an `__init__.py` there would be found first under its bare name and would
hide the installed package.

So the stage folders hold no `__init__.py`. To Python such a folder is at most a portion of a
namespace package (PEP 420), and the import system ranks it below any regular package or module of
the same name, wherever that stands on `sys.path`: `import kernels` gives Hugging Face's package
from any working directory. Each stage's package module is instead `attnc/<stage>.py` (its
docstring, its public names), which calls `make_stage_package(globals())` first: that gives it a
`__path__` pointing at the stage folder, which makes it a package whose submodules
(`attnc.kernels.plan`, ...) are the folder's files. Installed from a wheel the folder sits at
`attnc/<stage>/` beside that module; in the source tree (and so in an editable install) it is
`<root>/<stage>/`.
"""
from __future__ import annotations

from pathlib import Path

STAGES = ("grammar", "compiler", "kernels", "runtime", "search")


def stage_folder(package_file: str, stage: str) -> Path:
    """The folder holding `stage`'s modules, given the file of the `attnc/<stage>.py` module."""
    here = Path(package_file).resolve().parent                   # the `attnc` package folder
    for folder in (here / stage, here.parent / stage):           # a wheel; the source tree
        if folder.is_dir():
            return folder
    raise ImportError(f"attnc.{stage}: its folder is missing (looked in {here / stage} and "
                      f"{here.parent / stage}); reinstall attnc", name=f"attnc.{stage}")


def make_stage_package(namespace: dict) -> None:
    """Turn the module `attnc.<stage>` whose globals are `namespace` into the stage's package."""
    name = namespace["__name__"]
    stage = name.rpartition(".")[2]
    if stage not in STAGES:
        raise ImportError(f"{name} is not one of attnc's stages {STAGES}", name=name)
    path = [str(stage_folder(namespace["__file__"], stage))]
    namespace["__path__"] = path
    namespace["__package__"] = name              # relative imports resolve inside the stage
    spec = namespace.get("__spec__")
    if spec is not None:                         # importlib.resources and find_spec see a package
        spec.submodule_search_locations = path
