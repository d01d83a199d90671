"""Reading README.md's sections and code blocks, for the tests that run the README's examples."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    """The text of the README section headed by the line `title` (up to the next '## ' heading)."""
    text = README.read_text(encoding="utf-8")
    start = text.find(f"\n{title}\n")
    assert start >= 0, f"README.md has no section {title!r}"
    end = text.find("\n## ", start + len(title) + 2)
    return text[start:end if end >= 0 else len(text)]


def code_blocks(text: str, lang: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S)]
