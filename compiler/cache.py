"""On-disk cache of generated source, keyed by canonical hash.

Files are written atomically (temp file in the same folder + os.replace), so concurrent
processes compiling the same formula never see a half-written file: the last writer wins
with identical content. Generated modules are loaded with importlib from their file (Triton's
JIT needs real source files too), never by evaluating strings.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ENV_VAR = "ATTNC_CACHE_DIR"


def default_cache_dir() -> Path:
    """$ATTNC_CACHE_DIR if set, else ~/.cache/attnc (XDG_CACHE_HOME respected)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnc"


def resolve(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def ensure_source(path: Path, text: str) -> Path:
    """Write `text` to `path` unless an identical file is already there."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    return write_atomic(path, text)


def load_module(path: Path, module_name: str) -> ModuleType:
    """Import a generated source file as a module (cached in sys.modules by name)."""
    mod = sys.modules.get(module_name)
    if mod is not None and getattr(mod, "__file__", None) == str(path):
        return mod
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for unreadable paths
        raise ImportError(f"cannot load generated module {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod
