"""attnc.compiler: the IR, the operation tables, shape rules and checks, the SymPy stage, reports,
PyTorch code generation, the on-disk cache and the `attnc compile/check/equiv/ops` commands.

Its modules are the files of the `compiler/` folder (see attnc/_layout.py).
"""
from attnc._layout import make_stage_package

make_stage_package(globals())
