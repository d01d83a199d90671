"""`attnc search report DIR [DIR ...] --plot`: the plotted data checked against the study rows
(read with plain sqlite3, running max in finish order), the PNG read back, the formula drawings
against hand-written DAGs, and non-study folders refused with exit 2."""
from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

from attnc.cli import main
from attnc.compiler.errors import DataError
from attnc.search import opnas, plots
from attnc.search.space import Architecture, LayerChoice
from attnc.search.synthetic import fails_on_dist

SPACE = opnas.Space(num_layers=2, kernel_sizes=(7, 65))


def _search(path, algorithm="opnas", seed=0, budget=8):
    opnas.search(SPACE, fails_on_dist, algorithm=algorithm, budget=budget, seed=seed, population=4,
                 top_k=2, children=2, study=path / "study.db")
    return path


def _sql_curve(folder) -> list:
    """Independent reference: the running max of the scores in finish order (a failed evaluation
    takes an x position and keeps the previous best; None before the first success)."""
    db = sqlite3.connect(folder / "study.db")
    rows = db.execute("SELECT status, score FROM candidates WHERE status IN ('done', 'failed') "
                      "ORDER BY finish_order").fetchall()
    db.close()
    best, out = None, []
    for status, score in rows:
        if status == "done":
            best = score if best is None else max(best, score)
        out.append(best)
    return out


def _sql_best_arch(folder) -> Architecture:
    db = sqlite3.connect(folder / "study.db")
    arch = db.execute("SELECT arch FROM candidates WHERE status='done' ORDER BY score DESC, id LIMIT 1").fetchone()[0]
    db.close()
    return Architecture.from_json(json.loads(arch))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"opnas0": _search(root / "opnas0", "opnas", 0), "opnas1": _search(root / "opnas1", "opnas", 1),
            "random2": _search(root / "random2", "random", 2)}


def test_curves_are_the_running_max_of_the_rows(runs):
    studies = [plots.load_study(runs["opnas0"]), plots.load_study(runs["random2"])]
    curves = plots.best_so_far_curves(studies)
    assert list(curves) == ["opnas seed 0", "random seed 2"]
    assert curves["opnas seed 0"] == _sql_curve(runs["opnas0"])
    assert curves["random seed 2"] == _sql_curve(runs["random2"])
    assert len(curves["opnas seed 0"]) == 8            # the budget: finished evaluations
    # preconditions of a meaningful check: fails_on_dist failed some candidates (x positions with
    # no new score), and a later score was lower than an earlier one (the running max must hold)
    raw = [r.score for r in studies[1].done]
    assert len(studies[1].finished) > len(studies[1].done) and raw != sorted(raw)


def test_seeds_of_one_algorithm_are_averaged_with_a_band(runs):
    studies = [plots.load_study(runs[k]) for k in ("opnas0", "opnas1", "random2")]
    g = plots.grouped_curves(studies)
    assert list(g) == ["opnas", "random"] and g["opnas"]["runs"] == 2
    a, b = _sql_curve(runs["opnas0"]), _sql_curve(runs["opnas1"])
    for i, x in enumerate(g["opnas"]["x"]):
        vals = [c[x - 1] for c in (a, b) if c[x - 1] is not None]
        assert g["opnas"]["mean"][i] == pytest.approx(sum(vals) / len(vals))
        assert (g["opnas"]["min"][i], g["opnas"]["max"][i]) == (min(vals), max(vals))
    # the figure: one line per group, the two-seed group drawn as its mean with a band
    fig = plots.report_figure(studies)
    ax = fig.axes[0]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert set(lines) == {"opnas (mean of 2 seeds)", "random seed 2"}
    assert lines["opnas (mean of 2 seeds)"] == pytest.approx(g["opnas"]["mean"])
    assert lines["random seed 2"] == [v for v in _sql_curve(runs["random2"]) if v is not None]
    assert len(ax.collections) == 1                    # the min-max band
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_report_several_dirs_json_and_png(runs, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["search", "report", str(runs["opnas0"]), str(runs["random2"]), "--json",
                 "--plot", str(png)]) == 0
    reps = json.loads(capsys.readouterr().out)
    assert [r["study"] for r in reps] == [str(runs["opnas0"] / "study.db"), str(runs["random2"] / "study.db")]
    for rep, key in zip(reps, ("opnas0", "random2")):
        curve = _sql_curve(runs[key])
        assert rep["best"]["score"] == max(v for v in curve if v is not None)
        assert rep["evaluated"] + rep["failed"] == len(curve)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05                  # not a blank canvas


def test_best_architecture_is_drawn_layer_by_layer(runs):
    studies = [plots.load_study(runs["opnas0"]), plots.load_study(runs["random2"])]
    best = max((s for s in studies), key=lambda s: s.best.score)
    folder = runs["opnas0"] if best is studies[0] else runs["random2"]
    arch = _sql_best_arch(folder)
    assert best.best.arch == arch
    fig = plots.report_figure(studies)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("layer ")]
    assert len(titles) == len(arch.layers)
    for i, (t, layer) in enumerate(zip(titles, arch.layers)):
        want = "conv" if layer.kind == "conv" else layer.formula[:30]   # titles wrap long formulas
        assert t.replace("\n", " ").startswith(f"layer {i}: {want}")
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_formula_drawing_is_the_formula_dag():
    d = plots.formula_drawing("softmax(Q @ K^T / sqrt(d)) @ V")
    # by hand: Q, K, K^T, Q @ K^T, d, sqrt(d), the division, softmax, V, the final matmul
    assert Counter(lab for _, lab in d.nodes) == Counter(
        ["Q", "K", "transpose", "matmul", "d", "sqrt", "div", "softmax", "V", "matmul"])
    lab = dict(d.nodes)
    assert lab[d.output] == "matmul" and d.positions[d.output][1] == max(y for _, y in d.positions.values())
    assert all(d.positions[u][1] < d.positions[v][1] for u, v in d.edges)   # drawn bottom-up
    assert {lab[u] for u, v in d.edges if v == d.output} == {"softmax", "V"}
    assert {d.positions[n][1] for n, name in d.nodes if name in "QKV"} == {0.0}
    assert len(set(d.positions.values())) == len(d.nodes)                  # no two nodes overlap
    twice = plots.formula_drawing("softsign(cos(Q, Q)) @ V")            # Q is both operands of cos
    lab = dict(twice.nodes)
    assert sorted(lab[u] for u, v in twice.edges if lab[v] == "cos") == ["Q", "Q"]
    conv = plots.layer_drawings(Architecture((LayerChoice.conv(7), LayerChoice.attention("Q @ K^T @ V / n")),
                                             hidden_size=32, intermediate_size=64, num_heads=2))
    assert (conv[0].kind, conv[0].kernel_size, conv[0].title) == ("conv", 7, "conv, kernel 7")


def test_a_study_with_one_done_row(tmp_path, capsys):
    from attnc.search.synthetic import known_ops
    opnas.search(SPACE, known_ops, budget=1, population=1, study=tmp_path / "one" / "study.db")
    s = plots.load_study(tmp_path / "one")
    assert plots.best_so_far_curves([s]) == {"opnas seed 0": _sql_curve(tmp_path / "one")}
    assert len(_sql_curve(tmp_path / "one")) == 1
    png = tmp_path / "one.png"
    assert main(["search", "report", str(tmp_path / "one"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_non_study_folders_are_data_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        plots.load_study(empty)
    assert main(["search", "report", str(empty), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no study" in err and "Traceback" not in err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "study.db").write_bytes(b"this is not sqlite" * 100)
    assert main(["search", "report", str(junk)]) == 2
    assert "not a study" in capsys.readouterr().err
    with pytest.raises(DataError):
        plots.load_study(junk)
    assert not (tmp_path / "x.png").exists()


def test_priority_heatmap_is_equation_3_per_position_from_the_rows(runs):
    """The heatmap's matrix, recomputed by hand from the SQLite rows (the path genes of the done
    candidates): column k is softmax(u) over the primitives at path position k, with
    u = mean score + alpha * sqrt(2 ln N / N_i) (unseen: the mean of all, N_i = 1)."""
    import math

    folder = runs["opnas0"]
    study = plots.load_study(folder)
    prims, matrix = plots.priority_matrix(study)
    assert prims == SPACE.primitives
    db = sqlite3.connect(folder / "study.db")
    rows = db.execute("SELECT genes, score FROM candidates WHERE status='done'").fetchall()
    db.close()
    paths = [(g["ops"], score) for genes, score in rows for g in json.loads(genes) if g is not None]
    longest = max(len(ops) for ops, _ in paths)
    assert len(matrix[0]) == longest
    for k in range(longest):
        samples = [(ops[k][0], s) for ops, s in paths if len(ops) > k]
        N, mean_all = len(samples), sum(s for _, s in samples) / len(samples)
        u = {}
        for o in prims:
            got = [s for x, s in samples if x == o]
            u[o] = (sum(got) / len(got) if got else mean_all) + study.alpha * math.sqrt(2 * math.log(N) / (len(got) or 1))
        z = sum(math.exp(v) for v in u.values())
        for i, o in enumerate(prims):
            assert matrix[i][k] == pytest.approx(math.exp(u[o]) / z, rel=1e-9)
