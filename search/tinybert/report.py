"""Pictures and summaries of AutoTinyBERT search studies (`attnc search superplm report DIR --plot FILE`).

    from attnc.search.tinybert import report
    from attnc.search.tinybert.evolve import open_result
    result = open_result("runs/evo")
    report.pareto_front([(r.latency_ms, r.score) for r in result.scored])
    report.save_plot(result, "runs/evo/search.png")

Two panels, both from the study alone: latency vs score of every scored architecture, with the
Pareto front (no other candidate is both faster and better) and the admitted latencies (under the
limit with its margin, or the window) shaded; and the
best and median score of each generation's members. `pareto_front` is public so tests check the
data, not only the pixels. Library code: nothing is printed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from attnc.compiler.errors import ConfigError


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, score) points no other point dominates (lower-or-equal latency and higher-or-equal
    score, one of them strictly), sorted by latency."""
    pts = sorted(set((float(t), float(s)) for t, s in points), key=lambda p: (p[0], -p[1]))
    front, best = [], float("-inf")
    for t, s in pts:
        if s > best:   # faster points came first: only a higher score makes this one undominated
            front.append((t, s))
            best = s
    return front


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib", hint='pip install "attnc[viz]"') from None
    return plt


def save_plot(result, out: str | Path) -> Path:
    """Write the two-panel figure of a SearchResult (evolve.open_result) to `out` (PNG, PDF, SVG)."""
    from ..plots import check_plot_path, write_figure

    out = check_plot_path(out)
    plt = _pyplot()
    scored = result.scored
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lo, hi = result.bounds
    if lo == lo and hi == hi:   # not NaN: the study knows its target
        label = (f"latency window {lo:.3g}-{hi:.3g} ms" if result.constraint == "window" else
                 f"admitted: predicted <= {hi:.3g} ms (margin {100 * result.margin:.1f}%)")
        a1.axvspan(lo, hi, color="tab:green", alpha=0.12, label=label)
        a1.axvline(result.target_ms, color="tab:green", lw=0.8, ls="--", label=f"target {result.target_ms:.3g} ms")
    by_origin: dict[str, list] = {}
    for r in scored:
        by_origin.setdefault(r.origin, []).append(r)
    for origin, rows in sorted(by_origin.items()):
        a1.scatter([r.latency_ms for r in rows], [r.score for r in rows], s=14, alpha=0.7, label=origin)
    front = pareto_front([(r.latency_ms, r.score) for r in scored])
    if front:
        a1.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1.2,
                label="Pareto front")
    if result.best is not None:
        a1.scatter([result.latency_ms], [result.score], marker="*", s=160, color="tab:red", zorder=5,
                   label=f"best {result.best}")
    if lo == lo and hi == hi:   # show the window's edges even when every point lies inside it
        xs = [r.latency_ms for r in scored] + [hi, result.target_ms] + ([lo] if result.constraint == "window" else [])
        pad = 0.08 * (max(xs) - min(xs))
        a1.set_xlim(min(xs) - pad, max(xs) + pad)
    a1.ticklabel_format(axis="y", useOffset=False)
    a1.set_xlabel("predicted latency (ms)")
    a1.set_ylabel("score (higher is better)")
    a1.set_title(f"{result.algorithm}: {len(scored)} architectures scored")
    a1.legend(fontsize=7, loc="lower right")
    gens = [g for g in result.generations if g["best"] is not None]
    if gens:
        xs = [g["generation"] for g in gens]
        a2.plot(xs, [g["best"] for g in gens], marker="o", label="best")
        a2.plot(xs, [g["median"] for g in gens], marker="s", label="median")
        a2.set_xticks(xs)
        a2.legend()
    a2.ticklabel_format(axis="y", useOffset=False)
    a2.set_xlabel("generation")
    a2.set_ylabel("score of the generation's members")
    a2.set_title("score per generation")
    fig.tight_layout()
    try:
        write_figure(fig, out)
    finally:
        plt.close(fig)
    return out


def summary(result, top: int = 5, verification: dict | None = None) -> dict:
    """JSON-ready summary: the result plus its Pareto front. With a `verification` (the CLI's timing
    of the best architectures beside BERT-base, latency.verify_archs), "best" is the best-scoring
    architecture that met the target on measurement (None when none did: an architecture that misses
    is reported in "missing", never as found) and "search_best" the best by predicted latency alone."""
    d = result.to_json(top=top)
    d["search_best"] = d["best"]
    if verification is not None:
        d["verification"] = verification
        if verification.get("status") == "measured":
            found = verification["found"]
            best = next((r for r in result.top(len(result.scored)) if r.arch in found), None)
            d["best"] = best.arch if best else None
            d["score"] = best.score if best else None
            d["latency_ms"] = best.latency_ms if best else None
            d["found"], d["missing"] = list(found), list(verification["missing"])
    front = pareto_front([(r.latency_ms, r.score) for r in result.scored])
    by_point = {}
    for r in result.scored:
        by_point.setdefault((float(r.latency_ms), float(r.score)), r.arch)
    d["pareto_front"] = [{"arch": by_point[p], "latency_ms": p[0], "score": p[1]} for p in front]
    return d
