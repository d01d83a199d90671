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

import functools
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

# GPU families a config space is chosen for, by the shared memory a block may use (bytes): what
# the ahead-of-time check (kernels/aot.py) holds the configs to. On a GPU the tuner reads the
# limit from the device and each config's use from its compiled kernel (Tuner.config).
SHARED_LIMIT = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel kind: what the tuner may try. Forward:
# 128-row query blocks with 64- or 128-key tiles (FlashAttention-2, Triton's tutorial). dK/dV
# holds BLOCK_N keys and streams BLOCK_M queries; dQ holds BLOCK_M queries and streams BLOCK_N
# keys: the tutorial's backward blocks are dK/dV 32 x 128 and dQ 128 x 32, 5 stages.
_FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4),
        (128, 32, 4, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)]
_PRE = [(64, 16, 4, 1), (128, 16, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1)]
_DKV = [(32, 128, 4, 5), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3),
        (32, 64, 4, 3), (32, 64, 4, 5), (32, 32, 8, 3), (32, 32, 4, 3), (16, 16, 4, 1)]
_DQ = [(128, 32, 4, 5), (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3),
       (64, 32, 4, 3), (64, 32, 4, 5), (32, 32, 4, 3), (16, 16, 4, 1)]
SPACE = {"fwd": _FWD, "pre": _PRE, "dkv": _DKV, "dq": _DQ}
KINDS = {"_attn_fwd": "fwd", "_attn_bwd_pre": "pre", "_attn_bwd_dkv": "dkv", "_attn_bwd_dq": "dq"}

# The default config is the first of PREFERRED[family][kind][head dim class] ("d64": BLOCK_D <= 64,
# "d128": larger; then the rest of SPACE) whose compiled kernel fits the GPU's shared memory and
# spills no register (`pick_default`: on a GPU from the compiled kernel, in `attnc bench --aot`
# from ptxas). The lists come from `attnc bench --aot --configs all` over six formulas
# (benchmarks/results/aot_configs.json): each starts with FlashAttention-2's shapes (the standard
# formula compiles there without spills) and ends with one that none of the six spills at. sm_80
# holds the MMA accumulators in registers (mma.sync) and spills at 128-row blocks for most
# formulas, where sm_90a's wgmma does not.
_SM80 = {
    "fwd": {"d64": [(128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 3)],
            "d128": [(128, 64, 8, 3), (128, 32, 4, 4), (64, 32, 4, 3), (32, 32, 4, 2)]},
    "pre": {"d64": [(64, 16, 4, 1)], "d128": [(64, 16, 4, 1)]},
    "dkv": {"d64": [(32, 128, 8, 3), (32, 64, 4, 3), (32, 32, 4, 3)],
            "d128": [(64, 64, 8, 3), (32, 64, 4, 3), (32, 32, 8, 3), (32, 32, 4, 3)]},
    "dq": {"d64": [(128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 3)],
           "d128": [(64, 64, 8, 3), (64, 32, 4, 3), (32, 32, 4, 3)]},
}
_SM90 = {
    "fwd": {"d64": [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
            "d128": [(128, 64, 8, 3), (64, 32, 4, 3), (16, 16, 4, 1)]},
    "pre": {"d64": [(64, 16, 4, 1)], "d128": [(64, 16, 4, 1)]},
    "dkv": {"d64": [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
            "d128": [(64, 64, 8, 3), (32, 128, 8, 3), (32, 32, 4, 3)]},
    "dq": {"d64": [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
           "d128": [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (16, 16, 4, 1)]},
}
PREFERRED = {"sm80": _SM80, "sm86": _SM80, "sm90": _SM90}


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

    def launch_kwargs(self, n: int) -> dict:
        """The kernel's block constexprs and launch options at sequence length n."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, EVEN_M=n % self.block_m == 0,
                    EVEN_N=n % self.block_n == 0, num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"

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


def d_class(head_dim: int) -> str:
    return "d64" if block_d(head_dim) <= 64 else "d128"


def configs(kind: str, *, head_dim: int, dtype: str, n: int, target: str | None = None) -> list[Config]:
    """The configs the tuner may try for a kernel kind on a target family (the current GPU's by
    default), the family's preferred ones for this head dim first: blocks no larger than the n bucket.
    What fits the GPU's shared memory is decided from the compiled kernel (`fitting`), not
    estimated here."""
    target = target or target_family()
    limit = n_bucket(n)
    preferred = PREFERRED[target][kind][d_class(head_dim)]
    order = preferred + [c for c in SPACE[kind] if c not in preferred]
    out = [Config(bm, bn, w, s) for bm, bn, w, s in order if bm <= limit and bn <= limit]
    return out or [Config(16, 16, 4, 1)]


def pick_default(candidates: list[Config], compiled_of, limit: int) -> tuple[Config, bool]:
    """(the default config, whether it is clean): the first candidate whose compiled kernel fits
    `limit` bytes of shared memory and spills nothing (`compiled_of(config) -> (shared bytes,
    spill bytes)`); when every fitting one spills, the first fitting one and False."""
    first = None
    for c in candidates:
        shared, spills = compiled_of(c)
        if shared <= limit:
            if not spills:
                return c, True
            first = first or c
    if first is None:
        fitting(candidates, lambda c: compiled_of(c)[0], limit)      # raises: names the need
    return first, False


def fitting(candidates: list[Config], shared_of, limit: int) -> list[Config]:
    """The candidates whose compiled kernel needs at most `limit` bytes of shared memory
    (`shared_of(config)`: from the compiled kernel's metadata), in order. None fits: a ConfigError
    that names the smallest need."""
    needs = {c: shared_of(c) for c in candidates}
    out = [c for c in candidates if needs[c] <= limit]
    if not out:
        c = min(needs, key=needs.get)
        raise ConfigError(f"no kernel config fits this GPU's {limit} B of shared memory per block "
                          f"(the smallest, {c}, needs {needs[c]} B)",
                          hint="use a smaller head dim, fp16/bf16 inputs, or the torch backend")
    return out


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


def family(capability: tuple[int, int]) -> str:
    """The config family of a GPU of compute capability (major, minor): "sm80" (A100, 163 KiB of
    shared memory per block), "sm90" (H100 and data-centre Blackwell, 227 KiB), else "sm86"
    (consumer Ampere, Ada and other GPUs: 99 KiB). A config that does not fit a GPU all the same
    is dropped when its compiled kernel says so (Tuner.config)."""
    major, minor = capability
    if (major, minor) == (8, 0):
        return "sm80"
    if major in (9, 10):
        return "sm90"
    return "sm86"


def target_family() -> str:
    """The config family of the current CUDA device ("sm80" without one)."""
    import torch

    if interpreting() or not torch.cuda.is_available():
        return "sm80"
    return family(torch.cuda.get_device_capability())


class Tuner:
    """Launches the kernels of one generated module (created by that module for its own file)."""

    def __init__(self, source_file: str | os.PathLike):
        path = Path(source_file)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        # configs are per GPU model: one tuned on an H100 may not even launch on a smaller GPU
        self.tag = f"{path.stem.split('_')[0]}_{digest}_{device_tag()}"
        self.cache = TuneCache(path.parent / "tune" / f"{self.tag}.json")
        self._defaults: dict[str, Config] = {}   # without autotuning: pick_default's choice per key

    def config(self, kernel_name: str, run, *, dtype: str, head_dim: int, has_mask: bool, n: int,
               precision: str, compiled_of=None, shared_limit: int | None = None) -> Config:
        """The config to launch with. On a GPU, `compiled_of(config)` gives the compiled kernel's
        (shared memory, spill bytes) and `shared_limit` the device's shared memory: only configs
        that fit are tried, and without autotuning the default is `pick_default`'s."""
        forced = forced_blocks()
        if forced is not None:
            return Config(*forced, 4, 1)
        if interpreting():
            return Config(*INTERPRETER_BLOCKS, 1, 1)
        kind = KINDS[kernel_name]
        candidates = configs(kind, head_dim=head_dim, dtype=dtype, n=n)
        key = f"{kernel_name}|" + tune_key(kind, dtype=dtype, head_dim=head_dim, has_mask=has_mask,
                                           n=n, precision=precision)
        if os.environ.get("ATTNC_TRITON_AUTOTUNE", "1") == "0":
            if compiled_of is None:
                return candidates[0]
            if key not in self._defaults:     # compiled once per key, not at every launch
                c, clean = pick_default(candidates, compiled_of, shared_limit)
                if not clean:
                    warnings.warn(f"{kernel_name}: every config that fits this GPU spills registers; "
                                  f"launching {c}", RuntimeWarning, stacklevel=3)
                self._defaults[key] = c
            return self._defaults[key]
        if cache_hit := self.cache.get(key):
            return cache_hit
        if compiled_of is not None:
            candidates = fitting(candidates, lambda c: compiled_of(c)[0], shared_limit)
        return choose(self.cache, key, candidates, lambda c: _bench(lambda: run(c)))

    def launch(self, kernel, args: tuple, consts: dict, *, n: int, batch_heads: int, rows: str,
               dtype: str) -> Config:
        """Run `kernel` over blocks of rows ("m": query blocks, "n": key blocks) x batch*heads."""
        def grid(c: Config):
            return (-(-n // (c.block_m if rows == "m" else c.block_n)), batch_heads)

        def run(c: Config):
            kernel[grid(c)](*args, **consts, **c.launch_kwargs(n))

        def compiled_of(c: Config) -> tuple[int, int]:  # pragma: no cover - needs a GPU
            k = kernel.warmup(*args, grid=grid(c), **consts, **c.launch_kwargs(n))
            k._init_handles()         # loads the cubin: n_spills is the driver's count
            return int(k.metadata.shared), int(k.n_spills)

        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        gpu = not interpreting() and forced_blocks() is None
        c = self.config(name, run, dtype=dtype, head_dim=consts["HEAD_DIM"],
                        has_mask=bool(consts.get("HAS_MASK", False)), n=n,
                        precision=consts.get("DOT_PREC", "ieee"), compiled_of=compiled_of if gpu else None,
                        shared_limit=device_shared_limit() if gpu else None)
        run(c)
        return c


def device_shared_limit() -> int:  # pragma: no cover - needs a GPU
    """Bytes of shared memory a block may use on the current GPU (the driver's figure, asked once
    per device)."""
    from triton.runtime.driver import driver

    return _shared_limit_of(driver.active.get_current_device())


@functools.lru_cache(maxsize=None)
def _shared_limit_of(device: int) -> int:  # pragma: no cover - needs a GPU
    from triton.runtime.driver import driver

    return int(driver.active.utils.get_device_properties(device)["max_shared_mem"])


def _bench(fn) -> float:  # pragma: no cover - needs a GPU
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=40)


__all__ = ["Config", "PREFERRED", "INTERPRETER_BLOCKS", "KINDS", "SHARED_LIMIT", "SPACE", "TuneCache", "Tuner",
           "block_d", "choose", "configs", "d_class", "device_shared_limit", "dot_types", "family", "fitting",
           "forced_blocks", "interpreting", "n_bucket", "pick_default", "target_family", "tune_key"]
