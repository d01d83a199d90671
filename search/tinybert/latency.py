"""Latency of AutoTinyBERT architectures: a measured dataset and an MLP predictor (HAT's recipe).

    records = collect(space, 300, "runs/lat")            # resumable: runs/lat/latency.jsonl
    pred, metrics = LatencyPredictor.fit(space, records)  # held-out RMSE / MAPE vs a mean predictor
    pred.save("runs/lat"); LatencyPredictor.load("runs/lat").predict(arch)   # milliseconds
    pred.safety_margin                                    # the search's margin under a latency limit

The target is the paper's by default: CPU, one thread, batch 1, sequence length 128. Every arch is
built as a stand-alone AttncBertModel from `space.config(arch)` (no MLM head: the head is not part of
inference latency in the paper), randomly initialised (weights do not change the time), and timed in
eval mode under inference_mode after `warmup` untimed runs; the median of `repeats` timed runs counts.

How the runs are scheduled (`timing`) matters as much as how many there are:
- "back-to-back" (the default): every arch runs its timed runs consecutively, as a user timing one
  model does (`attnc latency`, one process per model): its weights stay in the caches between runs.
  To spread each arch over the machine's slow and fast spells, the runs are cut into `rounds` blocks
  (the group's archs take turns block by block, the order rotating), each block after one untimed run.
- "round-robin" (the earlier default): one run per arch in turn. Every run then starts with caches
  full of the other archs' weights, which slows small models the most: a predictor fitted on such
  timings over-predicted sub-millisecond models by 46-70% against `attnc latency` (issue 20).

Which architectures are timed (`design`):
- "edges" (the default): first the corners of the space (every field at its minimum or maximum),
  then samples whose fields are each at the maximum with probability 1/4, at the minimum with 1/8,
  else uniform: a search under a latency limit goes to the largest widths that fit, so the predictor
  must be trained and checked there, not only in the middle of the space.
- "uniform": the smallest and largest arch, then uniform samples (the earlier design).

The dataset folder holds
    latency_meta.json   the settings (space, device, threads, batch, seq, warmup, repeats, seed,
                        timing, design) and the machine; a later call with other settings is refused
    latency.jsonl       one JSON line per measured arch, flushed and fsynced, so a killed run
                        loses at most the line being written; a second call resumes after the last
                        complete line with the same arch sequence
    bert_base_latency.json   cached BERT-base latencies (reference for --speedup)
    predictor.pt, predictor.json   the fitted predictor (state dict + plain JSON; no pickled code)
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

from attnc.compiler.errors import ConfigError, DataError
from attnc.search.ranking import percentile

from .space import Arch, Space

log = logging.getLogger(__name__)

RECORDS = "latency.jsonl"
META = "latency_meta.json"
BASE = "bert_base_latency.json"
WEIGHTS = "predictor.pt"
PREDICTOR = "predictor.json"
FORMAT = 1
BERT_BASE = "12-768-3072-12-768"
TARGETS = ("log", "ms")
INPUTS = ("log", "raw")
VALUES = ("ms", "q25_ms", "min_ms")     # record fields a predictor can fit
TIMINGS = ("back-to-back", "round-robin")
DESIGNS = ("edges", "uniform")
EDGE_MAX, EDGE_MIN = 0.25, 0.125        # "edges" design: a field's chance of its maximum / minimum
ROUNDS = 4                              # back-to-back: blocks per arch (each after one untimed run)
MARGIN_QUANTILE = 0.95                  # safety margin: this quantile of held-out under-prediction


def _inputs(features: Sequence[float], kind: str) -> list[float]:
    """The MLP's inputs before standardisation: the features themselves ("raw", HAT's choice) or
    their logs ("log": latency is close to a product of the widths, which logs make a sum)."""
    if kind == "raw":
        return [float(v) for v in features]
    return [math.log(v) for v in features]          # every feature of a Space is positive


# --- the arch sequence ------------------------------------------------------------------------------


def extreme_archs(space: Space) -> list[Arch]:
    """The smallest and the largest arch of the space (measured first, so a predictor fitted on the
    dataset interpolates over the whole space instead of extrapolating at its corners)."""
    c = space._choices()
    small = space._make(c["layers"][0], c["hidden"][0], c["ffn"][0], c["heads"][0])
    out = [space.validate(small)]
    if space.max_arch != small:
        out.append(space.max_arch)
    return out


def corner_archs(space: Space) -> list[Arch]:
    """Every corner of the space (each free field -- L, dm, df, and h in mlm mode / the per-head
    dim in kd mode -- at its minimum or maximum): the smallest and the largest first, then the others
    in a fixed order, distinct."""
    c = space._choices()
    out = extreme_archs(space)
    for L in (c["layers"][0], c["layers"][-1]):
        for dm in (c["hidden"][0], c["hidden"][-1]):
            for df in (c["ffn"][0], c["ffn"][-1]):
                for k in (c["heads"][0], c["heads"][-1]):
                    a = space._make(L, dm, df, k)
                    if a not in out:
                        out.append(a)
    return out


def edge_sample(space: Space, rng: random.Random) -> Arch:
    """One arch of the "edges" design: each free field at its maximum with probability EDGE_MAX, at
    its minimum with EDGE_MIN, else uniform over its range."""
    c = space._choices()
    vals = []
    for name in ("layers", "hidden", "ffn", "heads"):
        u = rng.random()
        grid = c[name]
        vals.append(grid[-1] if u < EDGE_MAX else grid[0] if u < EDGE_MAX + EDGE_MIN else rng.choice(grid))
    return space._make(*vals)


def arch_sequence(space: Space, n: int, seed: int = 0, design: str = "edges") -> list[Arch]:
    """The first `n` archs collect measures (see the module doc for the designs): "edges" starts
    with corner_archs, "uniform" with the smallest and largest arch; then distinct samples drawn from
    random.Random(seed). The sequence for n is a prefix of the one for any larger n, which is what
    makes a resumed (or extended) collection identical to an uninterrupted one."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"samples must be a positive integer, got {n!r}")
    if design not in DESIGNS:
        raise ConfigError(f"unknown latency sampling design {design!r}", hint=f"use one of {', '.join(DESIGNS)}")
    first = corner_archs(space) if design == "edges" else extreme_archs(space)
    out = first[:n]
    seen = set(out)
    rng = random.Random(seed)
    draw = (lambda: edge_sample(space, rng)) if design == "edges" else (lambda: space.sample(rng))
    tries = 0
    limit = 1000 * n + 10000
    while len(out) < n:
        arch = draw()
        tries += 1
        if arch not in seen:
            seen.add(arch)
            out.append(arch)
        elif tries > limit:
            raise ConfigError(f"the space has too few distinct architectures for {n} samples "
                              f"(found {len(out)} after {tries} draws; the space has {space.size()})",
                              hint="ask for fewer --samples or widen the space")
    return out


# --- measuring ----------------------------------------------------------------------------------------


def _machine(device: str) -> str:
    """What the latencies are valid for: the CPU model (and GPU name on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda"):
        import torch
        return f"{torch.cuda.get_device_name(torch.device(device))} ({cpu})"
    return cpu


def _check_target(space: Space, device: str, threads: int, batch: int, seq: int, warmup: int,
                  repeats: int) -> None:
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"unknown latency device {device!r}", hint="use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available",
                              hint="measure on --device cpu, or run on a machine with a GPU")
    for name, v, lo in (("threads", threads, 1), ("batch", batch, 1), ("seq", seq, 1),
                        ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"latency {name} must be an integer >= {lo}, got {v!r}")
    if seq > space.max_position_embeddings:
        raise ConfigError(f"seq {seq} exceeds the space's max_position_embeddings="
                          f"{space.max_position_embeddings}", hint="use a shorter --seq")


def measure_arch(space: Space, arch: Arch | str, *, device: str = "cpu", threads: int = 1,
                 batch: int = 1, seq: int = 128, warmup: int = 3, repeats: int = 10,
                 timing: str = "back-to-back") -> dict:
    """Median / mean / min latency (ms) of the stand-alone encoder of `arch` (no MLM head)."""
    return measure_archs(space, [arch], device=device, threads=threads, batch=batch, seq=seq,
                         warmup=warmup, repeats=repeats, timing=timing)[0]


def _check_timing(timing: str, rounds: int) -> None:
    if timing not in TIMINGS:
        raise ConfigError(f"unknown latency timing {timing!r}", hint=f"use one of {', '.join(TIMINGS)}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")


def time_models(configs: Sequence, *, device: str = "cpu", threads: int = 1, batch: int = 1, seq: int = 128,
                warmup: int = 3, repeats: int = 10, timing: str = "back-to-back",
                rounds: int = ROUNDS) -> list[list[float]]:
    """The timed runs (ms) of the encoders (AttncBertModel, no pooler, random weights) of `configs`
    (AttncBertConfigs), in one process under one schedule (see the module doc): after `warmup`
    untimed runs of each, "round-robin" runs every model once per round for `repeats` rounds, the
    order rotating by one per round; "back-to-back" cuts each model's `repeats` runs into
    min(rounds, repeats) blocks of consecutive runs, the models taking turns block by block (order
    rotating), each block after one untimed run."""
    import torch

    from attnc.runtime.latency import forward_ms, num_threads
    from attnc.runtime.modeling import AttncBertModel

    _check_timing(timing, rounds)
    with torch.random.fork_rng(devices=[]):   # the weights don't matter; don't touch the caller's RNG
        torch.manual_seed(0)
        models = [AttncBertModel(c, add_pooling_layer=False).eval().to(device) for c in configs]
    vocab = min(c.vocab_size for c in configs)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    times: list[list[float]] = [[] for _ in configs]

    def run(model) -> float:
        return forward_ms(model, ids, mask)

    n = len(models)
    with num_threads(threads), torch.inference_mode():
        for m in models:
            for _ in range(warmup):
                run(m)
        if timing == "round-robin":
            for r in range(repeats):
                for k in range(n):
                    i = (r + k) % n
                    times[i].append(run(models[i]))
        else:
            blocks = min(rounds, repeats)
            for r in range(blocks):
                runs = repeats // blocks + (1 if r < repeats % blocks else 0)
                for k in range(n):
                    i = (r + k) % n
                    run(models[i])                       # the block's untimed run: caches warm again
                    times[i].extend(run(models[i]) for _ in range(runs))
    del models
    return times


def _stats(arch, t: list[float]) -> dict:
    t = sorted(t)
    return {"arch": str(arch), "ms": statistics.median(t), "mean_ms": statistics.fmean(t), "min_ms": t[0],
            "q25_ms": t[(len(t) - 1) // 4]}


def measure_archs(space: Space, archs: Sequence[Arch | str], *, device: str = "cpu", threads: int = 1,
                  batch: int = 1, seq: int = 128, warmup: int = 3, repeats: int = 10,
                  reference: Arch | str | None = None, timing: str = "back-to-back",
                  rounds: int = ROUNDS) -> list[dict]:
    """Latencies (ms: median, mean, min, first quartile of `repeats` runs) of the stand-alone
    encoders of `archs` (no MLM head), timed together in one process (time_models; `timing` is
    "back-to-back" or "round-robin", see the module doc).

    Why together: on a shared machine the speed drifts over seconds (other processes, cache pressure,
    hypervisor steal). Timed one after the other, each arch gets its own slow or fast spell and the
    drift becomes per-arch noise; taking turns, a spell slows every arch of the group alike.

    With `reference`, that arch is timed in the same rounds (not returned as a record) and every
    record gets its median as "ref_ms": groups timed minutes apart can then be put on one scale
    (drift_factors)."""
    archs = [space.validate(a) for a in archs]
    timed_archs = archs + ([space.validate(reference)] if reference is not None else [])
    times = time_models([space.config(a) for a in timed_archs], device=device, threads=threads, batch=batch,
                        seq=seq, warmup=warmup, repeats=repeats, timing=timing, rounds=rounds)
    out = [_stats(arch, t) for arch, t in zip(archs, times)]
    if reference is not None:
        ref = statistics.median(times[-1])
        for rec in out:
            rec["ref_ms"] = ref
    return out


def reference_arch(space: Space) -> Arch:
    """The arch collect() times in every group as a yardstick of the machine's speed: the median by
    FLOPs of 64 fixed samples (a mid-sized model, so it feels a slow spell as the group does)."""
    rng = random.Random(12345)
    pool = sorted({space.sample(rng) for _ in range(64)}, key=lambda a: (space.flops(a), str(a)))
    return pool[len(pool) // 2]


def drift_factors(records: Sequence[dict]) -> list[float] | None:
    """Per record, the factor that puts its group on the dataset's common scale: median(ref_ms) /
    its group's ref_ms (None when the records carry no reference times)."""
    refs = [r.get("ref_ms") for r in records]
    if not refs or any(not isinstance(v, (int, float)) or not v > 0 for v in refs):
        return None
    mid = statistics.median(refs)
    return [mid / v for v in refs]


def _settings(space, device, threads, batch, seq, warmup, repeats, seed, interleave, timing, design) -> dict:
    return {"space": space.to_json(), "device": device, "threads": threads, "batch": batch, "seq": seq,
            "warmup": warmup, "repeats": repeats, "seed": seed, "interleave": interleave, "timing": timing,
            "design": design}


def write_json_atomic(path: Path, obj) -> None:
    """Write obj as JSON to a temporary file, fsync it, then rename it over `path` (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(folder: str | Path) -> dict:
    """The settings a dataset folder was collected with (DataError when missing or corrupt)."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no latency dataset in {folder} ({META} is missing)",
                        hint="collect one with `attnc search latency --samples N --out DIR`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}",
                        hint="the folder is damaged: collect into a new --out folder") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
        raise DataError(f"{path} is not a latency dataset description",
                        hint="collect into a new --out folder")
    return meta


def load_records(folder: str | Path, *, repair: bool = False) -> list[dict]:
    """The measured records of a dataset folder, in collection order. A last line without its
    newline is what a killed run leaves: it is dropped (and cut from the file when `repair`); any
    other bad line is a DataError."""
    path = Path(folder) / RECORDS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if (Path(folder) / META).exists():
            return []
        raise DataError(f"no latency dataset in {folder} ({RECORDS} is missing)",
                        hint="collect one with `attnc search latency --samples N --out DIR`") from None
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        log.warning("%s: dropping an incomplete last line (an interrupted run)", path)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(complete)
                f.flush()
                os.fsync(f.fileno())
    out = []
    for no, line in enumerate(data[:complete].decode("utf-8", "replace").splitlines(), 1):
        try:
            rec = json.loads(line)
            Arch.parse(rec["arch"])
            ms = float(rec["ms"])
            if not (math.isfinite(ms) and ms > 0):
                raise ValueError(f"latency {ms}")
        except (ValueError, KeyError, TypeError, ConfigError) as e:
            raise DataError(f"{path}:{no}: not a latency record ({e})",
                            hint="the file is damaged: collect into a new --out folder") from None
        out.append(rec)
    return out


def collect(space: Space, samples: int, folder: str | Path, *, device: str = "cpu", threads: int = 1,
            batch: int = 1, seq: int = 128, warmup: int = 3, repeats: int = 10, seed: int = 0,
            interleave: int = 16, timing: str = "back-to-back", design: str = "edges",
            progress: bool = False) -> list[dict]:
    """Measure the first `samples` archs of arch_sequence(space, samples, seed, design) on the target
    and return their records ({"index", "arch", "ms" (median), "mean_ms", "min_ms", "q25_ms",
    "ref_ms"}).

    Archs are measured in groups of `interleave`, timed together (measure_archs with `timing`: a slow
    spell of the machine hits the whole group alike) with reference_arch(space), whose median each
    record keeps as "ref_ms" (LatencyPredictor.fit rescales the groups to one machine speed with it);
    each group's records are written when it is done.

    Records already in folder/latency.jsonl are kept: the call measures only the missing ones (so a
    killed run resumes, and a larger `samples` extends). Other settings than the folder's are a
    ConfigError, as is a file whose archs are not this sequence."""
    if not isinstance(space, Space):
        raise ConfigError(f"collect needs a tinybert Space, got {type(space).__name__}")
    _check_target(space, device, threads, batch, seq, warmup, repeats)
    if isinstance(interleave, bool) or not isinstance(interleave, int) or interleave < 1:
        raise ConfigError(f"interleave must be a positive integer, got {interleave!r}")
    _check_timing(timing, ROUNDS)
    archs = arch_sequence(space, samples, seed, design)
    reference = reference_arch(space)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings(space, device, threads, batch, seq, warmup, repeats, seed, interleave, timing, design)
    machine = _machine(device)
    if (folder / META).exists():
        meta = read_meta(folder)
        if meta["settings"] != settings or meta.get("machine") != machine:
            diff = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
            if meta.get("machine") != machine:
                diff.append(f"machine ({meta.get('machine')!r} vs {machine!r})")
            raise ConfigError(f"{folder} holds latencies collected with other settings: "
                              f"{', '.join(diff)} differ",
                              hint="pass the same options as the first run, or collect into a new --out folder")
    elif (folder / RECORDS).exists():
        raise DataError(f"{folder / RECORDS} exists without {META}",
                        hint="collect into a new --out folder")
    else:
        import torch
        write_json_atomic(folder / META, {"format": FORMAT, "settings": settings, "machine": machine,
                                           "torch": torch.__version__, "created": _now()})
    records = load_records(folder, repair=True)
    for i, rec in enumerate(records[:samples]):
        if rec.get("index") != i or rec["arch"] != str(archs[i]):
            raise DataError(f"{folder / RECORDS}: record {i} is {rec.get('arch')!r}, expected {archs[i]}",
                            hint="the file was not written by this sequence: collect into a new --out folder")
    todo = archs[len(records):]
    if not todo:
        return records[:samples]
    bar = None
    if progress:
        from attnc._progress import progress_bar
        bar = progress_bar(total=samples, initial=len(records), desc=f"latency {device}", unit="arch")
    try:
        with open(folder / RECORDS, "a") as f:
            for start in range(0, len(todo), interleave):
                group = todo[start:start + interleave]
                measured = measure_archs(space, group, device=device, threads=threads, batch=batch,
                                         seq=seq, warmup=warmup, repeats=repeats, reference=reference,
                                         timing=timing)
                for rec in measured:
                    rec = {"index": len(records), **rec}
                    f.write(json.dumps(rec) + "\n")
                    records.append(rec)
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(group))
                    bar.set_postfix_str(f"{group[-1]} {records[-1]['ms']:.2f} ms")
    finally:
        if bar is not None:
            bar.close()
    return records


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


BASE_SPACE = Space(max_layers=12, max_hidden=768, max_ffn=3072, max_heads=12)   # BERT-base's own space


def bert_base_latency_ms(device: str = "cpu", threads: int = 1, batch: int = 1, seq: int = 128, *,
                         warmup: int = 3, repeats: int = 10, folder: str | Path | None = None,
                         refresh: bool = False, timing: str = "back-to-back") -> float:
    """Median latency (ms) of BERT-base (12-768-3072-12-768, standard attention, no pooler) on the
    given target: the reference of `--speedup X` (target latency = this / X). With `folder`, the
    value is cached in folder/bert_base_latency.json per settings and machine; when the folder holds
    a latency dataset whose groups were timed with a reference arch, BERT-base is timed beside that
    reference and put on the dataset's scale (x median reference time of the dataset / the reference's
    time now), the scale the predictor's latencies are on."""
    _check_target(BASE_SPACE, device, threads, batch, seq, warmup, repeats)
    _check_timing(timing, ROUNDS)
    key = {"device": device, "threads": threads, "batch": batch, "seq": seq, "warmup": warmup,
           "repeats": repeats, "machine": _machine(device), "timing": timing}
    cache = Path(folder) / BASE if folder is not None else None
    entries = []
    if cache is not None and cache.exists():
        try:
            entries = json.loads(cache.read_text())["entries"]
            if not isinstance(entries, list):
                raise ValueError("entries is not a list")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {cache}: {e}", hint=f"delete {cache} to measure again") from None
        if not refresh:
            for e in entries:
                if _same_target(e, key):
                    return float(e["ms"])
    scale = _dataset_scale(folder) if folder is not None else None
    configs = [BASE_SPACE.config(BERT_BASE)] + ([scale[0].config(scale[1])] if scale else [])
    times = time_models(configs, device=device, threads=threads, batch=batch, seq=seq, warmup=warmup,
                        repeats=repeats, timing=timing)
    raw = statistics.median(times[0])
    entry = {**key, "raw_ms": raw}
    ms = raw
    if scale:
        ref_now = statistics.median(times[1])
        ms = raw * scale[2] / ref_now
        entry.update(reference=str(scale[1]), reference_ms_now=ref_now, reference_ms_dataset=scale[2])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        entries = [e for e in entries if not _same_target(e, key)]   # the one it replaces, old format too
        entries.append({**entry, "ms": ms, "measured": _now()})
        write_json_atomic(cache, {"arch": BERT_BASE, "entries": entries})
    return ms


def _same_target(entry, key: dict) -> bool:
    """Whether a BERT-base cache entry was measured on the target `key` describes (entries written
    before timings were recorded were timed back-to-back)."""
    return isinstance(entry, dict) and all(entry.get(k, "back-to-back" if k == "timing" else None) == v
                                           for k, v in key.items())


def _dataset_scale(folder) -> tuple[Space, Arch, float] | None:
    """(space, reference arch, median reference time) of the latency dataset in `folder`, or None when
    it has none (or its records carry no reference times)."""
    if not (Path(folder) / META).is_file():
        return None
    space = Space.from_json(read_meta(folder)["settings"]["space"])
    refs = [r.get("ref_ms") for r in load_records(folder)]
    if not refs or any(not isinstance(v, (int, float)) or not v > 0 for v in refs):
        return None
    return space, reference_arch(space), statistics.median(refs)


def measure_beside_bert_base(space: Space, archs: Sequence[Arch | str], *, device: str = "cpu",
                             threads: int = 1, batch: int = 1, seq: int = 128, warmup: int = 3,
                             repeats: int = 20, timing: str = "back-to-back") -> tuple[float, list[dict]]:
    """(BERT-base's median ms, records of `archs`) timed side by side in one process, under one
    schedule (time_models): the measured speedup of an arch is BERT-base's time / its own."""
    archs = [space.validate(a) for a in archs]
    _check_target(space, device, threads, batch, seq, warmup, repeats)
    configs = [BASE_SPACE.config(BERT_BASE)] + [space.config(a) for a in archs]
    times = time_models(configs, device=device, threads=threads, batch=batch, seq=seq, warmup=warmup,
                        repeats=repeats, timing=timing)
    return statistics.median(times[0]), [_stats(a, t) for a, t in zip(archs, times[1:])]


def verify_archs(space: Space, archs: Sequence[Arch | str], *, target_ms: float, speedup: float | None = None,
                 settings: dict, predicted: Sequence[float] | None = None, measure=None) -> dict:
    """Time `archs` side by side with BERT-base on the predictor's target (`settings`: device,
    threads, batch, seq[, warmup, repeats, timing]) and say which meet the target: with `speedup` X,
    a measured speedup (BERT-base's time / the arch's, timed together) of at least X; else a measured
    latency of at most target_ms. Returns {"bert_base_ms", "archs": [{"arch", "measured_ms",
    "measured_speedup", "meets", "predicted_ms"?}], "found": [...], "missing": [...], "settings"}.
    `measure` replaces measure_beside_bert_base (tests)."""
    measure = measure or measure_beside_bert_base
    kw = {k: settings[k] for k in ("device", "threads", "batch", "seq") if k in settings}
    kw["warmup"] = int(settings.get("warmup", 3))
    kw["repeats"] = max(int(settings.get("repeats", 10)), 10)
    kw["timing"] = settings.get("timing", "back-to-back")
    base, recs = measure(space, list(archs), **kw)
    rows = []
    for i, rec in enumerate(recs):
        sp = base / rec["ms"]
        meets = sp >= speedup if speedup is not None else rec["ms"] <= target_ms
        row = {"arch": rec["arch"], "measured_ms": rec["ms"], "measured_speedup": sp, "meets": bool(meets)}
        if predicted is not None:
            row["predicted_ms"] = float(predicted[i])
            row["prediction_error_pct"] = 100.0 * (row["predicted_ms"] - rec["ms"]) / rec["ms"]
        rows.append(row)
    return {"bert_base_ms": base, "target_ms": target_ms, "speedup": speedup, "settings": kw, "archs": rows,
            "found": [r["arch"] for r in rows if r["meets"]], "missing": [r["arch"] for r in rows if not r["meets"]]}


# --- the predictor ------------------------------------------------------------------------------------


def _mlp(n_in: int, hidden: Sequence[int]):
    import torch.nn as nn

    layers, prev = [], n_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, 1))
    return nn.Sequential(*layers).double()


def _errors(pred: Sequence[float], true: Sequence[float]) -> dict:
    n = len(true)
    if n == 0:
        return {"rmse_ms": None, "mape_pct": None}
    se = sum((p - t) ** 2 for p, t in zip(pred, true)) / n
    ape = sum(abs(p - t) / t for p, t in zip(pred, true)) / n
    return {"rmse_ms": math.sqrt(se), "mape_pct": 100.0 * ape}


def under_prediction_margin(pred: Sequence[float], true: Sequence[float],
                            quantile: float = MARGIN_QUANTILE) -> float | None:
    """The safety margin a latency limit needs for these predictions: the `quantile` (linear
    interpolation) of true / predicted - 1 over the archs, floored at 0 (an arch predicted at
    T / (1 + margin) then runs at most at T, for that share of such archs). None for fewer than 2."""
    r = [t / p - 1.0 for p, t in zip(pred, true)]
    return max(0.0, percentile(r, quantile)) if len(r) >= 2 else None


def prediction_errors(pred: Sequence[float], true: Sequence[float]) -> dict:
    """RMSE, MAPE, the mean signed error (bias: > 0 over-predicts), the largest under-prediction
    and the safety margin (under_prediction_margin) of predictions against measurements."""
    out = _errors(pred, true)
    if not true:
        return {**out, "bias_pct": None, "max_under_pct": None, "margin": None, "n": 0}
    signed = [(p - t) / t for p, t in zip(pred, true)]
    return {**out, "bias_pct": 100.0 * statistics.fmean(signed), "max_under_pct": 100.0 * max(0.0, -min(signed)),
            "margin": under_prediction_margin(pred, true), "n": len(true)}


def _as_records(dataset) -> list[dict]:
    if isinstance(dataset, (str, os.PathLike)):
        return load_records(dataset)
    try:
        recs = list(dataset)
    except TypeError:
        raise ConfigError("a latency dataset is a folder or a list of {'arch', 'ms'} records") from None
    return recs


class LatencyPredictor:
    """arch -> predicted latency (ms): an MLP on normalised space.features(arch).

    Fitted on log(ms) by default (target="log"): latencies span two orders of magnitude in a
    space and MAPE is a relative error, so the log target weights small and large models alike
    (benchmarks/bench_tinybert_latency.py measures both targets)."""

    def __init__(self, space: Space, net, *, seq: int, hidden: Sequence[int], target: str,
                 inputs: str = "log",
                 feat_mean: Sequence[float], feat_std: Sequence[float], y_mean: float, y_std: float,
                 metrics: dict | None = None, settings: dict | None = None):
        self.space = space
        self.net = net.eval()
        self.seq = seq
        self.hidden = tuple(hidden)
        self.target = target
        self.inputs = inputs
        self.feat_mean = [float(x) for x in feat_mean]
        self.feat_std = [float(x) for x in feat_std]
        self.y_mean = float(y_mean)
        self.y_std = float(y_std)
        self.metrics = metrics or {}
        self.settings = settings   # the dataset's target (device, threads, batch, seq), when known

    def __repr__(self) -> str:
        m = self.metrics
        err = (f", held-out MAPE {m['mape_pct']:.2f}%" if m.get("mape_pct") is not None else "")
        if self.safety_margin is not None:
            err += f", safety margin {100 * self.safety_margin:.1f}%"
        return (f"LatencyPredictor(MLP {list(self.hidden)} on {self.target} ms, "
                f"seq={self.seq}{err})")

    @property
    def safety_margin(self) -> float | None:
        """The margin a search under a latency limit T asks of this predictor: admitted archs have
        predicted x (1 + margin) <= T. It is the 95th percentile of how much the predictor
        under-predicted its held-out archs (true / predicted - 1, floored at 0; metrics
        ["safety_margin"]), so about 19 in 20 archs predicted at the admitted edge still run within T
        when measured like the dataset. None when the fit held nothing out."""
        v = self.metrics.get("safety_margin")
        return None if v is None else float(v)

    def check(self, records: Iterable[dict], value: str = "ms") -> dict:
        """prediction_errors of this predictor on measured records ({"arch", value}), e.g. archs
        timed apart from the dataset (another process, `attnc latency`)."""
        recs = list(records)
        return prediction_errors(self.predict_many([r["arch"] for r in recs]), [float(r[value]) for r in recs])

    # -- fitting --

    @classmethod
    def fit(cls, space: Space, dataset, *, hidden: Sequence[int] = (400, 400, 400), epochs: int = 2000,
            lr: float = 1e-3, seed: int = 0, holdout: float = 0.2, target: str = "log",
            value: str = "ms", inputs: str = "log", seq: int | None = None, settings: dict | None = None,
            threads: int | None = 1, drift: bool = True) -> tuple[LatencyPredictor, dict]:
        """Fit on `dataset` (a list of {"arch", "ms"} records or a collect() folder) and return
        (predictor, metrics). A `holdout` fraction (random with `seed`; never an arch holding the
        minimum or maximum of a feature, so held-out archs are interpolated) is kept out of training
        and scored: held-out RMSE (ms) and MAPE (%), next to the mean predictor (the training mean)
        and ordinary least squares on the same features, as baselines.

        `value` is the record field fitted ("ms": the median of the repeats; "min_ms": their
        minimum). Training runs on `threads` threads (1 by default: for an MLP this small, more
        threads mostly add synchronisation, and on a loaded machine they stall).

        `drift` (default): when the records carry the reference arch's time of their group
        ("ref_ms", see collect), each latency is first rescaled to the dataset's median machine
        speed (drift_factors) -- the fit and the held-out errors are on that scale; metrics["raw"]
        keeps the held-out errors against the unscaled measurements."""
        import torch

        from attnc.runtime.latency import num_threads

        if target not in TARGETS:
            raise ConfigError(f"unknown predictor target {target!r}", hint=f"use one of {', '.join(TARGETS)}")
        if inputs not in INPUTS:
            raise ConfigError(f"unknown predictor inputs {inputs!r}", hint=f"use one of {', '.join(INPUTS)}")
        if value not in VALUES:
            raise ConfigError(f"unknown latency value {value!r}",
                              hint="use ms (the median of the repeats), q25_ms or min_ms")
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ConfigError(f"hidden layer widths must be positive, got {hidden}")
        if isinstance(dataset, (str, os.PathLike)):
            meta = read_meta(dataset)["settings"]
            if Space.from_json(meta["space"]) != space:
                raise ConfigError(f"the dataset in {dataset} was collected on another space",
                                  hint="fit with the space of the dataset (Space.from_json of its meta)")
            seq = meta["seq"] if seq is None else seq
            settings = settings or {k: meta.get(k, "round-robin" if k == "timing" else None)
                                    for k in ("device", "threads", "batch", "seq", "warmup", "repeats", "timing")}
        seq = 128 if seq is None else seq
        # one value per arch (the mean when an arch was measured twice), in first-seen order
        by_arch: dict[Arch, list[float]] = {}
        raw_by_arch: dict[Arch, list[float]] = {}
        recs = _as_records(dataset)
        factors = drift_factors(recs) if drift else None
        for k, rec in enumerate(recs):
            try:
                arch, ms = space.validate(rec["arch"]), float(rec[value])
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"bad latency record {rec!r}: {e}",
                                hint="records are {'arch': 'L-dm-df-h-dqkv', 'ms': float}") from None
            if not (math.isfinite(ms) and ms > 0):
                raise DataError(f"bad latency {ms} for {arch}", hint="latencies are positive milliseconds")
            by_arch.setdefault(arch, []).append(ms * (factors[k] if factors else 1.0))
            raw_by_arch.setdefault(arch, []).append(ms)
        archs = list(by_arch)
        ms = [sum(v) / len(v) for v in by_arch.values()]
        raw_ms = [sum(v) / len(v) for v in raw_by_arch.values()]
        if len(archs) < 5:
            raise DataError(f"{len(archs)} distinct archs are too few to fit a latency predictor",
                            hint="collect at least 50 (`--samples`)")
        X = [_inputs(space.features(a, seq), inputs) for a in archs]
        nf = len(X[0])

        # split: the feature extremes always train; a random `holdout` share of the rest is held out
        pinned = set()
        for j in range(nf):
            col = [x[j] for x in X]
            pinned.add(col.index(min(col)))
            pinned.add(col.index(max(col)))
        rest = [i for i in range(len(archs)) if i not in pinned]
        random.Random(seed).shuffle(rest)
        n_out = min(int(round(holdout * len(archs))), len(rest))
        test_idx = sorted(rest[:n_out])
        train_idx = sorted(set(range(len(archs))) - set(test_idx))

        tr = [X[i] for i in train_idx]
        mean = [sum(c) / len(c) for c in zip(*tr)]
        std = [math.sqrt(sum((v - m) ** 2 for v in c) / len(c)) for c, m in zip(zip(*tr), mean)]
        std = [s if s > 0 else 1.0 for s in std]          # a constant feature (kd: heads) stays 0
        fwd = (lambda v: math.log(v)) if target == "log" else (lambda v: v)
        ys = [fwd(ms[i]) for i in train_idx]
        y_mean = sum(ys) / len(ys)
        y_std = math.sqrt(sum((y - y_mean) ** 2 for y in ys) / len(ys)) or 1.0

        def norm(rows):
            return torch.tensor([[(v - m) / s for v, m, s in zip(r, mean, std)] for r in rows],
                                dtype=torch.float64)

        xt = norm(tr)
        yt = torch.tensor([(y - y_mean) / y_std for y in ys], dtype=torch.float64).unsqueeze(1)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _mlp(nf, hidden)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        # cosine decay to 0: the full-batch loss settles instead of oscillating at the end
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        net.train()
        with num_threads(threads):
            for _ in range(epochs):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(net(xt), yt)
                loss.backward()
                opt.step()
                sched.step()
        pred = cls(space, net, seq=seq, hidden=hidden, target=target, inputs=inputs, feat_mean=mean, feat_std=std,
                   y_mean=y_mean, y_std=y_std, settings=settings)

        test_archs = [archs[i] for i in test_idx]
        true = [ms[i] for i in test_idx]
        train_mean = sum(ms[i] for i in train_idx) / len(train_idx)
        test_pred = pred.predict_many(test_archs)
        metrics = {
            "n_archs": len(archs), "n_train": len(train_idx), "n_heldout": len(test_idx),
            "target": target, "inputs": inputs, "value": value, "hidden": list(hidden), "epochs": epochs, "lr": lr,
            "seed": seed, "drift_corrected": factors is not None,
            "train_loss": float(loss.detach()), "fit_seconds": time.perf_counter() - t0,
            **_errors(test_pred, true),
            "heldout": prediction_errors(test_pred, true),
            "heldout_archs": [str(a) for a in test_archs],
            "heldout_ms": true, "heldout_predicted_ms": test_pred,
            "safety_margin": under_prediction_margin(test_pred, true),
            "margin_quantile": MARGIN_QUANTILE,
            "train": _errors(pred.predict_many([archs[i] for i in train_idx]), [ms[i] for i in train_idx]),
            "mean_predictor": _errors([train_mean] * len(true), true),
            "raw": _errors(test_pred, [raw_ms[i] for i in test_idx]),
            "linear": _errors(_least_squares([X[i] for i in train_idx], [ms[i] for i in train_idx],
                                             [X[i] for i in test_idx]), true),
        }
        pred.metrics = metrics
        return pred, metrics

    # -- prediction --

    def predict_many(self, archs: Iterable[Arch | str]) -> list[float]:
        """Predicted latencies (ms) of archs of the predictor's space (ConfigError for others)."""
        import torch

        archs = [self.space.validate(a) for a in archs]
        if not archs:
            return []
        rows = [_inputs(self.space.features(a, self.seq), self.inputs) for a in archs]
        x = torch.tensor([[(v - m) / s for v, m, s in zip(r, self.feat_mean, self.feat_std)] for r in rows],
                         dtype=torch.float64)
        with torch.no_grad():
            y = self.net(x).squeeze(1) * self.y_std + self.y_mean
        if self.target == "log":
            y = torch.exp(y)
        return [float(v) for v in y]

    def predict(self, arch: Arch | str) -> float:
        """Predicted latency of one arch, in milliseconds."""
        return self.predict_many([arch])[0]

    __call__ = predict

    # -- persistence --

    def save(self, folder: str | Path) -> Path:
        """folder/predictor.pt (the MLP's state dict) + folder/predictor.json (space, normalisation,
        metrics): plain tensors and JSON, loadable with weights_only."""
        import torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in self.net.state_dict().items()}, folder / WEIGHTS)
        write_json_atomic(folder / PREDICTOR, {
            "format": FORMAT, "space": self.space.to_json(), "seq": self.seq, "hidden": list(self.hidden),
            "target": self.target, "inputs": self.inputs, "feature_names": list(Space.FEATURE_NAMES),
            "feature_mean": self.feat_mean, "feature_std": self.feat_std,
            "y_mean": self.y_mean, "y_std": self.y_std, "metrics": self.metrics, "settings": self.settings})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LatencyPredictor:
        """The predictor saved in `folder` (DataError, with a hint, when missing or damaged)."""
        import torch

        folder = Path(folder)
        hint = f"fit one with `attnc search latency --samples N --out {folder}`"
        try:
            d = json.loads((folder / PREDICTOR).read_text())
        except FileNotFoundError:
            raise DataError(f"no latency predictor in {folder} ({PREDICTOR} is missing)", hint=hint) from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {folder / PREDICTOR}: {e}", hint=hint) from None
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
            space = Space.from_json(d["space"])
            hidden = [int(h) for h in d["hidden"]]
            if d["target"] not in TARGETS:
                raise ValueError(f"target {d['target']!r}")
            nf = len(d["feature_mean"])
            if nf != len(d["feature_std"]) or nf != len(space.features(space.max_arch, d["seq"])):
                raise ValueError("the normalisation does not match the space's features")
            net = _mlp(nf, hidden)
            state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
            net.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
            if d.get("inputs") not in INPUTS:
                raise ValueError(f"inputs {d.get('inputs')!r}")
            return cls(space, net, seq=int(d["seq"]), hidden=hidden, target=d["target"], inputs=d["inputs"],
                       feat_mean=d["feature_mean"], feat_std=d["feature_std"], y_mean=d["y_mean"],
                       y_std=d["y_std"], metrics=d.get("metrics"), settings=d.get("settings"))
        except FileNotFoundError:
            raise DataError(f"no latency predictor weights in {folder} ({WEIGHTS} is missing)",
                            hint=hint) from None
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, ConfigError,
                EOFError, OSError) as e:
            raise DataError(f"damaged latency predictor in {folder}: {type(e).__name__}: {e}",
                            hint=hint) from None


def _least_squares(X: list[list[float]], y: list[float], Xq: list[list[float]]) -> list[float]:
    """Ordinary least squares (with intercept) on the raw features: a baseline for the MLP."""
    import torch

    if not Xq:
        return []
    A = torch.tensor([[1.0, *r] for r in X], dtype=torch.float64)
    scale = A.abs().amax(0).clamp_min(1e-12)            # column scaling keeps lstsq well conditioned
    sol = torch.linalg.lstsq(A / scale, torch.tensor(y, dtype=torch.float64).unsqueeze(1)).solution
    Q = torch.tensor([[1.0, *r] for r in Xq], dtype=torch.float64) / scale
    return [float(v) for v in (Q @ sol).squeeze(1)]
