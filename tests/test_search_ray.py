"""A search on a local 2-worker Ray gives the same study as the in-process search."""
from __future__ import annotations

import os
import sqlite3

import ray   # the distributed extra; scripts/setup.sh installs it so this test runs in CI

from attnc.search import opnas
from attnc.search.synthetic import fails_on_dist, fails_on_dist_pid, known_ops_pid


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
    remote = opnas.search(space, fails_on_dist_pid, study=tmp_path / "ray.db", ray=2, **kw)  # starts Ray
    assert not ray.is_initialized()   # and shuts it down again
    pids = {e.metrics["pid"] for e in remote.evaluations}
    assert pids and os.getpid() not in pids                    # evaluated in Ray's worker processes
    assert _rows(tmp_path / "ray.db") == _rows(tmp_path / "local.db")
    assert remote.best_score == local.best_score and remote.best_architecture == local.best_architecture
    assert sorted((e.id, e.score) for e in remote.evaluations) == sorted((e.id, e.score) for e in local.evaluations)


def test_ray_evaluations_run_in_worker_processes(tmp_path):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:   # an already running Ray is joined and left running
        r = opnas.search(opnas.Space(num_layers=1), known_ops_pid, budget=6, population=6, seed=0,
                         study=tmp_path / "s.db", ray=2)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    pids = {e.metrics["pid"] for e in r.evaluations}
    assert os.getpid() not in pids and len(r.evaluations) == 6


def test_ray_weight_sharing_one_in_flight_equals_in_process(tmp_path):
    """Under weight sharing the driver owns the shared state: each task is prepared when it is sent
    and written back when it completes. With one task in flight the Ray search is the in-process
    one: same rows and scores (which depend on the shared state each child started from) and the
    same final shared state."""
    from attnc.search.synthetic import SharedCounters

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    space = opnas.Space(num_layers=2, kernel_sizes=(7, 65))
    kw = dict(budget=10, population=5, top_k=2, children=3, seed=4)
    local_ev, ray_ev = SharedCounters(2), SharedCounters(2)
    opnas.search(space, local_ev, study=tmp_path / "local.db", **kw)
    opnas.search(space, ray_ev, study=tmp_path / "ray.db", ray=2, ray_in_flight=1, **kw)
    assert _rows(tmp_path / "ray.db") == _rows(tmp_path / "local.db")
    assert ray_ev.values == local_ev.values and local_ev.values != [0.0, 0.0]
    # the reference: replaying the in-process order by hand gives the same scores
    db = sqlite3.connect(tmp_path / "local.db")
    done = db.execute("SELECT arch, seed, score FROM candidates WHERE status='done' ORDER BY finish_order").fetchall()
    db.close()
    import json
    from attnc.search.space import Architecture
    from attnc.search.synthetic import known_ops, shared_counters_run
    values = [0.0, 0.0]
    for arch_json, seed, score in done:
        arch = Architecture.from_json(json.loads(arch_json))
        assert score == known_ops(arch) + 0.01 * sum(values)
        values = shared_counters_run(arch, values, seed).weights
    assert values == local_ev.values


def test_ray_weight_sharing_two_in_flight_writes_back_in_completion_order(tmp_path):
    """Two tasks in flight: which state each child starts from depends on timing, but whatever the
    timing, (a) every child started from a state the driver had committed before it finished (the
    start or an earlier child's trained weights), (b) the write-backs are applied in completion
    order: the final shared state is the last finished child's trained weights, and (c) the
    budget is met exactly."""
    import json

    from attnc.search.space import Architecture
    from attnc.search.synthetic import SharedCounters, known_ops, shared_counters_run

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    space = opnas.Space(num_layers=2, kernel_sizes=(7, 65))
    ev = SharedCounters(2)
    opnas.search(space, ev, study=tmp_path / "ray.db", ray=2, ray_in_flight=2, budget=10, population=5,
                 top_k=2, children=3, seed=4)
    db = sqlite3.connect(tmp_path / "ray.db")
    done = db.execute("SELECT arch, seed, score, metrics FROM candidates WHERE status='done' "
                      "ORDER BY finish_order").fetchall()
    db.close()
    assert len(done) == 10
    states = [[0.0, 0.0]]
    for arch_json, seed, score, metrics in done:
        arch = Architecture.from_json(json.loads(arch_json))
        start = json.loads(metrics)["start"]
        assert start in states                                   # (a)
        assert score == known_ops(arch) + 0.01 * sum(start)
        states.append(shared_counters_run(arch, start, seed).weights)
    assert ev.values == states[-1]                               # (b)


def test_ray_tasks_ask_for_gpus_when_the_proxy_trains_on_cuda(tmp_path, monkeypatch):
    """The remote function a search sends its tasks with carries num_gpus: 1 by default when the
    evaluator trains on CUDA, the --ray-gpus-per-task value when given, 0 on the CPU. (Run here on
    a CPU-only Ray, so the tasks themselves go through a 0-GPU copy of the same function.)"""
    from attnc.search.synthetic import SharedCounters

    assert opnas.remote_task(1)._default_options["num_gpus"] == 1        # what Ray schedules by
    assert opnas.remote_task(0.5)._default_options["num_gpus"] == 0.5
    asked = []
    real = opnas.remote_task

    def recording(gpus):
        asked.append(real(gpus)._default_options["num_gpus"])
        return real(0)
    monkeypatch.setattr(opnas, "remote_task", recording)

    class OnCuda(SharedCounters):
        device = "cuda"

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        space = opnas.Space(num_layers=2, kernel_sizes=(7, 65))
        kw = dict(budget=3, population=3, seed=0, rescore_top=0, ray=2)
        opnas.search(space, OnCuda(2), study=tmp_path / "a.db", **kw)
        opnas.search(space, OnCuda(2), study=tmp_path / "b.db", ray_gpus_per_task=0.25, **kw)
        opnas.search(space, SharedCounters(2), study=tmp_path / "c.db", **kw)
    finally:
        ray.shutdown()
    assert set(asked[:1]) == {1} and 0.25 in asked and asked[-1] == 0
    assert opnas.default_gpus_per_task("cuda:1") == 1 and opnas.default_gpus_per_task("cpu") == 0
    assert opnas.default_gpus_per_task("auto", cluster_gpus=4) == 1
    assert opnas.default_gpus_per_task("auto", cluster_gpus=0) == 0
