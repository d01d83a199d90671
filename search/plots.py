"""Pictures of OP-NAS studies (`attnc search report DIR [DIR ...] --plot FILE`).

    from attnc.search import plots
    studies = [plots.load_study("runs/opnas"), plots.load_study("runs/random")]
    plots.best_so_far_curves(studies)        # {label: best score after 1, 2, ... evaluations}
    plots.save_report(studies, "search.png")

Three panels, all derived from the study rows alone:
  * best score so far vs evaluations (finished evaluations in completion order), one line per
    study; several seeds of the same algorithm and weight-sharing setting are drawn as their mean
    with a min-max band instead of one line each;
  * the operation priorities per path position (softmax of Equation 3) of the study holding the
    best score — what the OP-NAS generator would sample next;
  * the best architecture's layers: each attention layer's formula as its compiler DAG (inputs at
    the bottom, the output at the top, laid out by depth with networkx — no graphviz binary), each
    convolution as a labelled box with its kernel size.

The functions that compute what is drawn (`best_so_far_curves`, `grouped_curves`,
`priority_matrix`, `layer_drawings`) are public so tests can check the data, not only the pixels.
Library code: nothing is printed; figures are returned or saved.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from attnc.compiler.errors import ConfigError

from .space import Architecture


@dataclass(frozen=True)
class StudyData:
    """What the plots need from one study: its settings and its finished rows."""

    path: Path                     # the study.db file
    algorithm: str
    weight_sharing: bool
    seed: int
    alpha: float
    space: dict                    # Space.to_json()
    done: tuple                    # Row of every successful evaluation, in completion order
    finished: tuple                # Row of every finished evaluation (done or failed), in completion order

    @property
    def label(self) -> str:
        return f"{self.group} seed {self.seed}"

    @property
    def group(self) -> str:
        """Algorithm + weight sharing: the curve a study belongs to when seeds are averaged."""
        return f"{self.algorithm}{' + WS' if self.weight_sharing else ''}"

    @property
    def best(self):
        return max(self.done, key=lambda r: (r.score, -r.id), default=None)


def load_study(folder: str | Path) -> StudyData:
    """Read a study (a search's --out folder or its study.db); DataError when it is not one."""
    from .opnas import read_study

    with read_study(folder) as (st, meta):
        p = st.path
        rows = st.rows()
    finished = sorted((r for r in rows if r.status in ("done", "failed")), key=lambda r: r.finish_order)
    return StudyData(p, meta["algorithm"], bool(meta.get("weight_sharing")), int(meta["seed"]),
                     float(meta["alpha"]), meta["space"], tuple(r for r in finished if r.status == "done"),
                     tuple(finished))


# --- the data the plots draw --------------------------------------------------------------------------


def best_so_far(study: StudyData) -> list[float | None]:
    """Best score after each finished evaluation (failed ones count toward the budget, so they take
    an x position too; None until the first success)."""
    best, out = None, []
    for r in study.finished:
        if r.status == "done" and (best is None or r.score > best):
            best = r.score
        out.append(best)
    return out


def labels(studies: Sequence[StudyData]) -> list[str]:
    """One distinct label per study: algorithm + weight sharing + seed (+ the folder on a clash)."""
    base = [s.label for s in studies]
    return [b if base.count(b) == 1 else f"{b} ({s.path.parent.name or s.path.name})"
            for b, s in zip(base, studies)]


def best_so_far_curves(studies: Sequence[StudyData]) -> "OrderedDict[str, list]":
    """{label: best-so-far curve} for each study, in the given order."""
    return OrderedDict((lab, best_so_far(s)) for lab, s in zip(labels(studies), studies))


def grouped_curves(studies: Sequence[StudyData]) -> "OrderedDict[str, dict]":
    """Per algorithm + weight-sharing group: {"runs": n, "x", "mean", "min", "max"}. At x the
    statistics are over the runs that had reached x evaluations with a success so far (runs of
    different lengths: the mean does not stop at the shortest)."""
    groups: OrderedDict[str, list] = OrderedDict()
    for s in studies:
        groups.setdefault(s.group, []).append(best_so_far(s))
    out = OrderedDict()
    for g, curves in groups.items():
        xs, mean, lo, hi = [], [], [], []
        for i in range(max((len(c) for c in curves), default=0)):
            vals = [c[i] for c in curves if i < len(c) and c[i] is not None]
            if vals:
                xs.append(i + 1)
                mean.append(sum(vals) / len(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        out[g] = {"runs": len(curves), "x": xs, "mean": mean, "min": lo, "max": hi}
    return out


def _space_of(study: StudyData):
    from .opnas import Space

    return Space(**{k: tuple(v) if isinstance(v, list) else v for k, v in study.space.items()})


def priority_matrix(study: StudyData) -> tuple[tuple[str, ...], list[list[float]]]:
    """(primitives, matrix[primitive][position]): Equation 3's softmax per path position, from the
    study's successful evaluations (what opnas.op_priorities gives the generator)."""
    from .opnas import _candidate_of, op_priorities

    space = _space_of(study)
    pri = op_priorities([(_candidate_of(r), r.score) for r in study.done], space, study.alpha)
    return space.primitives, [[d[o] for d in pri] for o in space.primitives]


@dataclass(frozen=True)
class LayerDrawing:
    """One layer of an architecture as drawn: a conv box, or a formula's DAG with positions."""

    kind: str                          # "attention" | "conv"
    title: str                         # the formula's canonical text, or "conv, kernel K"
    kernel_size: int | None = None
    nodes: tuple = ()                  # (node id, label) in topological order
    edges: tuple = ()                  # (source id, target id)
    positions: dict | None = None      # node id -> (x, y); inputs at y = 0, the output on top
    output: int | None = None


def formula_drawing(formula: str) -> LayerDrawing:
    """The compiler's DAG of a (canonical) formula, laid out by depth: y = longest path from a leaf."""
    from attnc.compiler.api import analyze
    from attnc.compiler.ir import label, output_of, topo
    from attnc.runtime.config import LAYER_CHECKS

    # the study checked the formula with its own input counts; accept what a layer accepts
    g = analyze(formula, checks=LAYER_CHECKS).graph
    order = list(topo(g))
    depth = {}
    for nid, node in order:
        preds = [depth[p] for p in g.predecessors(nid)]
        depth[nid] = max(preds) + 1 if preds else 0
    rows: dict[int, list[int]] = {}
    for nid, _ in order:
        rows.setdefault(depth[nid], []).append(nid)
    pos = {}
    for y in sorted(rows):
        ids = rows[y]
        if y == 0:   # leaves: centred, in topological order
            xs = {nid: j - (len(ids) - 1) / 2.0 for j, nid in enumerate(ids)}
        else:        # above its operands (their mean x), then pushed apart to at least 1 unit
            want = {nid: sum(pos[p][0] for p in g.predecessors(nid)) / g.in_degree(nid) for nid in ids}
            row = sorted(ids, key=lambda nid: (want[nid], nid))
            xs, last = {}, None
            for nid in row:
                xs[nid] = want[nid] if last is None else max(want[nid], last + 1.0)
                last = xs[nid]
            shift = sum(want.values()) / len(ids) - sum(xs.values()) / len(ids)
            xs = {nid: x + shift for nid, x in xs.items()}
        for nid in ids:
            pos[nid] = (xs[nid], float(y))
    # one edge per operand, in order: cos(Q, Q) has two edges from Q (the graph keeps one)
    edges = tuple((u, nid) for nid, n in order for u in n.operands)
    return LayerDrawing("attention", formula, None, tuple((nid, label(n)) for nid, n in order),
                        edges, pos, output_of(g))


def layer_drawings(arch: Architecture) -> list[LayerDrawing]:
    return [formula_drawing(c.formula) if c.kind == "attention"
            else LayerDrawing("conv", f"conv, kernel {c.kernel_size}", c.kernel_size)
            for c in arch.layers]


# --- drawing -------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib", hint='pip install "attnc[viz]"') from None
    return plt


def draw_best_so_far(ax, studies: Sequence[StudyData]) -> None:
    """One line per study; a group of several seeds: the mean with a min-max band."""
    groups = grouped_curves(studies)
    curves = best_so_far_curves(studies)
    by_group = {s.group: [] for s in studies}
    for lab, s in zip(curves, studies):
        by_group[s.group].append(lab)
    for g, labs in by_group.items():
        if len(labs) == 1:
            c = curves[labs[0]]
            pts = [(i + 1, v) for i, v in enumerate(c) if v is not None]
            ax.plot([x for x, _ in pts], [v for _, v in pts], label=labs[0], drawstyle="steps-post")
        else:
            d = groups[g]
            line, = ax.plot(d["x"], d["mean"], label=f"{g} (mean of {d['runs']} seeds)",
                            drawstyle="steps-post")
            ax.fill_between(d["x"], d["min"], d["max"], step="post", alpha=0.2, color=line.get_color())
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best score so far")
    ax.set_title("best so far")
    ax.legend(fontsize=8)


def draw_priorities(ax, study: StudyData, fig=None) -> None:
    prims, m = priority_matrix(study)
    if not m or not m[0]:
        ax.text(0.5, 0.5, "no attention paths evaluated", ha="center", va="center")
        ax.set_axis_off()
        return
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(prims)), prims)
    ax.set_xticks(range(len(m[0])), [str(i + 1) for i in range(len(m[0]))])
    ax.set_xlabel("path position")
    ax.set_title(f"operation priority, {study.label}", fontsize=9)
    if fig is not None:
        fig.colorbar(im, ax=ax)


_COLOURS = {"input": "#cfe2ff", "leaf": "#eeeeee", "matrix": "#ffe5b4", "other": "#e2f0d9"}


def _matrix_names() -> set[str]:
    """The compiler's matrix operations (coloured as in `attnc compile --graph`)."""
    from attnc.compiler.structural import MATRIX_OPS
    return {op.value for op in MATRIX_OPS}


def _layer_title(d: LayerDrawing, index: int) -> str:
    import textwrap

    if d.kind == "conv":
        return f"layer {index}: conv"
    return f"layer {index}: " + "\n".join(textwrap.wrap(d.title, 44, max_lines=4, placeholder=" ..."))


def draw_layer(ax, d: LayerDrawing, index: int) -> None:
    """A conv layer as a box with its kernel size; an attention layer as its formula DAG: one
    rounded box per node (inputs blue, constants grey, matrix ops orange, elementwise green, the
    output outlined), arrows from operands to their op."""
    ax.set_axis_off()
    ax.set_title(_layer_title(d, index), fontsize=8)
    if d.kind == "conv":
        ax.text(0.5, 0.5, f"light conv (GLU)\nkernel {d.kernel_size}", ha="center", va="center", fontsize=10,
                bbox=dict(boxstyle="round,pad=0.6", facecolor=_COLOURS["matrix"], edgecolor="black"),
                transform=ax.transAxes)
        return
    has_operands = {v for _, v in d.edges}
    seen: dict = {}
    for u, v in d.edges:   # a repeated operand (cos(Q, Q)) is drawn as arcs bending either way
        k = seen[(u, v)] = seen.get((u, v), -1) + 1
        rad = 0.0 if k == 0 and d.edges.count((u, v)) == 1 else (0.25 if k % 2 == 0 else -0.25) * (1 + k // 2)
        ax.annotate("", xy=d.positions[v], xytext=d.positions[u],
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=0.8, shrinkA=7, shrinkB=7,
                                    connectionstyle=f"arc3,rad={rad}"))
    matrix = _matrix_names()
    for nid, lab in d.nodes:
        if lab in ("Q", "K", "V", "P"):
            colour = _COLOURS["input"]
        elif nid not in has_operands:
            colour = _COLOURS["leaf"]
        else:
            colour = _COLOURS["matrix"] if lab in matrix else _COLOURS["other"]
        out = nid == d.output
        x, y = d.positions[nid]
        ax.text(x, y, lab, ha="center", va="center", fontsize=7, zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", facecolor=colour, edgecolor="black" if out else "grey",
                          linewidth=1.8 if out else 0.6))
    xs = [x for x, _ in d.positions.values()]
    ys = [y for _, y in d.positions.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)


def report_figure(studies: Sequence[StudyData]):
    """The report figure: best so far (all studies), the priority heatmap (of the best OP-NAS study,
    the algorithm that samples by those priorities; of the best study when none is OP-NAS) and the
    best model's layers (of the study holding the best score). Returns the matplotlib Figure."""
    if not studies:
        raise ConfigError("no studies to plot")
    plt = _pyplot()
    with_best = [s for s in studies if s.best is not None]
    top = max(with_best, key=lambda s: s.best.score) if with_best else studies[0]
    drawings = layer_drawings(top.best.arch) if top.best is not None else []
    ncols = max(1, len(drawings))
    fig = plt.figure(figsize=(max(12, 3.4 * ncols), 10), layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=[1.0, 1.25])
    a1, a2 = upper.subplots(1, 2, width_ratios=[1.0, 1.15])
    draw_best_so_far(a1, studies)
    guided = [s for s in with_best if s.algorithm == "opnas"]
    draw_priorities(a2, max(guided, key=lambda s: s.best.score) if guided else top, upper)
    if top.best is not None:
        lower.suptitle(f"best architecture: candidate {top.best.id} of {top.label}, "
                       f"score {top.best.score:.4f}", fontsize=10)
        axes = lower.subplots(1, ncols, squeeze=False)[0]
        for i, d in enumerate(drawings):
            draw_layer(axes[i], d, i)
    return fig


PLOT_FORMATS = (".png", ".pdf", ".svg")


def check_plot_path(out: str | Path) -> Path:
    """The plot file a command will write: a ConfigError before any work when its suffix is not a
    format the plots are written in."""
    out = Path(out)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"cannot write a plot to {out}: unknown format {out.suffix or '(no suffix)'!r}",
                          hint=f"end the file name with one of {', '.join(PLOT_FORMATS)}")
    return out


def write_figure(fig, out: Path, **kw) -> None:
    """fig.savefig(out) with its folder made; a path that cannot be written is a ConfigError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, **kw)
    except OSError as e:
        raise ConfigError(f"cannot write the plot {out}: {e}", hint="choose a writable file path") from None


def save_report(studies: Sequence[StudyData], out: str | Path) -> Path:
    """Draw report_figure(studies) to `out` (the format from its suffix: .png, .pdf, .svg)."""
    out = check_plot_path(out)
    plt = _pyplot()
    fig = report_figure(studies)
    try:
        write_figure(fig, out, dpi=110)
    finally:
        plt.close(fig)
    return out
