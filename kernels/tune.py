"""Launching the generated kernels: dot-product types, block configs, autotuning with a disk cache.

The generated module (codegen.py) creates one `Tuner` for its own source file and launches every
kernel through `Tuner.launch`. A launch picks a config (BLOCK_M, BLOCK_N, num_warps, num_stages):

    CPU interpreter        one small config (INTERPRETER_BLOCKS); no autotuning
    ATTNC_TRITON_BLOCKS    "BLOCK_M,BLOCK_N" forces the block sizes (no autotuning; tests, debugging)
    ATTNC_TRITON_AUTOTUNE=0  the first (default) config of the pruned space, no benchmarking
    otherwise              the fastest config of the pruned space for the key
                           (kernel, dtype, head dim, mask or not, n bucket, dot precision)

Chosen configs are kept in memory and in `<dir of the generated source>/tune/<tag>.json` (tag:
a hash of the kernel source), so another process does not benchmark the same kernel and key
again. The n bucket is the next power of two (at least 16): n = 1000 and n = 1024 share a
config, and a search over formulas does not tune once per sequence length.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from attnc.compiler.errors import ConfigError

INTERPRETER_BLOCKS = (16, 16)
SMEM_BUDGET = 96 * 1024          # bytes of shared memory a config may plan for (estimate)

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first that survives pruning is the default
SPACE = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (128, 128, 8, 3),
            (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    "pre": [(64, 16, 4, 1), (128, 16, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
    "bwd": [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2),
            (32, 32, 4, 1), (16, 16, 4, 1)],
}
KINDS = {"_attn_fwd": "fwd", "_attn_bwd_pre": "pre", "_attn_bwd_dkv": "bwd", "_attn_bwd_dq": "bwd"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- dot products ------------------------------------------------------------------------------

def dot_types(dtype: str, *, allow_tf32: bool = False, weights_fit_fp16: bool = True,
              interpreter: bool | None = None) -> tuple[str, str, str, str]:
    """(DOT_DTYPE, DOT_PREC, W_DTYPE, W_PREC) as names of tl dtypes / input precisions.

    DOT_*: the score products q'.k' and dOut.v'^T: the input dtype (fp16 / bf16 tensor cores);
           fp32 inputs use TF32 only when the caller allows it.
    W_*:   the products with weight-like tiles (W @ v', W^T @ dM, score adjoints): as DOT_*,
           except fp16 inputs whose weights are not bounded (relu, powers, raw scores: they can
           exceed 65504) use an fp32 product with TF32 inputs (fp16's precision, fp32's range).
    The CPU interpreter computes bf16 tl.dot wrongly (tests/test_kernel_numerics.py shows it), so
    under it bf16 inputs use fp32 products."""
    if interpreter is None:
        interpreter = interpreting()
    fp32_prec = "tf32" if allow_tf32 else "ieee"
    if dtype == "float32" or (dtype == "bfloat16" and interpreter):
        return "float32", fp32_prec, "float32", fp32_prec
    if dtype == "float16" and not weights_fit_fp16:
        return "float16", "tf32", "float32", "tf32"
    return dtype, "tf32", dtype, "tf32"


# ---- configs -----------------------------------------------------------------------------------

def n_bucket(n: int) -> int:
    """The power of two at or above n (at least 16): the autotuning key's sequence length."""
    n = max(int(n), 1)
    return max(16, 1 << (n - 1).bit_length())


def tune_key(kind: str, *, dtype: str, head_dim: int, has_mask: bool, n: int,
             precision: str = "ieee") -> str:
    return (f"{kind}|{dtype}|d{int(head_dim)}|{'mask' if has_mask else 'nomask'}|n{n_bucket(n)}"
            f"|{precision}")


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1

    def as_dict(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(int(d["BLOCK_M"]), int(d["BLOCK_N"]), int(d["num_warps"]), int(d["num_stages"]))


def block_d(head_dim: int) -> int:
    b = 16
    while b < head_dim:
        b *= 2
    return b


def configs(kind: str, *, head_dim: int, dtype: str, n: int) -> list[Config]:
    """The pruned config space: blocks no larger than the n bucket, shared memory within budget."""
    size = 4 if dtype == "float32" else 2
    bd = block_d(head_dim)
    limit = n_bucket(n)
    out = []
    for bm, bn, w, s in SPACE[kind]:
        if bm > limit or bn > limit:
            continue
        if (bm + 2 * bn) * bd * size * max(1, s - 1) > SMEM_BUDGET:
            continue
        out.append(Config(bm, bn, w, s))
    return out or [Config(16, 16, 4, 1)]


def forced_blocks() -> tuple[int, int] | None:
    text = os.environ.get("ATTNC_TRITON_BLOCKS")
    if not text:
        return None
    try:
        bm, bn = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"ATTNC_TRITON_BLOCKS={text!r}: expected 'BLOCK_M,BLOCK_N', e.g. '32,16'") \
            from None
    if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ConfigError(f"ATTNC_TRITON_BLOCKS={text!r}: block sizes are powers of two >= 16")
    return bm, bn


# ---- the disk cache ----------------------------------------------------------------------------

class TuneCache:
    """Chosen configs of one kernel source: {key: config} in memory and in a JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.memory: dict[str, Config] = {}
        self._lock = threading.Lock()
        self._warned = False

    def get(self, key: str) -> Config | None:
        with self._lock:
            hit = self.memory.get(key)
            if hit is None:
                self.memory.update(self._read())
                hit = self.memory.get(key)
            return hit

    def put(self, key: str, config: Config) -> None:
        with self._lock:
            self.memory[key] = config
            merged = {**self._read(), key: config}
            text = json.dumps({"version": 1, "configs": {k: c.as_dict() for k, c in sorted(merged.items())}},
                              indent=1, sort_keys=True) + "\n"
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                           suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            except OSError as e:
                self._warn(f"cannot save tuned Triton configs to {self.path} ({e}): other processes "
                           "will tune these kernels again")

    def _read(self) -> dict[str, Config]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {k: Config.from_dict(v) for k, v in data["configs"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self._warn(f"ignoring the unreadable tuning cache {self.path} ({type(e).__name__}); "
                       "it is rewritten after the next tuning")
            return {}

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(text, RuntimeWarning, stacklevel=3)


def choose(cache: TuneCache, key: str, candidates: list[Config], bench) -> Config:
    """The cached config for `key`, else the fastest candidate by `bench(config) -> ms` (saved)."""
    hit = cache.get(key)
    if hit is not None:
        return hit
    if len(candidates) == 1:
        best = candidates[0]
    else:
        times, errors = {}, []
        for c in candidates:
            try:
                times[c] = float(bench(c))
            except Exception as e:  # noqa: BLE001 - a config may not fit (out of resources)
                errors.append(e)
        if not times:
            raise errors[-1]
        best = min(times, key=times.get)
    cache.put(key, best)
    return best


# ---- launching ---------------------------------------------------------------------------------

def device_tag() -> str:
    """The GPU model and compute capability the configs are tuned for ("cpu" without CUDA), as a
    file-name-safe string."""
    import re

    import torch

    if interpreting() or not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return f"{name}-sm{major}{minor}"


class Tuner:
    """Launches the kernels of one generated module (created by that module for its own file)."""

    def __init__(self, source_file: str | os.PathLike):
        path = Path(source_file)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        # configs are per GPU model: one tuned on an H100 may not even launch on a smaller GPU
        self.tag = f"{path.stem.split('_')[0]}_{digest}_{device_tag()}"
        self.cache = TuneCache(path.parent / "tune" / f"{self.tag}.json")

    def config(self, kernel_name: str, run, *, dtype: str, head_dim: int, has_mask: bool, n: int,
               precision: str) -> Config:
        forced = forced_blocks()
        if forced is not None:
            return Config(*forced, 4, 1)
        if interpreting():
            return Config(*INTERPRETER_BLOCKS, 1, 1)
        kind = KINDS[kernel_name]
        candidates = configs(kind, head_dim=head_dim, dtype=dtype, n=n)
        if os.environ.get("ATTNC_TRITON_AUTOTUNE", "1") == "0":
            return candidates[0]
        key = f"{kernel_name}|" + tune_key(kind, dtype=dtype, head_dim=head_dim, has_mask=has_mask,
                                           n=n, precision=precision)
        return choose(self.cache, key, candidates, lambda c: _bench(lambda: run(c)))

    def launch(self, kernel, args: tuple, consts: dict, *, n: int, batch_heads: int, rows: str,
               dtype: str) -> Config:
        """Run `kernel` over blocks of rows ("m": query blocks, "n": key blocks) x batch*heads."""
        def run(c: Config):
            grid = (-(-n // (c.block_m if rows == "m" else c.block_n)), batch_heads)
            kernel[grid](*args, **consts, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                         EVEN_M=n % c.block_m == 0, EVEN_N=n % c.block_n == 0,
                         num_warps=c.num_warps, num_stages=c.num_stages)

        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        c = self.config(name, run, dtype=dtype, head_dim=consts["HEAD_DIM"],
                        has_mask=consts["HAS_MASK"], n=n, precision=consts["DOT_PREC"])
        run(c)
        return c


def _bench(fn) -> float:  # pragma: no cover - needs a GPU
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=40)


__all__ = ["Config", "INTERPRETER_BLOCKS", "SPACE", "TuneCache", "Tuner", "block_d", "choose",
           "configs", "dot_types", "forced_blocks", "interpreting", "n_bucket", "tune_key"]
