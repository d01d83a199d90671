"""Ahead-of-time compilation of the fused kernels for GPU targets, on a machine without a GPU.

Triton compiles for any NVIDIA target without a device: `triton.compile(ASTSource(kernel,
signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))` gives TTGIR, PTX and a cubin,
and the ptxas shipped in the triton wheel reports registers and spills. `compile_module` runs a
kernel module's host code (`attn_forward`, `attn_backward`) on CPU stand-in tensors with every
launch recorded instead of run, so each kernel is specialised exactly as the Triton JIT would
specialise it at that launch (argument types, strides equal to 1, 16-byte alignment), then
compiles it for each target and config. A `KernelReport` holds:

    registers, spill_stores, spill_loads   ptxas -v on the kernel's PTX (the wheel's ptxas, the
                                           flags Triton uses for the cubin)
    shared                                 bytes of shared memory, from the compiled metadata
    dots                                   every product of the TTGIR: M x N x K, the operand
                                           dtype, and whether it is a Hopper wgmma

`violations` checks reports against the targets of issue 21: no spills in default configs,
wgmma for every fp16/bf16 product of 64 rows or more on sm_90a, and shared memory within the
target's limit for every config the tuner can pick there. `attnc bench --aot` is the command.

Compilation needs Triton without its interpreter (TRITON_INTERPRET unset): `@triton.jit` then
makes JIT functions, not interpreted ones. The work is spread over processes (`jobs`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from attnc.compiler.errors import ConfigError

from .bench import STANDARD, parse_names
from .tune import KINDS, SHARED_LIMIT, Config, configs, family, interpreting, pick_default

# name -> (compute capability, config family of kernels/tune.py: the tuner's own rule)
TARGETS = {name: (cap, family(divmod(cap, 10))) for name, cap in (("sm_80", 80), ("sm_86", 86), ("sm_89", 89),
                                                                  ("sm_90a", 90))}
HALF = ("f16", "bf16")
WGMMA_MIN_ROWS = 64        # a Hopper wgmma computes 64 rows per warp group
REFERENCE = "reference FA2"   # kernels/fa2_reference.py: hand-written FlashAttention-2 (standard attention)


@dataclass(frozen=True)
class Dot:
    """One product of a compiled kernel: (m x k) @ (k x n) with operands of dtype `a`, `b`."""

    m: int
    n: int
    k: int
    a: str
    b: str
    acc: str
    wgmma: bool

    def __str__(self) -> str:
        return f"{self.m}x{self.n}x{self.k} {self.a}{' wgmma' if self.wgmma else ''}"


@dataclass(frozen=True)
class KernelReport:
    formula: str
    kernel: str
    kind: str
    target: str
    dtype: str
    head_dim: int
    has_mask: bool
    config: dict
    default: bool                 # the config the tuner takes without autotuning
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    shared_limit: int
    dots: tuple = ()
    compile_s: float = 0.0
    error: str | None = None      # the compiler's message when it failed

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def fits(self) -> bool:
        return self.shared <= self.shared_limit

    def missing_wgmma(self) -> list[Dot]:
        """fp16 / bf16 products of 64 rows or more that are not wgmma (sm_90a only)."""
        if TARGETS[self.target][0] != 90:
            return []
        return [d for d in self.dots if d.a in HALF and d.m >= WGMMA_MIN_ROWS and not d.wgmma]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["dots"] = [asdict(d) for d in self.dots]
        out["mma"] = len(self.dots)
        out["fits"] = self.fits
        return out


@dataclass(frozen=True)
class Job:
    """One kernel module to compile: a formula (or the reference) at a dtype and head dim."""

    formula: str
    dtype: str
    head_dim: int
    targets: tuple[str, ...]
    which: str = "default"        # "default" | "all" configs of the tuner's space
    has_mask: bool = True
    n: int = 1024
    overrides: dict = field(default_factory=dict)   # kernel kind -> [Config] to compile instead


def parse_targets(text: str) -> tuple[str, ...]:
    return parse_names(text, TARGETS, "AOT target(s)", ", e.g. --aot sm_80,sm_90a")


def _require_compiler() -> None:
    if interpreting():
        raise ConfigError("ahead-of-time compilation needs Triton without its interpreter",
                          hint="unset TRITON_INTERPRET (attnc bench --aot does so in a child process)")


# ---- running a module's host code with the launches recorded ------------------------------------

@dataclass
class Launch:
    kernel: object
    args: tuple
    consts: dict
    n: int

    @property
    def name(self) -> str:
        return self.kernel.__name__


class _Recorder:
    """Stands in for a kernel module's Tuner: records each launch instead of running it."""

    def __init__(self):
        self.launches: list[Launch] = []

    def launch(self, kernel, args, consts, *, n, batch_heads, rows, dtype):
        self.launches.append(Launch(kernel, tuple(args), dict(consts), n))
        return None


def load_module(source: str, name: str):
    """Import a kernel module from its source text (Triton's JIT needs a real file)."""
    folder = Path(tempfile.mkdtemp(prefix="attnc-aot-"))
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"attnc_aot.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def launches(mod, *, dtype: str, head_dim: int, has_mask: bool, n: int = 1024, batch: int = 2,
             heads: int = 4) -> list[Launch]:
    """Every kernel launch of a forward and a backward of `mod` on contiguous CPU stand-ins."""
    import torch

    recorder = _Recorder()
    mod._TUNER = recorder
    dt = getattr(torch, dtype)
    inputs = {x: torch.empty(batch, heads, n, head_dim, dtype=dt) for x in mod.INPUTS}
    mask = torch.ones(batch, n, dtype=torch.bool) if has_mask else None
    out, acc, lse = mod.attn_forward(inputs, mask)
    mod.attn_backward(inputs, mask, out, acc, lse, torch.empty_like(out))
    return recorder.launches


def module_source(formula: str, dtype: str, head_dim: int) -> str:
    if formula == REFERENCE:
        return (Path(__file__).with_name("fa2_reference.py")).read_text()
    import attnc
    from .launch import triton_source
    return triton_source(attnc.analyze(formula), dtype=dtype, head_dim=head_dim)


# ---- compiling one launch for one target -------------------------------------------------------

_DOT = re.compile(r"(tt\.dot|ttng\.warp_group_dot)\s.*?\s:\s*"
                  r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+?)[,>].*?\*\s*"
                  r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+?)[,>].*?->\s*"
                  r"tensor<(\d+)x(\d+)x(\w+?)[,>]")


def dots(ttgir: str) -> tuple[Dot, ...]:
    """The products of a TTGIR module, in order."""
    out = []
    for line in ttgir.splitlines():
        m = _DOT.search(line)
        if m:
            op, m_, k, a, _, n, b, _, _, acc = m.groups()
            out.append(Dot(int(m_), int(n), int(k), a, b, acc, op == "ttng.warp_group_dot"))
    return tuple(out)


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, capability: int, fp_fusion: bool = True) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of a PTX module: the wheel's ptxas with the
    flags Triton compiles the cubin with (`-v`, line info, `--regAllocOptLevel=2`)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs, spills = _PTXAS.search(log), _SPILLS.search(log)
    if regs is None or spills is None:   # pragma: no cover - a ptxas that reports otherwise
        raise RuntimeError(f"cannot read ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


_BINDERS: dict = {}


def compile_launch(launch: Launch, config: Config, target: str):
    """The compiled kernel (triton's CompiledKernel) of `launch` at `config` for `target`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    cap = TARGETS[target][0]
    gpu = GPUTarget("cuda", cap, 32)
    backend = make_backend(gpu)
    kernel = launch.kernel
    key = (id(kernel), cap)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.consts, **config.launch_kwargs(launch.n)}
    # the JIT's own specialisation of these arguments (what `kernel[grid](...)` would compile)
    bound, spec, options = _BINDERS[key](*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu,
                          options=options.__dict__), options


def report(job: Job, launch: Launch, config: Config, target: str, default: bool) -> KernelReport:
    fam = TARGETS[target][1]
    base = dict(formula=job.formula, kernel=launch.name, kind=KINDS[launch.name], target=target,
                dtype=job.dtype, head_dim=job.head_dim, has_mask=job.has_mask, config=config.as_dict(),
                default=default, shared_limit=SHARED_LIMIT[fam])
    start = time.perf_counter()
    try:
        compiled, options = compile_launch(launch, config, target)
        regs, stores, loads = ptxas_usage(compiled.asm["ptx"], TARGETS[target][0], options.enable_fp_fusion)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a finding, reported
        return KernelReport(**base, registers=0, spill_stores=0, spill_loads=0, shared=0,
                            compile_s=time.perf_counter() - start,
                            error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    return KernelReport(**base, registers=regs, spill_stores=stores, spill_loads=loads,
                        shared=int(compiled.metadata.shared), dots=dots(compiled.asm["ttgir"]),
                        compile_s=time.perf_counter() - start)


def run_job(job: Job) -> list[KernelReport]:
    """Compile every kernel of one module for the job's targets and configs. The default config
    is the tuner's rule on the compiled kernels (tune.pick_default: the first preferred config
    that fits and spills nothing); "default" compiles the candidates up to it, "all" every one."""
    _require_compiler()
    tag = re.sub(r"[^0-9a-zA-Z]+", "_", f"{job.formula}_{job.dtype}_{job.head_dim}")[:80]
    mod = load_module(module_source(job.formula, job.dtype, job.head_dim), f"k_{abs(hash(tag))}_{tag}")
    out = []
    for launch in launches(mod, dtype=job.dtype, head_dim=job.head_dim, has_mask=job.has_mask, n=job.n):
        kind = KINDS[launch.name]
        for target in job.targets:
            fam = TARGETS[target][1]
            space = job.overrides.get(kind) or configs(kind, head_dim=job.head_dim, dtype=job.dtype, n=job.n,
                                                       target=fam)
            done: dict[Config, KernelReport] = {}

            def compiled_of(c, launch=launch, target=target, done=done):
                if c not in done:
                    done[c] = report(job, launch, c, target, default=False)
                r = done[c]
                return (r.shared if not r.error else 1 << 40), r.spills

            try:
                default, _ = pick_default(space, compiled_of, SHARED_LIMIT[fam])
            except ConfigError:        # nothing fits (or compiles): every row says why
                default = None
            for c in (space if job.which == "all" else list(done)):
                compiled_of(c)
                out.append(replace(done[c], default=c == default))
    return out


def run(jobs: list[Job], workers: int | None = None, progress=None) -> list[KernelReport]:
    """Run `jobs` over `workers` processes (os.cpu_count() by default), in job order."""
    _require_compiler()
    workers = max(1, workers or os.cpu_count() or 1)
    out: list[KernelReport] = []
    with contextlib.ExitStack() as stack:
        mapper = map
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            mapper = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))).map
        for reports in mapper(run_job, jobs):
            out.extend(reports)
            if progress:
                progress(1)
    return out


# ---- the targets -------------------------------------------------------------------------------

def violations(reports: list[KernelReport]) -> list[str]:
    """What misses the targets: a compile error; spills in a default config; an fp16/bf16 product
    of 64 rows or more that is not a wgmma on sm_90a (in any config the tuner may pick there); a
    default config over the target's shared memory. Another config over it is no fault: the
    tuner drops it on the GPU from its compiled kernel's metadata (tune.fitting)."""
    out = []
    for r in reports:
        where = f"{r.formula} | {r.kernel} {r.dtype} d{r.head_dim} {r.target} {Config.from_dict(r.config)}"
        if r.error:
            out.append(f"{where}: does not compile ({r.error})")
            continue
        if r.default and r.spills:
            out.append(f"{where}: default config spills {r.spill_stores} B stores / {r.spill_loads} B loads")
        missing = r.missing_wgmma() if r.fits else []
        if missing:
            out.append(f"{where}: products without wgmma: {', '.join(map(str, missing))}")
        if r.default and not r.fits:
            out.append(f"{where}: default config needs {r.shared} B of shared memory, over the "
                       f"{r.shared_limit} B of {r.target}")
    return out


REFERENCE_SLACK = 1.10      # the standard formula's kernels: at most +10% registers and shared memory


def compare_reference(reports: list[KernelReport]) -> list[dict]:
    """The standard formula's kernels (compiled without a mask) next to the reference
    FlashAttention-2's at the same kernel, target, dtype, head dim and config: registers, shared
    memory and the number of products, and whether they are within REFERENCE_SLACK and equal."""
    import attnc

    standard = attnc.analyze(STANDARD).hash

    def key(r):
        return (r.kernel, r.target, r.dtype, r.head_dim, tuple(sorted(r.config.items())))

    ref = {key(r): r for r in reports if r.formula == REFERENCE and not r.error}
    out = []
    for r in reports:
        if r.formula == REFERENCE or r.has_mask or r.error or key(r) not in ref:
            continue
        if attnc.analyze(r.formula).hash != standard:
            continue
        f = ref[key(r)]
        regs = r.registers / f.registers
        shared = r.shared / f.shared if f.shared else 1.0
        out.append({"kernel": r.kernel, "target": r.target, "dtype": r.dtype, "head_dim": r.head_dim,
                    "config": str(Config.from_dict(r.config)), "registers": r.registers,
                    "ref_registers": f.registers, "registers_ratio": regs, "shared": r.shared,
                    "ref_shared": f.shared, "shared_ratio": shared, "products": len(r.dots),
                    "ref_products": len(f.dots), "spills": r.spills, "ref_spills": f.spills,
                    "ok": regs <= REFERENCE_SLACK and shared <= REFERENCE_SLACK and len(r.dots) == len(f.dots)})
    return out


def environment() -> dict:
    import platform

    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    return {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "ptxas": {t: get_ptxas(TARGETS[t][0]).version for t in ("sm_80", "sm_90a")},
            "cpu": platform.processor() or platform.machine()}


__all__ = ["Dot", "Job", "KernelReport", "REFERENCE", "SHARED_LIMIT", "STANDARD", "TARGETS", "compare_reference",
           "compile_launch", "dots", "environment",
           "launches", "load_module", "parse_targets", "ptxas_usage", "run", "run_job", "violations"]
