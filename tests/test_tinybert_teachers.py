"""Teachers users have: any Hugging Face encoder folder (BERT, RoBERTa, ELECTRA) distils a SuperPLM
(issue 20). The last self-attention is found by structure; its scores are checked against the
attention probabilities Hugging Face itself computes (eager attention), the hidden targets against
its hidden states; distillation reads the text unmasked, teacher and student alike."""
from __future__ import annotations

import json
import math

import pytest
import torch

from attnc.cli import main
from attnc.runtime import trainer as T
from attnc.runtime.train import load_teacher
from attnc.search.tinybert import train as TT
from attnc.search.tinybert.space import Arch, Space
from attnc.search.tinybert.supernet import SuperPLM

from test_tinybert_cli import WORDS
from test_tinybert_train import VOCAB, tiny_data

KINDS = ("bert", "roberta", "electra", "electra-discriminator")


def _save_teacher(kind: str, folder, vocab: int = VOCAB, heads: int = 2):
    """A tiny randomly initialised teacher folder of the given family (eager attention, so that HF
    returns its attention probabilities)."""
    import transformers as tf

    torch.manual_seed(11)
    common = dict(vocab_size=vocab, hidden_size=24, num_hidden_layers=2, num_attention_heads=heads,
                  intermediate_size=48, attn_implementation="eager")
    if kind == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(**common, max_position_embeddings=64))
    elif kind == "roberta":      # positions start after the padding index: 2 more
        model = tf.RobertaForMaskedLM(tf.RobertaConfig(**common, max_position_embeddings=66))
    elif kind == "electra":      # the generator: an MLM head, embeddings narrower than the hidden size
        model = tf.ElectraForMaskedLM(tf.ElectraConfig(**common, embedding_size=16, max_position_embeddings=64))
    else:                        # the discriminator: no MLM head
        model = tf.ElectraForPreTraining(tf.ElectraConfig(**common, embedding_size=16, max_position_embeddings=64))
    with torch.no_grad():        # large weights: attention far from uniform, so a wrong mask or slice shows
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder)
    return folder


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_scores_and_hidden_states_match_hugging_face(kind, tmp_path):
    teacher = load_teacher(str(_save_teacher(kind, tmp_path / kind)))
    assert (teacher.get_output_embeddings() is None) == (kind == "electra-discriminator")
    space = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=12, vocab_size=VOCAB,
                  min_hidden=8, min_ffn=8, mode="kd", max_position_embeddings=64)
    distiller = TT._SuperDistiller(teacher, space, TT.KD_DEFAULT)
    b = _batch()
    t = distiller.teacher_targets(b)
    teacher.set_attn_implementation("eager")      # HF returns attention probabilities in eager mode only
    with torch.no_grad():
        out = teacher(**b, output_hidden_states=True, output_attentions=True)
    real = b["attention_mask"].bool()
    probs = t["scores"].masked_fill(~real[:, None, None, :], -torch.inf).softmax(-1)
    hf = out.attentions[-1]
    assert torch.allclose(probs[0], hf[0], atol=1e-5)
    assert torch.allclose(probs[1][:, :8, :8], hf[1][:, :8, :8], atol=1e-5)
    assert torch.allclose(t["hidden"][real], out.hidden_states[-1].float()[real], atol=1e-5)   # sdpa vs eager
    # the structure found is the last layer's self-attention (HF's own module of that name)
    att = T._last_self_attention(teacher)
    last = [m for n, m in teacher.named_modules() if n.endswith("attention.self")][-1]
    assert att.module is last and att.query is last.query and att.key is last.key and att.heads == 2


def test_a_model_without_self_attention_is_refused_with_the_projects_error():
    from transformers import DistilBertConfig, DistilBertModel

    from attnc.compiler.errors import ConfigError

    # DistilBERT's attention has q_lin / k_lin / v_lin: found by structure as well
    d = DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=24, n_layers=2, n_heads=2, hidden_dim=48))
    att = T._last_self_attention(d)
    assert att is not None and att.query is d.transformer.layer[-1].attention.q_lin and att.heads == 2

    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"hidden_size": 24, "vocab_size": VOCAB, "num_attention_heads": 2})()
            self.lin = torch.nn.Linear(24, 24)

    space = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=12, vocab_size=VOCAB,
                  min_hidden=8, min_ffn=8, mode="kd")
    with pytest.raises(ConfigError, match="self-attention") as e:
        TT._SuperDistiller(NoAttention(), space, TT.KD_DEFAULT, fit=torch.nn.Linear(32, 24))
    assert "RoBERTa" in e.value.hint


class _Recorder:
    """Wraps a teacher's forward to record the input ids it is given."""

    def __init__(self, model):
        self.seen = []
        orig = model.forward

        def forward(*a, **kw):
            self.seen.append(kw["input_ids"].clone())
            return orig(*a, **kw)

        model.forward = forward


@pytest.mark.parametrize("kind", ["roberta", "electra"])
def test_superplm_kd_trains_on_unmasked_text_with_any_teacher(kind, tmp_path):
    """A kd SuperPLM distils from a RoBERTa / ELECTRA folder (before issue 20: 'use a BERT folder as
    teacher'); the teacher never sees a [MASK] token, and the distillation loss falls."""
    teacher = load_teacher(str(_save_teacher(kind, tmp_path / kind)))
    rec = _Recorder(teacher)
    space = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=12, vocab_size=VOCAB,
                  min_hidden=8, min_ffn=8, mode="kd", max_position_embeddings=64)
    torch.manual_seed(7)
    net = SuperPLM(space)
    data = tiny_data()
    cfg = TT.SuperTrainConfig(steps=20, batch_size=4, sub_batches=2, lr=1e-2, objective="kd", device="cpu")
    m = TT.train_superplm(net, data, cfg, teacher=teacher)
    d = m["distill_losses"]
    assert sum(d[-5:]) / 5 < 0.9 * sum(d[:5]) / 5
    mask_id = data.tokenizer.mask_token_id
    assert rec.seen and all(not bool((ids == mask_id).any()) for ids in rec.seen)
    # the training batches did mask tokens: the teacher got them back unmasked
    data.split(cfg.seed)
    b = data.train_batch(0, 4, cfg.seed)
    assert bool((b["input_ids"] == mask_id).any())
    assert torch.equal(rec.seen[0], T.unmasked(b)["input_ids"][:2])


def test_runtime_distillation_alone_reads_unmasked_text_and_finds_a_roberta_teachers_attention(tmp_path):
    """The training core's distillation (e.g. `superplm extract --train-steps` of a kd SuperPLM):
    with no MLM term the student and the teacher read the text unmasked; attention-score KD works
    with a RoBERTa teacher."""
    from attnc.runtime.modeling import AttncBertForMaskedLM
    from attnc.runtime.trainer import DistillConfig, TrainConfig, train

    teacher = load_teacher(str(_save_teacher("roberta", tmp_path / "r")))
    rec = _Recorder(teacher)
    space = Space(max_layers=2, max_hidden=32, max_ffn=64, max_heads=2, head_dim=12, vocab_size=VOCAB,
                  min_hidden=8, min_ffn=8, mode="kd", max_position_embeddings=64)
    torch.manual_seed(0)
    student = AttncBertForMaskedLM(space.config(Arch(2, 32, 64, 2, 24)))
    seen_student = []
    student.bert.register_forward_pre_hook(lambda mod, args, kw: seen_student.append(kw.get("input_ids", args[0] if args else None).clone()),
                                           with_kwargs=True)
    data = tiny_data()
    res = train(student, data, TrainConfig(steps=12, batch_size=4, lr=1e-2, device="cpu",
                                           checkpoint_every_minutes=None),
                teacher=teacher, distill=DistillConfig(hidden_mse=1.0, attn_mse=1.0, task_loss=0.0))
    d = res.metrics["distill_losses"]
    assert all(math.isfinite(x) for x in d) and sum(d[-3:]) < sum(d[:3])
    mask_id = data.tokenizer.mask_token_id
    assert rec.seen and all(not bool((ids == mask_id).any()) for ids in rec.seen)
    assert all(torch.equal(a, b) for a, b in zip(rec.seen, seen_student))


def test_cli_trains_a_kd_superplm_from_an_electra_folder(tmp_path, capsys):
    import random

    from attnc.runtime.data import load_tokenizer

    rng = random.Random(1)
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
                                                   .capitalize() + "." for _ in range(300)))
    folder = _save_teacher("electra", tmp_path / "teacher", vocab=len(load_tokenizer()))
    assert main(["search", "superplm", "train", "--mode", "kd", "--teacher", str(folder), "--max-layers", "2",
                 "--max-hidden", "32", "--max-ffn", "64", "--corpus", str(tmp_path / "corpus.txt"), "--seq-len", "24",
                 "--steps", "3", "--batch-size", "8", "--sub-batches", "2", "--no-progress", "--json",
                 "--out", str(tmp_path / "sp")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["final_eval"]["kind"] == "distill" and math.isfinite(out["final_eval"]["loss"])
    assert out["space"]["max_heads"] == 2 and out["space"]["head_dim"] == 12     # the teacher's heads
