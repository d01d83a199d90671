"""Batch-wise SuperPLM training (AutoTinyBERT Algorithm 1): the update against a hand-built one,
torchrun (2 CPU processes) against one process, SIGKILL + resume against an uninterrupted run,
padding, the distillation losses against an independent float64 computation, the CLI pieces."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from attnc.compiler.errors import ConfigError
from attnc.runtime import trainer as T
from attnc.runtime.trainer import MLMData
from attnc.search.tinybert.space import Arch, Space
from attnc.search.tinybert.supernet import SuperPLM
from attnc.search.tinybert import train as TT

VOCAB = 100


class Tok:
    """Enough of a tokenizer for MLMData: ids 0..4 are special ([PAD] 0, [MASK] 4)."""
    pad_token_id, mask_token_id, all_special_ids = 0, 4, [0, 1, 2, 3, 4]

    def __len__(self):
        return VOCAB


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and on a busy 2-core CI box extra threads
    only spin (seconds become minutes). The previous setting is restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_space(**kw) -> Space:
    base = dict(max_layers=3, max_hidden=32, max_ffn=64, max_heads=2, head_dim=8, vocab_size=VOCAB,
                min_hidden=8, min_ffn=8, max_position_embeddings=64)
    base.update(kw)
    return Space(**base)


def tiny_data(n: int = 64, seq: int = 16) -> MLMData:
    g = torch.Generator().manual_seed(0)
    return MLMData(torch.randint(5, VOCAB, (n, seq), generator=g), Tok())


class HalfUnmasked(MLMData):
    """MLMData whose batches have no masked token in their second half: with 2 sub-batches, the
    second sub-model pass of every step has nothing to learn from and is skipped."""

    def train_batch(self, m, batch_size, seed):
        b = super().train_batch(m, batch_size, seed)
        h = batch_size // 2
        lab = b["labels"][h:]
        b["input_ids"][h:] = torch.where(lab != -100, lab, b["input_ids"][h:])
        b["labels"][h:] = -100
        return b


def half_unmasked_data(n: int = 64, seq: int = 16) -> MLMData:
    g = torch.Generator().manual_seed(0)
    return HalfUnmasked(torch.randint(5, VOCAB, (n, seq), generator=g), Tok())


# the worker that the subprocess tests run (single process, under torchrun, or killed and resumed)
WORKER = textwrap.dedent('''
    import json, os, sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_tinybert_train import tiny_space, tiny_data, half_unmasked_data
    from attnc.search.tinybert.supernet import SuperPLM
    from attnc.search.tinybert.train import SuperTrainConfig, train_superplm
    torch.set_num_threads(1)
    out, N, M, steps, ckpt, resume, block_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1", int(sys.argv[7])
    odd = sys.argv[8] if len(sys.argv) > 8 else ""   # "odd": ranks seeded differently, half-unmasked data

    class Block:       # simulates a crash window: after step `block_at`, signal and hang
        def on_step(self, step, loss, state):
            if step == block_at:
                open(out + ".blocked", "w").close()
                time.sleep(120)

    torch.manual_seed(1 + (100 * int(os.environ.get("RANK", "0")) if odd else 0))
    net = SuperPLM(tiny_space())
    cfg = SuperTrainConfig(steps=steps, batch_size=8, sub_batches=N, samples=M, lr=3e-3, device="cpu",
                           checkpoint_dir=ckpt or None, checkpoint_every=2 if ckpt else None, resume=resume)
    data = half_unmasked_data() if odd else tiny_data()
    m = train_superplm(net, data, cfg, callbacks=[Block()] if block_at else ())
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(net.state_dict(), out)
        json.dump({{"archs": m["archs"], "losses": m["losses"], "world_size": m["world_size"],
                   "resumed_from": m["resumed_from"]}}, open(out + ".json", "w"))
''')


@pytest.fixture()
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def _run(args, timeout=120):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _in_process(N: int, M: int, steps: int, data=None) -> tuple[dict, dict]:
    """What the worker computes without a checkpoint folder, in this process on one thread."""
    torch.manual_seed(1)      # one thread: the one_thread fixture
    net = SuperPLM(tiny_space())
    m = TT.train_superplm(net, data if data is not None else tiny_data(), TT.SuperTrainConfig(
        steps=steps, batch_size=8, sub_batches=N, samples=M, lr=3e-3, device="cpu"))
    return net.state_dict(), m


def _assert_same_params(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


# ------------------------------------------------------------------------------------------------
# Algorithm 1: one update from the mean loss of the N*M sampled sub-models
# ------------------------------------------------------------------------------------------------


def test_one_step_equals_hand_built_update():
    """N=2 sub-batches x M=2 samples, SGD: the update is -lr * grad(mean of the 4 pass losses),
    each pass on its own sub-batch with its own sampled arch; untouched weights stay put."""
    space = tiny_space()
    torch.manual_seed(3)
    net = SuperPLM(space, config_overrides=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ref = SuperPLM(space, config_overrides=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ref.load_state_dict(net.state_dict())
    data = tiny_data()
    cfg = TT.SuperTrainConfig(steps=1, batch_size=8, sub_batches=2, samples=2, lr=0.1, warmup=0.0,
                              weight_decay=0.0, max_grad_norm=None, optimizer="sgd", device="cpu", seed=5)
    m = TT.train_superplm(net, data, cfg)

    data.split(5)
    b = data.train_batch(0, 8, 5)
    archs = [TT.sample_arch(space, 5, 0, g, j) for g in range(2) for j in range(2)]
    assert m["archs"] == [[str(a) for a in archs]]
    assert len(set(archs)) > 1            # sub-batches / samples draw different sub-models
    losses = []
    for i, arch in enumerate(archs):
        g = i // 2
        ref.set_arch(arch)
        sl = slice(4 * g, 4 * g + 4)
        losses.append(ref.mlm_loss(b["input_ids"][sl], b["attention_mask"][sl], b["labels"][sl]))
    total = torch.stack(losses).mean()
    total.backward()
    assert math.isclose(m["losses"][0], float(total.detach()), rel_tol=1e-6)
    _assert_sgd_step(net, ref, 0.1)


def _assert_sgd_step(net, ref, lr: float) -> None:
    """net's weights are ref's after one plain SGD step on ref's gradients (weights without a
    gradient unchanged), and some weight moved."""
    after = net.state_dict()
    moved = 0
    for name, p in ref.named_parameters():
        want = p.detach() - lr * p.grad if p.grad is not None else p.detach()
        assert torch.allclose(after[name], want, atol=1e-6), name
        moved += p.grad is not None and bool((p.grad != 0).any())
    assert moved > 0


def test_one_submodel_per_batch_samples_one_arch_per_step():
    net = SuperPLM(tiny_space())
    m = TT.train_superplm(net, tiny_data(), TT.SuperTrainConfig(steps=3, batch_size=4, sub_batches=1,
                                                                device="cpu"))
    assert [len(a) for a in m["archs"]] == [1, 1, 1]
    assert net.arch == net.space.max_arch        # the caller's active arch is restored


# ------------------------------------------------------------------------------------------------
# torch.distributed: 2 CPU processes under torchrun == 1 process with the same sub-batches
# ------------------------------------------------------------------------------------------------


def test_torchrun_two_processes_equal_one_process(worker, tmp_path):
    dist_out = tmp_path / "dist.pt"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
          str(worker), str(dist_out), "2", "2", "4", "", "0", "0"])
    s, sm = _in_process(2, 2, 4)
    d = torch.load(dist_out)
    _assert_same_params(d, s, atol=1e-6)
    dm = json.loads((tmp_path / "dist.pt.json").read_text())
    assert (dm["world_size"], sm["world_size"]) == (2, 1)
    assert dm["archs"] == sm["archs"]
    # rank 1's sub-batch (the last two archs of a step) is trained with other sub-models than rank 0's
    assert any(set(a[:2]) != set(a[2:]) for a in dm["archs"])
    torch.manual_seed(1)
    init = SuperPLM(tiny_space()).state_dict()
    assert any(not torch.equal(init[k], d[k]) for k in d)


def test_torchrun_ranks_seeded_differently_train_rank_0s_model(worker, tmp_path):
    """Each rank builds its SuperPLM from its own seed (1 and 101): rank 0's weights are broadcast
    at the start, so the run equals one process from seed 1. The data leaves rank 1's sub-batch
    without a masked token at every step: only rank 0's pass counts in the mean (the divisor is
    the passes that ran on all ranks)."""
    dist_out = tmp_path / "dist.pt"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
          str(worker), str(dist_out), "2", "1", "3", "", "0", "0", "odd"])
    s, sm = _in_process(2, 1, 3, half_unmasked_data())
    d = torch.load(dist_out)
    _assert_same_params(d, s, atol=1e-6)
    dm = json.loads((tmp_path / "dist.pt.json").read_text())
    assert dm["losses"] == pytest.approx(sm["losses"], rel=1e-6)
    torch.manual_seed(101)
    other = SuperPLM(tiny_space()).state_dict()
    assert all(not torch.equal(other[k], s[k]) for k in s if k.endswith(".weight") and "LayerNorm" not in k)


def test_the_gradient_divisor_counts_only_the_passes_that_ran():
    """N=2 sub-batches, the second without a masked token (its pass is skipped), SGD, no clipping:
    the update is -lr x the gradient of the one pass that ran (not half of it)."""
    space = tiny_space()
    torch.manual_seed(3)
    off = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    net, ref = SuperPLM(space, config_overrides=off), SuperPLM(space, config_overrides=off)
    ref.load_state_dict(net.state_dict())
    data = half_unmasked_data()
    cfg = TT.SuperTrainConfig(steps=1, batch_size=8, sub_batches=2, lr=0.1, warmup=0.0, weight_decay=0.0,
                              max_grad_norm=None, optimizer="sgd", device="cpu", seed=5)
    m = TT.train_superplm(net, data, cfg)
    data.split(5)
    b = data.train_batch(0, 8, 5)
    assert bool((b["labels"][:4] != -100).any()) and not bool((b["labels"][4:] != -100).any())
    ref.set_arch(TT.sample_arch(space, 5, 0, 0, 0))
    loss = ref.mlm_loss(b["input_ids"][:4], b["attention_mask"][:4], b["labels"][:4])
    loss.backward()
    assert math.isclose(m["losses"][0], float(loss.detach()), rel_tol=1e-6)
    _assert_sgd_step(net, ref, 0.1)


# ------------------------------------------------------------------------------------------------
# SIGKILL mid-run, resume == uninterrupted
# ------------------------------------------------------------------------------------------------


def test_resume_after_sigkill_matches_uninterrupted(worker, tmp_path):
    killed = tmp_path / "killed.pt"
    ckpt = tmp_path / "ckpt"
    args = [str(worker), str(killed), "2", "1", "8", str(ckpt), "0", "5"]
    p = subprocess.Popen([sys.executable, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "killed.pt.blocked").exists():
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not killed.exists()
    assert sorted(x.name for x in ckpt.iterdir() if not x.name.startswith(".")) == ["step-000002", "step-000004"]
    _run([sys.executable, str(worker), str(killed), "2", "1", "8", str(ckpt), "1", "0"])
    full_state, fm = _in_process(2, 1, 8)
    km = json.loads((tmp_path / "killed.pt.json").read_text())
    assert km["resumed_from"] == 4 and fm["resumed_from"] is None
    assert km["losses"] == fm["losses"] and km["archs"] == fm["archs"]
    _assert_same_params(torch.load(killed), full_state, atol=0.0)


def test_resume_refuses_other_settings(tmp_path):
    data = tiny_data()
    cfg = TT.SuperTrainConfig(steps=2, batch_size=4, sub_batches=2, device="cpu",
                              checkpoint_dir=str(tmp_path), checkpoint_every=1)
    TT.train_superplm(SuperPLM(tiny_space()), data, cfg)
    other = TT.SuperTrainConfig(steps=2, batch_size=4, sub_batches=4, device="cpu",
                                checkpoint_dir=str(tmp_path), resume=True)
    with pytest.raises(ConfigError, match="sub_batches"):
        TT.train_superplm(SuperPLM(tiny_space()), data, other)


# ------------------------------------------------------------------------------------------------
# the attention mask goes in the attention-mask slot: padding changes nothing for real tokens
# ------------------------------------------------------------------------------------------------


def _tiny_teacher(heads: int = 2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(11)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=48, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(cfg).eval()


def _padded_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 2], labels[1, 5] = 17, 23, 42
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("objective", ["mlm", "kd"])
def test_padding_changes_nothing_for_real_tokens(objective):
    space = tiny_space(mode="kd") if objective == "kd" else tiny_space()
    torch.manual_seed(4)
    # large init weights: attention far from uniform, so padded tokens would matter if unmasked
    net = SuperPLM(space, config_overrides=dict(initializer_range=0.5)).eval()
    net.set_arch(Arch(2, 16, 32, 2, 8) if objective == "kd" else Arch(2, 16, 32, 1, 8))
    distiller = TT._SuperDistiller(_tiny_teacher(), space, TT.KD_DEFAULT) if objective == "kd" else None

    def loss(b):
        targets = distiller.teacher_targets(T.unmasked(b)) if distiller is not None else None
        return TT._pass_loss(net, b, objective, distiller, TT.KD_DEFAULT, targets)

    b = _padded_batch()
    other = dict(b, input_ids=b["input_ids"].clone())
    other["input_ids"][1, 7:] = torch.arange(50, 55)          # different tokens in the padding
    assert torch.allclose(loss(b), loss(other), rtol=1e-6, atol=1e-7)
    # control: without the mask, the padded tokens do change the loss (so the check can fail)
    ones = {k: (torch.ones_like(v) if k == "attention_mask" else v) for k, v in b.items()}
    ones_other = dict(ones, input_ids=other["input_ids"])
    assert not torch.allclose(loss(ones), loss(ones_other), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# distillation losses against an independent float64 computation
# ------------------------------------------------------------------------------------------------


def test_kd_loss_equals_float64_reference():
    space = tiny_space(mode="kd")
    torch.manual_seed(6)
    net = SuperPLM(space).eval()
    arch = Arch(2, 16, 32, 2, 8)                       # strategy 2: both heads, 4 of 8 dims each
    net.set_arch(arch)
    teacher = _tiny_teacher()
    distill = TT.DistillConfig(hidden_mse=1.0, attn_mse=0.5, task_loss=0.25)
    distiller = TT._SuperDistiller(teacher, space, distill)
    b = _padded_batch()
    got = TT._pass_loss(net, b, "kd", distiller, distill, distiller.teacher_targets(T.unmasked(b)))

    # reference: the extracted stand-alone student and HF's teacher, in float64. Distillation reads
    # the text unmasked (the labelled positions given back their tokens), the MLM term the masked one
    student = net.extract(arch).double().eval()
    teacher64 = _tiny_teacher().double()
    real = b["attention_mask"].bool()
    plain = b["input_ids"].clone()
    plain[b["labels"] != -100] = b["labels"][b["labels"] != -100]
    assert not torch.equal(plain, b["input_ids"])
    ts = teacher64(input_ids=plain, attention_mask=b["attention_mask"], output_hidden_states=True,
                   output_attentions=True)
    so = student(input_ids=plain, attention_mask=b["attention_mask"], output_hidden_states=True)
    hs = so.hidden_states[-1]
    fit = distiller.fit.weight.double()[:, :arch.hidden]
    hidden = ((hs @ fit.T + distiller.fit.bias.double() - ts.last_hidden_state) ** 2)[real].mean()

    def scores(att, x, h):
        q = att.query(x).view(2, 12, h, -1).transpose(1, 2)
        k = att.key(x).view(2, 12, h, -1).transpose(1, 2)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])

    s_sc = scores(student.bert.encoder.layer[-1].attention.self, so.hidden_states[-2], 2)
    t_sc = scores(teacher64.encoder.layer[-1].attention.self, ts.hidden_states[-2], 2)
    # the teacher's scores are the ones HF turns into its attention probabilities
    probs = t_sc.masked_fill(~real[:, None, None, :], -torch.inf).softmax(-1)
    assert torch.allclose(probs[0], ts.attentions[-1][0], atol=1e-10)
    assert torch.allclose(probs[1][:, :7, :7], ts.attentions[-1][1][:, :7, :7], atol=1e-10)
    keep = (real[:, None, :, None] & real[:, None, None, :]).expand_as(s_sc)
    attn = ((s_sc - t_sc) ** 2)[keep].mean()
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mlm = F.cross_entropy(logits[b["labels"] != -100], b["labels"][b["labels"] != -100])
    want = hidden + 0.5 * attn + 0.25 * mlm
    assert math.isclose(float(got.detach()), float(want), rel_tol=1e-5)


def test_kd_training_lowers_the_distillation_loss():
    space = tiny_space(mode="kd")
    torch.manual_seed(7)
    net = SuperPLM(space)
    cfg = TT.SuperTrainConfig(steps=20, batch_size=4, sub_batches=2, lr=1e-2, objective="kd", device="cpu")
    m = TT.train_superplm(net, tiny_data(), cfg, teacher=_tiny_teacher())
    d = m["distill_losses"]
    assert sum(d[-5:]) / 5 < 0.8 * sum(d[:5]) / 5


# ------------------------------------------------------------------------------------------------
# errors, saving / loading, the CLI
# ------------------------------------------------------------------------------------------------


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="sub-batches"):
        TT.SuperTrainConfig(batch_size=6, sub_batches=4)
    with pytest.raises(ConfigError, match="objective"):
        TT.SuperTrainConfig(objective="nas")
    with pytest.raises(ConfigError, match="teacher"):
        TT.train_superplm(SuperPLM(tiny_space(mode="kd")), tiny_data(), TT.SuperTrainConfig(objective="kd",
                                                                                              device="cpu"))
    with pytest.raises(ConfigError, match="heads one to one"):   # attention KD needs the teacher's heads
        TT.train_superplm(SuperPLM(tiny_space()), tiny_data(),
                          TT.SuperTrainConfig(objective="kd", device="cpu", batch_size=4), teacher=_tiny_teacher())


def test_cli_train_writes_a_loadable_superplm(tmp_path, capsys):
    from attnc.search.tinybert.cli import add_train_arguments, cli_train

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--out", str(tmp_path), "--max-layers", "2", "--max-hidden", "32", "--max-ffn", "64",
                         "--max-heads", "2", "--head-dim", "8", "--seq-len", "32", "--steps", "3",
                         "--batch-size", "4", "--sub-batches", "2", "--device", "cpu", "--no-progress", "--json"])
    assert cli_train(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["sub_batches"] == 2
    net = TT.load_superplm(tmp_path)
    saved = torch.load(tmp_path / "supernet" / "supernet.pt")
    assert net.space == Space.from_json(summary["space"])
    _assert_same_params(net.state_dict(), saved, atol=0.0)
    assert json.loads((tmp_path / "supernet" / "train_metrics.json").read_text())["steps"] == 3
    # the loaded SuperPLM gives the held-out loss the run reported
    from attnc.runtime import data as D
    tok = D.load_tokenizer()
    data = MLMData(D.cached_blocks("wiki-sample", tok, 32), tok)
    data.split(0)
    loss = TT.heldout_mlm_loss(net, data, net.space.max_arch, batch_size=8)
    assert math.isclose(loss, summary["final_eval"]["loss"], rel_tol=1e-5)
    with pytest.raises(Exception, match="no trained SuperPLM"):
        TT.load_superplm(tmp_path / "nothing")
