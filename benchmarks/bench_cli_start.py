"""Start-up cost of the `attnc` command line: wall time and peak memory of fresh processes.

Each command runs `--runs` times in a new process (after one discarded warm-up run, so the
on-disk parser cache exists as it does for a user after the first command). Reported per
command: median and p90 wall time, the largest peak RSS (os.wait4's ru_maxrss of the child),
the median CPU time (user + system, less sensitive to other load on the machine than wall time),
the first run with an empty attnc cache folder, and which heavy modules the process imported
(sys.modules at exit, and one extra run under `python -X importtime` for each heavy module's
cumulative import time).

Targets (issue 11): `attnc check FORMULA` <= 1 s and <= 200 MB cold on a 2-core machine;
`attnc check` and `attnc compile` import neither torch nor transformers nor attnc.runtime.

    python benchmarks/bench_cli_start.py [--runs 15] [--json out.json]
    python benchmarks/bench_cli_start.py --baseline /tmp/attnc-before   # also an older tree, interleaved

A baseline tree is any attnc installed into a folder, e.g. the last commit:
    git archive HEAD | tar -x -C /tmp/src && pip install --no-deps --target /tmp/attnc-before /tmp/src
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

FORMULA = "softmax(Q @ K^T / sqrt(d)) @ V"
HEAVY = ("torch", "transformers", "triton", "numpy", "sympy", "networkx", "lark", "scipy",
         "datasets", "tokenizers", "attnc.runtime", "attnc.kernels", "attnc.search")
TARGET = {"command": "attnc check", "wall_s": 1.0, "rss_mb": 200}
# children run in an empty folder: `python -m attnc` from a source checkout would otherwise
# import the checkout's attnc/ (the current directory comes first on sys.path)
NEUTRAL_CWD = tempfile.gettempdir()


def commands() -> dict[str, list[str]]:
    """name -> argv after the python executable (every command runs as `python -m attnc ...`, the
    same code as the `attnc` console script without the launcher's own start-up)."""
    return {
        "attnc check": ["-m", "attnc", "check", FORMULA],
        "attnc compile": ["-m", "attnc", "compile", FORMULA],
        "attnc ops": ["-m", "attnc", "ops"],
        "import attnc": ["-c", "import attnc"],
    }


def run_once(argv: list[str], env: dict) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds user + system) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=NEUTRAL_CWD)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err}")
    rss_kb = usage.ru_maxrss   # kilobytes on Linux
    return wall, rss_kb / 1024, usage.ru_utime + usage.ru_stime


def heavy_imports(argv: list[str], env: dict) -> dict[str, float]:
    """Heavy modules the process imports, each with its cumulative import time in seconds."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, capture_output=True,
                          text=True, check=True, cwd=NEUTRAL_CWD)
    found: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if name in HEAVY and cumulative.isdigit():
            found[name] = round(int(cumulative) / 1e6, 4)
    return dict(sorted(found.items()))


_DUMP = """
import atexit, json, runpy, sys
heavy, out = {heavy!r}, {out!r}
def dump():
    with open(out, "w") as f:
        json.dump(sorted(m for m in sys.modules if m in heavy or m.split(".")[0] in heavy), f)
atexit.register(dump)
argv = {argv!r}
if argv[0] == "-m":
    sys.argv = ["attnc", *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
else:   # ["-c", "import NAME"]: the only other kind of command this benchmark runs
    import importlib
    assert argv[0] == "-c" and argv[1].startswith("import "), argv
    importlib.import_module(argv[1].split()[1])
"""


def heavy_modules(argv: list[str], env: dict) -> list[str]:
    """Heavy modules in sys.modules when the process exits (packages and their submodules)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "modules.json")
        code = _DUMP.format(heavy=HEAVY, out=out, argv=argv)
        subprocess.run([sys.executable, "-c", code], env=env, cwd=NEUTRAL_CWD, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            mods = json.load(f)
    return sorted({m if m in HEAVY else next(h for h in HEAVY if m == h or m.startswith(h + "."))
                   for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY)})


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


def machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": sys.version.split()[0],
            "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    return info


def _summary(walls, rsses, cpus, first, cmd, env) -> dict:
    return {"argv": ["python", *cmd],
            "cpu_s": {"median": round(statistics.median(cpus), 4), "p90": round(percentile(cpus, 0.9), 4)},
            "wall_s": {"median": round(statistics.median(walls), 4),
                       "p90": round(percentile(walls, 0.9), 4),
                       "min": round(min(walls), 4), "max": round(max(walls), 4)},
            "max_rss_mb": round(max(rsses), 1),
            "first_run_empty_cache": {"wall_s": round(first[0], 4), "rss_mb": round(first[1], 1)},
            "heavy_modules_loaded": heavy_modules(cmd, env),
            "heavy_import_times_s": heavy_imports(cmd, env)}


def _line(name, res) -> str:
    return (f"{name:22s} median {res['wall_s']['median']:.3f} s  p90 {res['wall_s']['p90']:.3f} s  "
            f"cpu {res['cpu_s']['median']:.3f} s  "
            f"max RSS {res['max_rss_mb']:.0f} MB  first (empty cache) "
            f"{res['first_run_empty_cache']['wall_s']:.3f} s  "
            f"loads {', '.join(res['heavy_modules_loaded']) or '-'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="timed processes per command (default 15)")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also measure the attnc installed in DIR (put first on PYTHONPATH), "
                         "alternating its runs with the current tree's so both see the same load")
    ap.add_argument("--note", default=None, help="a note stored in the JSON (what was measured)")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    trees = {"current": env}
    if args.baseline:
        trees["baseline"] = dict(env, PYTHONPATH=os.pathsep.join(
            filter(None, [os.path.abspath(args.baseline), env.get("PYTHONPATH")])))
    result = {"benchmark": "cli_start", "formula": FORMULA, "runs": args.runs,
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None
                                                                            else sys.argv[1:])),
              "machine": machine(), "targets": TARGET, "results": {}}
    if args.note:
        result["note"] = args.note
    if args.baseline:
        result["baseline_results"] = {}
    with tempfile.TemporaryDirectory(prefix="attnc-bench-cache-") as cache:
        for tree_env in trees.values():
            tree_env["ATTNC_CACHE_DIR"] = cache
        for name, cmd in commands().items():
            walls = {t: [] for t in trees}
            rsses = {t: [] for t in trees}
            cpus = {t: [] for t in trees}
            first = {}
            for t, tree_env in trees.items():
                empty = os.path.join(cache, f"empty-{t}-" + name.replace(" ", "-"))
                first[t] = run_once(cmd, dict(tree_env, ATTNC_CACHE_DIR=empty))[:2]
                run_once(cmd, tree_env)   # warm-up: fills the parser cache and the OS page cache
            for _ in range(args.runs):
                for t, tree_env in trees.items():   # alternate: both trees see the same load
                    w, r, c = run_once(cmd, tree_env)
                    walls[t].append(w)
                    rsses[t].append(r)
                    cpus[t].append(c)
            for t, tree_env in trees.items():
                res = _summary(walls[t], rsses[t], cpus[t], first[t], cmd, tree_env)
                (result["results"] if t == "current" else result["baseline_results"])[name] = res
                print(_line(name if t == "current" else f"{name} (baseline)", res), flush=True)
    check = result["results"]["attnc check"]
    result["meets_target"] = bool(check["wall_s"]["median"] <= TARGET["wall_s"]
                                  and check["max_rss_mb"] <= TARGET["rss_mb"])
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
