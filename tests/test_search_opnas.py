"""OP-NAS search core: sampling, mutation, Equation 3, the study, dedup, failures, kill + resume."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import attnc
from attnc.compiler.equiv import equivalent
from attnc.search import opnas
from attnc.search.paths import Path as FPath, to_text
from attnc.search.space import Architecture, LayerChoice
from attnc.search.study import Study
from attnc.search.synthetic import fails_on_dist, known_ops

ROOT = Path(__file__).resolve().parents[1]


def _run_formula(formula: str) -> torch.Tensor:
    """Run a formula on inputs with n != d: an independent check that the output is n x d."""
    fn = attnc.compile(formula, backend="torch")
    t = {k: torch.randn(1, 2, 7, 5, dtype=torch.float64) for k in "qkvp"}
    return fn(**t)


def test_sampling_yields_checked_canonical_formulas():
    space = opnas.Space(num_layers=3, conv_prob=0.3)
    rng = random.Random(0)
    stats = opnas.Stats()
    kinds = set()
    for _ in range(15):
        cand = opnas.sample_arch(rng, space, stats)
        assert len(cand.arch.layers) == 3
        for layer, gene in zip(cand.arch.layers, cand.genes):
            kinds.add(layer.kind)
            if layer.kind == "conv":
                assert gene is None and layer.kernel_size in space.kernel_sizes
                continue
            a = attnc.analyze(layer.formula)
            assert a.canonical == layer.formula                        # stored canonically
            assert attnc.analyze(to_text(gene)).canonical == layer.formula  # and it is the path's formula
            assert 2 <= len(a.inputs) <= 4
            assert _run_formula(layer.formula).shape == (1, 2, 7, 5)
            assert set(gene.op_names) <= set(space.primitives)
            assert space.min_path <= len(gene.ops) <= space.max_path
    assert kinds == {"attention", "conv"}
    assert stats.illegal > 0   # random paths do hit illegal graphs, which were rejected


def test_illegal_paths_rejected_by_pre_check_and_compiler():
    space = opnas.Space()
    # ends as n x n: shape pre-check
    assert opnas.check_path(FPath("Q", (("matmul", "K"),)), space) is None
    # Q - Q cancels: only the compiler's simplification sees that the inputs are gone
    assert opnas.check_path(FPath("Q", (("neg", None), ("add", "Q"), ("add", "K"))), space) is None
    ok = opnas.check_path(FPath("Q", (("matmul", "K"), ("softmax", None), ("matmul", "V"))), space)
    assert ok.formula == "softmax(Q @ K^T) @ V"


def test_mutations_stay_in_the_space():
    space = opnas.Space(num_layers=2, primitives=("transpose", "softmax", "softsign", "add", "matmul"),
                        kernel_sizes=(3, 7), max_path=5, conv_prob=0.5)
    rng = random.Random(1)
    cand = opnas.sample_arch(rng, space)
    changed = 0
    for _ in range(40):
        child = opnas.mutate_arch(rng, cand, space)
        changed += child.arch != cand.arch
        for layer, gene in zip(child.arch.layers, child.genes):
            if layer.kind == "conv":
                assert layer.kernel_size in (3, 7) and gene is None
            else:
                assert set(gene.op_names) <= set(space.primitives)
                assert space.min_path <= len(gene.ops) <= 5
                assert attnc.analyze(to_text(gene)).canonical == layer.formula
        cand = child
    assert changed >= 30


def test_ucb_matches_hand_computation():
    # u_a = 0.5 + 0.5 sqrt(2 ln 3 / 2) = 1.0240735, u_b = 2 + 0.5 sqrt(2 ln 3) = 2.7411519,
    # c never sampled: mean of all (1.0) + 0.5 sqrt(2 ln 3 / 1) = 1.7411519; softmax of these:
    p = opnas.ucb([("a", 1.0), ("a", 0.0), ("b", 2.0)], ("a", "b", "c"), alpha=0.5)
    assert p["a"] == pytest.approx(0.1160540, abs=1e-7)
    assert p["b"] == pytest.approx(0.6462163, abs=1e-7)
    assert p["c"] == pytest.approx(0.2377297, abs=1e-7)
    assert opnas.ucb([], ("a", "b"), 1.0) == {"a": 0.5, "b": 0.5}


def test_priorities_per_path_position():
    space = opnas.Space(num_layers=1, primitives=("softmax", "matmul"))
    def cand(ops, score):
        path = FPath("Q", tuple(ops))
        return opnas.Candidate(Architecture((LayerChoice("attention", formula=f"x{len(ops)}"),)), (path,)), score
    ev = [cand([("matmul", "K"), ("softmax", None)], 1.0), cand([("softmax", None)], 3.0)]
    pri = opnas.op_priorities(ev, space, alpha=0.0)   # alpha 0: u = mu exactly
    assert len(pri) == 2
    # position 0: softmax mu 3, matmul mu 1 -> softmax(3, 1)
    assert pri[0]["softmax"] == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(1)))
    # position 1: one sample (softmax, 1.0); matmul unseen -> mean of all = 1.0: uniform
    assert pri[1]["softmax"] == pytest.approx(0.5)


def test_kernel_priorities_per_layer_from_that_layers_convs():
    """Each layer's kernel sizes get their own Equation-3 distribution, from the conv layers evaluated
    at that position only (an attention layer there contributes nothing)."""
    space = opnas.Space(num_layers=2, kernel_sizes=(3, 7, 15))
    att = LayerChoice.attention("softmax(Q @ K^T / sqrt(d)) @ V")
    def cand(layers, score):
        return opnas.Candidate(Architecture(tuple(LayerChoice.conv(x) if isinstance(x, int) else att
                                                  for x in layers)), (None, None)), score
    ev = [cand([3, 15], 2.0), cand([3, "a"], 0.0), cand([7, 15], 1.0), cand(["a", 3], 5.0)]
    alpha = 0.5
    k0, k1 = opnas.kernel_priorities(ev, space, alpha)
    # layer 0: 3 -> (2, 0), 7 -> (1); N = 3; 15 unseen: mean of all = 1, N_i = 1
    b = lambda n_i: alpha * math.sqrt(2 * math.log(3) / n_i)
    u0 = {3: 1.0 + b(2), 7: 1.0 + b(1), 15: 1.0 + b(1)}
    z0 = sum(math.exp(v) for v in u0.values())
    for k, v in u0.items():
        assert k0[k] == pytest.approx(math.exp(v) / z0, abs=1e-12)
    # layer 1: 15 -> (2, 1), 3 -> (5); N = 3; 7 unseen: mean 8/3
    u1 = {15: 1.5 + b(2), 3: 5.0 + b(1), 7: 8 / 3 + b(1)}
    z1 = sum(math.exp(v) for v in u1.values())
    for k, v in u1.items():
        assert k1[k] == pytest.approx(math.exp(v) / z1, abs=1e-12)


def _calls_recorder(log):
    def f(arch):
        log.append(arch)
        return known_ops(arch)
    return f


def test_equivalent_formulas_evaluated_once(tmp_path):
    # a tiny space (chains only) makes many candidates equal (by rules or numerically)
    space = opnas.Space(num_layers=1, primitives=("transpose", "softmax", "matmul", "neg"), max_path=4,
                        conv_prob=0.0, min_inputs=2, max_inputs=2, branch_prob=0.0, node_operands=False)
    calls = []
    r = opnas.search(space, _calls_recorder(calls), budget=12, population=8, top_k=2, children=4, seed=2,
                     study=tmp_path / "s.db")
    assert len(calls) == 12 and len(r.evaluations) == 12
    assert r.duplicates > 0
    formulas = [a.layers[0].formula for a in calls]
    for i in range(len(formulas)):           # no two evaluated formulas are equivalent (compiler check)
        for j in range(i):
            assert not equivalent(attnc.analyze(formulas[i]), attnc.analyze(formulas[j])).equal, \
                (formulas[i], formulas[j])
    db = sqlite3.connect(tmp_path / "s.db")
    for (arch, dup_of, score) in db.execute(
            "SELECT arch, duplicate_of, score FROM candidates WHERE status='duplicate'"):
        twin_arch, twin_score = db.execute("SELECT arch, score FROM candidates WHERE id=?", (dup_of,)).fetchone()
        a, b = (attnc.analyze(json.loads(x)["layers"][0]["formula"]) for x in (arch, twin_arch))
        assert equivalent(a, b).equal
        assert score == twin_score


def test_failed_candidates_recorded_and_search_goes_on(tmp_path):
    space = opnas.Space(num_layers=2, kernel_sizes=(7, 65), conv_prob=0.4)
    r = opnas.search(space, fails_on_dist, budget=25, population=10, top_k=3, children=3, seed=3,
                     study=tmp_path / "s.db")
    db = sqlite3.connect(tmp_path / "s.db")
    failed = db.execute("SELECT arch, error FROM candidates WHERE status='failed'").fetchall()
    assert len(failed) == r.failed > 0
    assert len(r.evaluations) + r.failed == 25        # budget: finished evaluations, met exactly
    for arch, error in failed:
        # the first layer that fails decides: a formula with dist raises, a kernel of 65 gives NaN
        first = next(x for x in json.loads(arch)["layers"]
                     if "dist(" in (x.get("formula") or "") or x.get("kernel_size") == 65)
        assert ("synthetic failure: dist" in error) if first["kind"] == "attention" else ("not finite" in error)
    for e in r.evaluations:   # successful ones have neither
        assert math.isfinite(e.score) and e.score == known_ops(e.architecture)


def test_opnas_beats_random_search_on_known_good_ops():
    def best(alg, seed):
        return opnas.search(opnas.Space(num_layers=2), known_ops, algorithm=alg, budget=60, population=12,
                            top_k=4, children=3, seed=seed).best_score
    seeds = range(5)
    op = sum(best("opnas", s) for s in seeds) / 5
    rs = sum(best("random", s) for s in seeds) / 5
    assert op > rs + 0.1, (op, rs)


SCRIPT = textwrap.dedent("""
    import sys, time
    from attnc.search import opnas, EvalResult, Evaluator
    from attnc.search.synthetic import known_ops
    log = open(sys.argv[2], "a")

    def slow(arch, payload, seed):
        time.sleep(float(sys.argv[3]))
        log.write(arch.key() + "\\n"); log.flush()
        return EvalResult(score=known_ops(arch))

    class Shared(Evaluator):   # weight-sharing stand-in: its state is the list of commits
        weight_sharing = True
        def __init__(self): self.commits = []
        def runner(self): return slow
        def commit(self, arch, result): self.commits.append(arch.key())
        def state_dict(self): return {"commits": list(self.commits)}
        def load_state_dict(self, d): self.commits = list(d["commits"])

    opnas.search(opnas.Space(num_layers=2), Shared(), budget=24, population=8, top_k=3, children=3, seed=5,
                 study=sys.argv[1], checkpoint_every=1)
""")


def _done_rows(db_path):
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT id, arch_key, status, score FROM candidates WHERE status != 'pending' "
                      "ORDER BY id").fetchall()
    db.close()
    return rows


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ref_db, ref_log = tmp_path / "ref" / "study.db", tmp_path / "ref.log"
    subprocess.run([sys.executable, str(script), str(ref_db), str(ref_log), "0"], check=True, env=env)

    db, log = tmp_path / "killed" / "study.db", tmp_path / "killed.log"
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(log), "0.15"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:   # kill mid-run, after the first generation finished
        time.sleep(0.05)
        if db.exists() and log.exists() and len(log.read_text().split()) >= 11:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(log.read_text().split())
    assert 11 <= n_before < 24, "the kill did not land mid-run"
    subprocess.run([sys.executable, str(script), str(db), str(log), "0"], check=True, env=env)

    assert _done_rows(db) == _done_rows(ref_db)   # same candidates, same scores, same statuses
    keys = log.read_text().split()
    finished = [r for r in _done_rows(db) if r[2] == "done"]
    assert len(finished) == 24
    # against the uninterrupted run (which also re-scores elites and the final top): with a checkpoint
    # after every evaluation, at most the one evaluation running at the kill ran twice
    from collections import Counter
    extra = Counter(keys) - Counter(ref_log.read_text().split())
    assert sum(extra.values()) <= 1 and set(keys) == set(ref_log.read_text().split())
    assert {r[1] for r in finished} <= set(keys)
    # the latest checkpoint holds exactly the committed rows, in order; older state files are gone
    st = Study(db)
    ck = st.latest_checkpoint()
    st.close()
    conn = sqlite3.connect(db)
    order = [k for (k,) in conn.execute("SELECT arch_key FROM candidates WHERE status='done' ORDER BY finish_order")]
    conn.close()
    assert torch.load(db.parent / ck.file, weights_only=False)["commits"] == order
    assert sorted(p.name for p in (db.parent / "state").iterdir()) == [Path(ck.file).name]
    res = opnas.open_result(db)
    ref = opnas.open_result(ref_db)
    assert res.best_score == ref.best_score and res.best_architecture == ref.best_architecture


def test_resume_with_other_settings_is_a_config_error(tmp_path):
    opnas.search(opnas.Space(num_layers=1), known_ops, budget=3, population=3, study=tmp_path / "s.db")
    with pytest.raises(attnc.ConfigError, match="other settings"):
        opnas.search(opnas.Space(num_layers=2), known_ops, budget=3, population=3, study=tmp_path / "s.db")
    # a larger budget continues the same study
    r = opnas.search(opnas.Space(num_layers=1), known_ops, budget=6, population=3, study=tmp_path / "s.db")
    assert len(r.evaluations) + r.failed == 6


def test_bad_arguments_raise_config_errors():
    with pytest.raises(attnc.ConfigError):
        opnas.search(opnas.Space(), known_ops, algorithm="bogus")
    with pytest.raises(attnc.ConfigError):
        opnas.search(opnas.Space(), known_ops, budget=0)
    with pytest.raises(attnc.ConfigError):
        opnas.Space(primitives=("softmax",))


def test_numerically_equivalent_layers_share_the_fingerprint_key():
    space = opnas.Space(num_layers=2)
    conv = LayerChoice.conv(7)
    a = Architecture((LayerChoice.attention("softplus(Q @ K^T) @ V"), conv))
    b = Architecture((LayerChoice.attention("-logsigmoid(-(Q @ K^T)) @ V"), conv))
    c = Architecture((LayerChoice.attention("softplus(K @ Q^T) @ V"), conv))
    assert a.layers[0].formula != b.layers[0].formula and a.key() != b.key()   # the rules miss it
    assert equivalent(attnc.analyze(a.layers[0].formula), attnc.analyze(b.layers[0].formula)).how == "numerically"
    assert opnas.fingerprint_key(a, space) == opnas.fingerprint_key(b, space)
    assert opnas.fingerprint_key(a, space) != opnas.fingerprint_key(c, space)
    d = Architecture((LayerChoice.attention("softplus(Q @ K^T) @ V"), LayerChoice.conv(9)))
    assert opnas.fingerprint_key(a, space) != opnas.fingerprint_key(d, space)


@pytest.mark.parametrize("algorithm", ["ea", "random"])
def test_baselines_meet_the_budget_and_report_in_completion_order(tmp_path, algorithm):
    seen = []
    r = opnas.search(opnas.Space(num_layers=2), known_ops, algorithm=algorithm, budget=10, population=4,
                     top_k=2, children=2, seed=1, study=tmp_path / "s.db", callbacks=[seen.append])
    assert [e.id for e in seen] == [e.id for e in r.evaluations] and len(seen) == 10
    assert all(e.score == known_ops(e.architecture) for e in r.evaluations)
    gens = sqlite3.connect(tmp_path / "s.db").execute(
        "SELECT generation, parents FROM candidates ORDER BY id").fetchall()
    # random search never has parents; EA's children after generation 0 always do
    assert all((p == "[]") == (algorithm == "random" or g == 0) for g, p in gens)


def test_exhausted_space_stops_with_a_warning(tmp_path):
    # matmul only, paths of length 2, 2 inputs: few distinct formulas exist
    space = opnas.Space(num_layers=1, primitives=("matmul",), min_path=2, max_path=2, conv_prob=0.0,
                        max_inputs=2)
    with pytest.warns(UserWarning, match="stopped early"):
        r = opnas.search(space, known_ops, budget=50, population=5, study=tmp_path / "s.db")
    formulas = {e.architecture.layers[0].formula for e in r.evaluations}
    assert len(formulas) == len(r.evaluations) < 50


# ------------------------------------------------------------------------------------------------
# the paper's graph space: a binary op's operand may be any earlier node
# ------------------------------------------------------------------------------------------------

# AutoBERT-Zero's layers 2 and 12 as paths (node j = the output of op j - 1; node 0 the start input)
LAYER2 = FPath("K", (("add", "Q"), ("neg", None, 0), ("logsigmoid", None), ("neg", None), ("scale", None),
                     ("matmul", "Q"), ("transpose", None), ("softmax", None), ("matmul", 1)))
LAYER12 = FPath("K", (("scale", None), ("add", "V"), ("scale", None), ("matmul", "Q"), ("transpose", None),
                      ("softmax", None), ("matmul", "V")))
PAPER = {LAYER2: "softmax(Q @ log(1 + exp(K^T)) / sqrt(d)) @ (K + Q)",
         LAYER12: "softmax(Q @ (K / sqrt(d) + V)^T / sqrt(d)) @ V"}


def _one_hot(path: FPath) -> opnas.Priorities:
    """Priorities that put all mass on the path's own op, operand category and start input."""
    from attnc.search.paths import operand_category
    return opnas.Priorities(ops=tuple({o[0]: 1.0} for o in path.ops),
                            operands=tuple({operand_category(o[1]): 1.0} if o[1] is not None else None
                                           for o in path.ops),
                            start={path.start: 1.0})


def _is_paper(layer, path) -> bool:
    return layer is not None and equivalent(attnc.analyze(layer.formula), attnc.analyze(PAPER[path])).equal


@pytest.mark.parametrize("path", [LAYER2, LAYER12], ids=["layer2", "layer12"])
def test_the_papers_layers_are_in_the_space_and_sampled(path):
    """Both paper formulas are paths of the space (the compiler agrees they are the paper's), and the
    sampler draws them (priorities only fix each position's op and operand kind: the branching of
    layer 2's second op and its operand node are drawn at random)."""
    space = opnas.Space(num_layers=1, min_path=len(path.ops), max_path=len(path.ops))
    assert _is_paper(opnas.check_path(path, space), path)
    pri = _one_hot(path)
    assert any(_is_paper(opnas.sample_path(random.Random(seed), space, pri)[1], path) for seed in range(400))


@pytest.mark.parametrize("path, parent", [
    (LAYER2, FPath(LAYER2.start, (LAYER2.ops[0], ("neg", None)) + LAYER2.ops[2:])),   # op 1 reads node 1: rewire
    (LAYER12, FPath(LAYER12.start, LAYER12.ops[:2] + LAYER12.ops[3:])),               # a scale missing: insert
], ids=["layer2-rewire", "layer12-insert"])
def test_the_papers_layers_are_reached_by_one_mutation(path, parent):
    space = opnas.Space(num_layers=1)
    assert opnas.check_path(parent, space) is not None and not _is_paper(opnas.check_path(parent, space), path)
    pri = _one_hot(path)
    assert any(_is_paper(opnas.mutate_path(random.Random(seed), parent, space, pri)[1], path) for seed in range(300))


def test_illegal_graphs_are_rejected():
    space = opnas.Space()
    assert opnas.check_path(FPath("Q", (("matmul", "K"), ("add", 0))), space) is None      # n x n + n x d
    assert opnas.check_path(FPath("Q", (("neg", None), ("add", 0), ("add", "K"))), space) is None  # -Q + Q: Q gone
    assert opnas.check_path(FPath("Q", (("neg", None), ("add", 3))), space) is None        # a node not made yet
    assert opnas.check_path(FPath("Q", (("neg", None), ("softsign", None, 2))), space) is None   # src not earlier
    # and a legal one that reuses a node: (Q + K) @ (Q + K)^T @ V
    ok = opnas.check_path(FPath("Q", (("add", "K"), ("matmul", 1), ("matmul", "V"))), space)
    assert equivalent(attnc.analyze(ok.formula), attnc.analyze("(Q + K) @ (Q + K)^T @ V")).equal


# ------------------------------------------------------------------------------------------------
# priorities that steer at real score magnitudes
# ------------------------------------------------------------------------------------------------

class _Row:
    def __init__(self, cid, gen, cand, score):
        self.id, self.generation, self.status, self.score = cid, gen, "done", score
        self.arch, self.genes, self.illegal = cand.arch, [g.to_json() for g in cand.genes], 0


@pytest.mark.parametrize("low, high", [(-6.6, -6.2), (0.5, 0.6)], ids=["mlm-loss", "accuracy"])
def test_priorities_concentrate_on_good_operations_at_real_score_scales(low, high):
    """Scores within [low, high] (minus MLM losses of 6.2-6.6 nats, or accuracies of 0.5-0.6), higher
    with every softsign in the path and when the path starts at P, plus a drift of the whole second
    generation (a supernet that aged). After z-scoring within generations the priorities put at least
    twice the mass on softsign than on any other op, and on P as the start; raw scores through the
    same Equation 3 (what the search did before) stay within 1.4x of uniform."""
    space = opnas.Space(num_layers=1, conv_prob=0.0)
    rng = random.Random(0)
    span = high - low
    rows = []
    for gen in range(3):
        for _ in range(80):
            cand = opnas.sample_arch(rng, space)
            g = cand.genes[0]
            good = sum(o[0] == "softsign" for o in g.ops[:3]) / 3 + 0.5 * (g.start == "P")   # 0 .. 1.5
            noise = rng.gauss(0, 0.05)
            score = low + span * (0.1 + 0.4 * good / 1.5 + noise) + 0.3 * span * gen
            rows.append(_Row(len(rows) + 1, gen, cand, score))
    pri = opnas.guide(rows, space, alpha=0.5, temperature=0.5)
    for p in range(3):   # positions every path has
        dist = pri.ops[p]
        others = max(v for k, v in dist.items() if k != "softsign")
        assert dist["softsign"] > 2 * others, (p, dist)
    assert max(pri.start, key=pri.start.get) == "P" and pri.start["P"] > 2 * max(
        v for k, v in pri.start.items() if k != "P")
    # the old way: raw scores in Equation 3
    raw = opnas.op_priorities([(opnas._candidate_of(r), r.score) for r in rows], space, 0.5)
    assert max(max(d.values()) / min(d.values()) for d in raw[:3]) < 1.4
    # and the generator follows: softsign makes a larger share of sampled ops than uniform sampling gives
    def share(pr):
        r = random.Random(1)
        ops = [o[0] for _ in range(150) for o in opnas.sample_path(r, space, pr)[0].ops[:3]]
        return ops.count("softsign") / len(ops)
    assert share(pri) > 2 * share(None)


def test_a_prepare_error_is_a_failed_row_and_the_search_goes_on(tmp_path):
    """An evaluator whose prepare raises for some architectures (e.g. a supernet too small for them):
    those candidates are failed rows with the error, none is left running, the budget is met."""
    from attnc.search import EvalResult, Evaluator
    from attnc.search.synthetic import known_ops

    class PickyPrepare(Evaluator):
        def prepare(self, arch):
            if any(c.kind == "conv" and c.kernel_size == 65 for c in arch.layers):
                raise ValueError("no kernel of 65 here")
            return None

        def runner(self):
            return lambda arch, payload, seed: EvalResult(score=known_ops(arch))

    space = opnas.Space(num_layers=2, kernel_sizes=(7, 65), conv_prob=0.5)
    r = opnas.search(space, PickyPrepare(), budget=12, population=6, top_k=2, children=3, seed=0,
                     study=tmp_path / "s.db")
    db = sqlite3.connect(tmp_path / "s.db")
    rows = db.execute("SELECT arch, status, error FROM candidates WHERE status IN ('done', 'failed', 'running')").fetchall()
    db.close()
    has65 = [any(x.get("kernel_size") == 65 for x in json.loads(a)["layers"]) for a, _, _ in rows]
    assert any(has65) and len(rows) == 12 and r.failed == sum(has65)
    for h, (_, status, error) in zip(has65, rows):
        assert (status, h) in (("failed", True), ("done", False))
        assert (error == "prepare: ValueError: no kernel of 65 here") if h else error is None


def test_large_search_seeds_train(tmp_path):
    # a generation's training seed grows with the search seed (seed x 1,000,003 + ...): seed 9 gives
    # keys past NumPy's 2**32 limit for the batch order, which once failed every evaluation
    from attnc.runtime.demo import demo_tokenizer
    from attnc.search.proxy import ProxyConfig, ProxyEvaluator

    ev = ProxyEvaluator(ProxyConfig(task=None, tokenizer=str(demo_tokenizer(2000)), weight_sharing=False,
                                    pretrain_steps=2, batch_size=4, seq_len=32, eval_blocks=8, device="cpu"))
    space = opnas.Space(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4)
    res = opnas.search(space, evaluate=ev, budget=4, population=2, top_k=1, children=2, seed=9,
                       study=tmp_path / "s.db")
    assert res.failed == 0 and len(res.evaluations) == 4


def _always_fails(arch):
    raise RuntimeError("no GPU in this box")


def test_a_search_whose_evaluator_always_fails_stops_after_one_generation(tmp_path):
    with pytest.raises(attnc.EvaluationError, match="no GPU in this box") as e:
        opnas.search(opnas.Space(num_layers=1), _always_fails, budget=40, population=6, top_k=2, children=2,
                     study=tmp_path / "s.db")
    assert "start a new study" in str(e.value)
    db = sqlite3.connect(tmp_path / "s.db")
    # stopped once a population's worth (6) failed: within two generations, far from the budget of 40
    failed, last_gen = db.execute("SELECT COUNT(*), MAX(generation) FROM candidates WHERE status = 'failed'").fetchone()
    assert 6 <= failed < 12 and last_gen <= 1
    assert db.execute("SELECT COUNT(*) FROM candidates WHERE status NOT IN ('failed', 'duplicate')").fetchone()[0] == 0
    # a budget smaller than a population stops at the budget's end with its failures, as before
    r = opnas.search(opnas.Space(num_layers=1), _always_fails, budget=3, population=6, study=tmp_path / "t.db")
    assert r.failed == 3 and r.best_architecture is None
    # one that fails on some candidates only goes on (test_failed_candidates_recorded_and_search_goes_on)


def test_a_supernet_warmup_whose_children_all_fail_stops_before_the_search(tmp_path):
    from attnc.search.evaluator import EvalResult, Evaluator

    class BrokenWarmup(Evaluator):
        weight_sharing, warmup_children = True, 40

        def __init__(self, broken):
            self.broken, self.calls = broken, 0

        def warmup_runner(self):
            def run(arch, payload, seed):
                self.calls += 1
                if self.broken(self.calls):
                    raise RuntimeError("CUDA out of memory in the warm-up")
                return EvalResult(score=known_ops(arch))
            return run

        def runner(self):
            return lambda arch, payload, seed: EvalResult(score=known_ops(arch))

    ev = BrokenWarmup(lambda call: True)
    with pytest.raises(attnc.EvaluationError, match="warm-up children .* all failed.*CUDA out of memory") as e:
        opnas.search(opnas.Space(num_layers=1), ev, budget=20, population=6, top_k=2, children=2,
                     study=tmp_path / "s.db")
    assert "start a new study" in str(e.value)
    assert ev.calls == 6          # a population's worth, not the 40 warm-up children and then the budget
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT COUNT(*) FROM candidates WHERE status IN ('done', 'failed')").fetchone()[0] == 0
    # a warm-up with some children that fail goes on, and the search ends with its budget
    ev = BrokenWarmup(lambda call: call % 3 == 1)
    r = opnas.search(opnas.Space(num_layers=1), ev, budget=8, population=4, top_k=2, children=2,
                     study=tmp_path / "t.db")
    assert ev.calls == 40 and len(r.evaluations) == 8 and r.failed == 0


def test_a_generation_trains_with_one_seed_and_finalists_share_theirs(tmp_path):
    from attnc.search.evaluator import EvalResult, Evaluator

    class Recorder(Evaluator):   # weight sharing, so parents are re-scored each generation
        weight_sharing = True

        def __init__(self):
            self.begun, self.block, self.calls = 0, 0, []   # block: k inside generation k, -k after it

        def begin_generation(self):
            self.begun += 1
            self.block = self.begun

        def end_generation(self):
            self.block = -self.begun           # after the last generation: the final re-scores

        def runner(self):
            def run(arch, payload, seed):
                self.calls.append((self.block, arch.key(), seed))
                return EvalResult(score=known_ops(arch))
            return run

    ev = Recorder()
    opnas.search(opnas.Space(num_layers=2), ev, budget=30, population=10, top_k=3, children=3, seed=11,
                 rescore_top=3, rescore_seeds=2, study=tmp_path / "s.db")
    inside = {}
    for block, _, seed in ev.calls:
        if block > 0:
            inside.setdefault(block, set()).add(seed)
    assert len(inside) >= 3 and all(len(s) == 1 for s in inside.values())     # one seed per generation
    assert len({next(iter(s)) for s in inside.values()}) == len(inside)        # a new one each generation
    parents_rescored = [b for b in inside if sum(c[0] == b for c in ev.calls) > 9]
    assert parents_rescored                    # children (9) + re-scored parents in one generation
    final = [(key, seed) for block, key, seed in ev.calls if block < 0]
    assert len(final) == 6 and len({k for k, _ in final}) == 3
    by_seed = {}
    for key, seed in final:
        by_seed.setdefault(seed, set()).add(key)
    assert len(by_seed) == 2 and all(len(keys) == 3 for keys in by_seed.values())  # re-score j: one seed for all


def test_a_study_made_before_generation_seeds_resumes_with_a_warning(tmp_path):
    db_path = tmp_path / "s.db"
    opnas.search(opnas.Space(num_layers=1), known_ops, budget=3, population=3, study=db_path)
    db = sqlite3.connect(db_path)
    with db:
        db.execute("DELETE FROM meta WHERE key = 'seeding'")     # as studies made before it were
    db.close()
    with pytest.warns(UserWarning, match="one seed per generation"):
        r = opnas.search(opnas.Space(num_layers=1), known_ops, budget=6, population=3, study=db_path)
    assert len(r.evaluations) + r.failed == 6


def test_one_study_is_searched_by_one_process_at_a_time(tmp_path):
    db_path = tmp_path / "s.db"
    opnas.search(opnas.Space(num_layers=1), known_ops, budget=3, population=3, study=db_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(db_path) + ".lock"!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(attnc.ConfigError, match="being searched by another process"):
            opnas.search(opnas.Space(num_layers=1), known_ops, budget=6, population=3, study=db_path)
    finally:
        holder.kill()
        holder.wait()
    r = opnas.search(opnas.Space(num_layers=1), known_ops, budget=6, population=3, study=db_path)   # free again
    assert len(r.evaluations) + r.failed == 6
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT COUNT(*) FROM candidates WHERE status = 'done'").fetchone()[0] + r.failed == 6
