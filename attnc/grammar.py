"""attnc.grammar: `attention.lark` and the parser (formula text -> IR with source spans).

Its modules are the files of the `grammar/` folder (see attnc/_layout.py).
"""
from attnc._layout import make_stage_package

make_stage_package(globals())
