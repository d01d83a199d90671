"""Kill-and-resume: a CLI run killed with SIGKILL and resumed gives bit-identical losses (and weights)
to an uninterrupted run, for both `attnc pretrain` and `attnc finetune` (CPU, one thread)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import runtime_helpers  # noqa: F401  (offline env + shared data cache, inherited by the subprocesses)

STEPS = 150
SAVE_EVERY = 5


def _cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "attnc", *args, "--threads", "1", "--no-progress",
                             "--save-every", str(SAVE_EVERY), "--seed", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _finish(p: subprocess.Popen) -> None:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-3000:]


def _kill_after_checkpoint(p: subprocess.Popen, ck_root: Path, step: int) -> None:
    """SIGKILL the run as soon as checkpoint `step` is complete; the run must still be going."""
    target = ck_root / f"step-{step:06d}" / "trainer_state.pt"
    deadline = time.time() + 240
    while not target.is_file():
        assert p.poll() is None, "the run ended before it was killed: " + p.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before the kill: make it longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


def _run_pair(args_for, out_a: Path, out_b: Path, ck_b: Path) -> None:
    a = _cli(args_for(out_a))                 # uninterrupted reference, concurrently with the victim
    b = _cli(args_for(out_b))
    _kill_after_checkpoint(b, ck_b, 2 * SAVE_EVERY)
    _finish(_cli(args_for(out_b) + ["--resume"]))
    _finish(a)


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k


@pytest.mark.slow
def test_pretrain_killed_and_resumed_is_bit_identical(tmp_path):
    def args(out):
        return ["pretrain", "--model", "2-32-64-2-32", "--corpus", "wiki-sample", "--steps", str(STEPS),
                "--batch-size", "8", "--seq-len", "16", "--lr", "2e-3", "--out", str(out)]

    a, b = tmp_path / "a", tmp_path / "b"
    _run_pair(args, a, b, b / "checkpoints")
    la = json.loads((a / "attnc_pretrain_log.json").read_text())
    lb = json.loads((b / "attnc_pretrain_log.json").read_text())
    sb = json.loads((b / "attnc_pretrain.json").read_text())
    assert 2 * SAVE_EVERY <= sb["resumed_from"] < STEPS
    assert len(la) == STEPS and la == lb            # exact float equality, every step
    sa = json.loads((a / "attnc_pretrain.json").read_text())
    assert sa["eval_loss_after"] == sb["eval_loss_after"]
    _same_weights(a, b)


@pytest.mark.slow
def test_finetune_killed_and_resumed_is_bit_identical(tmp_path):
    import torch
    from attnc.runtime import AttncBertForMaskedLM, resolve_config
    from attnc.runtime import data as D

    tok = D.load_tokenizer()
    torch.manual_seed(0)
    model = AttncBertForMaskedLM(resolve_config("2-32-64-2-32", vocab_size=len(tok)))
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)

    def args(out):
        return ["finetune", str(base), "--task", "rt-polarity", "--steps", str(STEPS), "--batch-size", "8",
                "--max-train", "2000", "--max-eval", "64", "--max-length", "24", "--lr", "1e-3",
                "--out", str(out)]

    a, b = tmp_path / "a", tmp_path / "b"
    _run_pair(args, a, b, b / "checkpoints")
    la = json.loads((a / "finetune_log.json").read_text())
    lb = json.loads((b / "finetune_log.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert 2 * SAVE_EVERY <= mb["resumed_from"] < STEPS
    assert len(la) == STEPS and la == lb
    assert json.loads((a / "metrics.json").read_text())["dev"] == mb["dev"]
    _same_weights(a, b)
