"""A search on a local 2-worker Ray gives the same study as the in-process search."""
from __future__ import annotations

import os
import sqlite3

import ray   # the distributed extra; scripts/setup.sh installs it so this test runs in CI

from attnc.search import opnas
from attnc.search.synthetic import fails_on_dist, known_ops_pid


def _rows(path):
    db = sqlite3.connect(path)
    out = db.execute("SELECT id, generation, arch_key, parents, status, score, duplicate_of, error "
                     "FROM candidates ORDER BY id").fetchall()
    db.close()
    return out


def test_ray_two_workers_same_results_as_in_process(tmp_path):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    space = opnas.Space(num_layers=2, kernel_sizes=(7, 65))
    kw = dict(budget=16, population=6, top_k=2, children=3, seed=2)
    local = opnas.search(space, fails_on_dist, study=tmp_path / "local.db", **kw)
    remote = opnas.search(space, fails_on_dist, study=tmp_path / "ray.db", ray=2, **kw)  # starts Ray
    assert not ray.is_initialized()   # and shuts it down again
    assert _rows(tmp_path / "ray.db") == _rows(tmp_path / "local.db")
    assert remote.best_score == local.best_score and remote.best_architecture == local.best_architecture
    assert sorted((e.id, e.score) for e in remote.evaluations) == sorted((e.id, e.score) for e in local.evaluations)


def test_ray_evaluations_run_in_worker_processes(tmp_path):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:   # an already running Ray is joined and left running
        r = opnas.search(opnas.Space(num_layers=1), known_ops_pid, budget=6, population=6, seed=0,
                         study=tmp_path / "s.db", ray=2)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    pids = {e.metrics["pid"] for e in r.evaluations}
    assert os.getpid() not in pids and len(r.evaluations) == 6
