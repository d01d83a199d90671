"""--target-se / ProxyConfig.target_se: the held-out size is chosen for a stated standard error, and
the standard error the proxy then measures (cluster_se over held-out blocks, the binomial SE of a dev
accuracy) is the one asked for."""
from __future__ import annotations

import math

import pytest
import torch

import runtime_helpers  # noqa: F401  (offline hub, shared data cache)
from attnc.cli import main
from attnc.compiler.errors import ConfigError
from attnc.search.space import Architecture, LayerChoice

ARCH = Architecture((LayerChoice.attention("softmax(Q @ K^T / sqrt(d)) @ V"), LayerChoice.conv(7)),
                    hidden_size=32, intermediate_size=64, num_heads=4)


def _score(target, **kw):
    from attnc.runtime.demo import demo_tokenizer
    from attnc.search.proxy import ProxyConfig, ProxyEvaluator

    ev = ProxyEvaluator(ProxyConfig(weight_sharing=False, tokenizer=str(demo_tokenizer(2000)), seq_len=32,
                                    batch_size=8, lr=3e-3, device="cpu", target_se=target, **kw))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ev, ev.runner()(ARCH, None, 3)
    finally:
        torch.set_num_threads(threads)


def test_mlm_held_out_size_gives_the_standard_error_asked_for():
    got = {}
    for target in (0.1, 0.05):
        ev, res = _score(target, task=None, pretrain_steps=150)   # past the unigram stage (see the pilot)
        assert f"standard error of {target:g}" in ev.noise_plan
        got[target] = (ev.config.eval_blocks, res.metrics["score_se"])
        # the proxy's own measurement (cluster_se of the trained model's losses), not the pilot's
        assert 0.7 * target <= res.metrics["score_se"] <= 1.3 * target, (target, got[target])
    assert got[0.05][0] > 3 * got[0.1][0]          # a quarter of the variance takes ~4x the blocks


def test_task_dev_size_gives_the_standard_error_asked_for():
    ev, res = _score(0.05, task="rt-polarity", pretrain_steps=2, finetune_steps=2, max_train=64,
                     finetune_max_len=32)
    acc, n = res.metrics["dev_accuracy"], res.metrics["dev_examples"]     # what was really scored
    assert n == ev.config.max_eval
    assert res.metrics["score_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / n))
    assert res.metrics["score_se"] <= 0.05 <= math.sqrt(0.25 / (n - 1))   # the fewest examples that make it


def test_bad_target_se():
    from attnc.search.proxy import ProxyConfig
    for bad in (0, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match="target_se"):
            ProxyConfig(target_se=bad)


def test_cli_reports_what_scores_were_measured_on(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "opnas", "--out", str(out), "--layers", "1", "--hidden", "32", "--ffn", "64",
                 "--budget", "2", "--population", "2", "--task", "mlm", "--shared-steps", "2",
                 "--target-se", "0.1", "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "held-out MLM blocks, chosen for a standard error of 0.1 (--target-se)" in text
    assert main(["search", "opnas", "--out", str(tmp_path / "bad"), "--target-se", "-1", "--task", "mlm"]) == 2
    assert "target_se" in capsys.readouterr().err
