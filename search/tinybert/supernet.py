"""SuperPLM: one AttncBertForMaskedLM-shaped set of weights whose sub-models share them (AutoTinyBERT).

The weights are those of an AttncBertForMaskedLM at `space.max_arch`, under the same parameter
names, so a state dict moves between the two and `extract(arch)` is slicing that state dict.
A forward at the active arch L-dm-df-h-dqkv runs the first L layers with sliced weights:

* every Linear uses the top-left block weight[:out, :in] (bias[:out]); LayerNorms normalise the
  first dm features with the first dm gamma/beta; embeddings keep the first dm columns;
* the MHA projections follow the space's strategy. Strategy 1 (mlm mode) keeps the head dim and
  takes the first h heads, i.e. the first h*head_dim rows of Q/K/V and the first columns of
  attention.output.dense. Strategy 2 (kd mode) keeps all max_heads heads and takes the first
  dqkv/h dims of EVERY head: weight viewed as (H, head_dim, in) -> [:, :d].
* the attention op is the one the stand-alone model runs: F.scaled_dot_product_attention for the
  standard formula (the runtime's fast path), else the formula compiled by attnc.compile through
  the max model's own CompiledSelfAttention.compiled_for (same op, same masking);
* the MLM head's decoder is tied to the word embeddings (their first dm columns), bias full vocab.

Slices are views (strategy 2 copies only the active per-head block; under autograd a strided slice
is copied contiguous, see _trainable), so a forward never copies the whole weights, and gradients
land only in the active slices. set_arch is a memoised validation (microseconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from attnc.compiler.errors import ConfigError
from attnc.runtime.modeling import PROJECTIONS, AttncBertForMaskedLM, _key_mask

from .space import Arch, Space


def _slice(t: torch.Tensor, *sels) -> torch.Tensor:
    """t sliced along its leading dims by `sels` (None = whole dim). A view unless a per-head
    selection is active; then a copy of exactly the selected block."""
    shape, narrows, final = [], [], []
    for size, sel in zip(t.shape, sels):
        if sel is None or isinstance(sel, int):
            k = size if sel is None else sel
            narrows.append((len(shape), k))
            shape.append(size)
            final.append(k)
        else:
            H, full, d = sel
            shape += [H, full]
            narrows.append((len(shape) - 1, d))
            final.append(H * d)
    final += list(t.shape[len(sels):])
    shape += list(t.shape[len(sels):])
    v = t.view(shape) if len(shape) != t.dim() else t
    for dim, k in narrows:
        if k != v.shape[dim]:
            v = v.narrow(dim, 0, k)
    return v if list(v.shape) == final else v.reshape(final)


def _trainable(w: torch.Tensor) -> torch.Tensor:
    """A weight slice as used under autograd: made contiguous (a copy of the active block only).
    Through a strided view, mm's backward returns the weight gradient transposed in memory, and
    adding / scattering a transposed V x dm gradient into the full one costs more than the copy
    (measured 5-8x slower on the CPU). Without grad the view is used as it is."""
    if w.requires_grad and torch.is_grad_enabled() and not w.is_contiguous():
        return w.contiguous()
    return w


@dataclass
class SuperPLMOutput(ModelOutput):
    """loss (MLM cross entropy when labels are given), logits (B, n, vocab), hidden_states (the
    embeddings and every active layer's output, (B, n, dm) each, when asked), last_scores (the last
    active layer's raw Q.K^T / sqrt(d), (B, h, n, n), unmasked, when asked)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None
    last_scores: torch.Tensor | None = None


class SuperPLM(nn.Module):
    """AttncBertForMaskedLM-shaped weights at space.max_arch; forwards run the active sub-model.

    config_overrides go to every AttncBertConfig built here (the max model's and extract's), e.g.
    dict(hidden_dropout_prob=0.0, attention_backend="torch"); widths come from the space."""

    def __init__(self, space: Space, *, config_overrides: dict | None = None):
        super().__init__()
        if not isinstance(space, Space):
            raise ConfigError(f"SuperPLM takes a tinybert.Space, got {type(space).__name__}")
        self.space = space
        self.config_overrides = dict(config_overrides or {})
        self.config = space.config(space.max_arch, **self.config_overrides)
        full = AttncBertForMaskedLM(self.config)   # HF init + tied decoder; we keep its modules
        self.bert = full.bert
        self.cls = full.cls
        self.arch: Arch = space.max_arch
        self._act = ACT2FN[self.config.hidden_act]

    # --- architecture ---------------------------------------------------------------------------

    def set_arch(self, arch: Arch | str) -> None:
        """Validate `arch` against the space (ConfigError when outside) and make it the active one."""
        self.arch = self.space.validate(arch)

    def extra_repr(self) -> str:
        return (f"space max={self.space.max_arch} mode={self.space.mode} (MHA strategy "
                f"{self.space.strategy}), formula={self.space.formula!r}, active={self.arch}")

    def _qkv_sel(self, arch: Arch):
        """Selection of the qkv dim (rows of Q/K/V/P, columns of attention.output.dense)."""
        if self.space.strategy == 1:
            return arch.qkv                                          # first h heads of head_dim
        return (self.space.max_heads, self.space.head_dim, arch.head_dim)   # first d dims of each head

    def slices(self, name: str, arch: Arch) -> tuple:
        """How parameter `name` (an AttncBertForMaskedLM key) is sliced for `arch`."""
        dm, df, q = arch.hidden, arch.ffn, self._qkv_sel(arch)
        if name.startswith("bert.embeddings."):
            return (dm,) if ".LayerNorm." in name else (None, dm)
        if name.startswith("bert.encoder.layer."):
            rest = name.split(".", 4)[4]
            if rest.startswith("attention.self."):
                return (q, dm) if rest.endswith(".weight") else (q,)
            table = {"attention.output.dense.weight": (dm, q), "intermediate.dense.weight": (df, dm),
                     "intermediate.dense.bias": (df,), "output.dense.weight": (dm, df)}
            if rest in table:
                return table[rest]
            if rest in ("attention.output.dense.bias", "output.dense.bias") or ".LayerNorm." in rest:
                return (dm,)
        if name in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            return (None,)
        if name == "cls.predictions.decoder.weight":
            return (None, dm)
        if name == "cls.predictions.transform.dense.weight":
            return (dm, dm)
        if name.startswith("cls.predictions.transform."):
            return (dm,)
        raise RuntimeError(f"SuperPLM: no slicing rule for parameter {name!r}")   # internal error

    def sliced_state_dict(self, arch: Arch | str) -> dict[str, torch.Tensor]:
        """The stand-alone model's state dict for `arch` (detached copies)."""
        arch = self.space.validate(arch)
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("bert.encoder.layer.") and int(name.split(".")[3]) >= arch.layers:
                continue
            out[name] = _slice(t, *self.slices(name, arch)).detach().clone()
        return out

    def extract(self, arch: Arch | str | None = None) -> AttncBertForMaskedLM:
        """A stand-alone AttncBertForMaskedLM of `arch` (default: the active one) with the sliced
        weights; its outputs equal this SuperPLM's at that arch. In the SuperPLM's train/eval mode,
        on its device and dtype; save_pretrained writes a folder AutoModelForMaskedLM loads after
        `import attnc`."""
        arch = self.space.validate(self.arch if arch is None else arch)
        p = self.bert.embeddings.word_embeddings.weight
        sub = AttncBertForMaskedLM(self.space.config(arch, **self.config_overrides))
        sub = sub.to(p.device, p.dtype)
        sub.load_state_dict(self.sliced_state_dict(arch), strict=True)
        return sub.train(self.training)

    # --- forward --------------------------------------------------------------------------------

    def _lin(self, x, lin: nn.Linear, out_sel, in_sel):
        return F.linear(x, _trainable(_slice(lin.weight, out_sel, in_sel)), _slice(lin.bias, out_sel))

    def _ln(self, x, ln: nn.LayerNorm, dm: int):
        return F.layer_norm(x, (dm,), ln.weight[:dm], ln.bias[:dm], ln.eps)

    def _word_slices(self):
        """(embedding, decoder) weights at the active width. With the decoder tied (the default) both
        are ONE view: autograd then sums the two V x dm gradients at the slice and scatters them into
        the full V x dm_max gradient once, not twice (it dominates a small sub-model's step)."""
        dm = self.arch.hidden
        w = self.bert.embeddings.word_embeddings.weight
        dec = self.cls.predictions.decoder.weight
        wte = _trainable(w[:, :dm])
        return wte, (wte if dec is w else _trainable(dec[:, :dm]))

    def _encode(self, input_ids, attention_mask, token_type_ids, want_hidden=False, want_scores=False,
                wte=None):
        arch, cfg = self.arch, self.config
        dm, df, L = arch.hidden, arch.ffn, arch.layers
        h = arch.heads
        d = arch.head_dim
        q = self._qkv_sel(arch)
        p_hidden, training = cfg.hidden_dropout_prob, self.training
        emb = self.bert.embeddings
        B, n = input_ids.shape
        # embeddings: same order of additions as AttncBertEmbeddings (bitwise-equal outputs)
        wte = emb.word_embeddings.weight[:, :dm] if wte is None else wte
        x = F.embedding(input_ids, wte, emb.word_embeddings.padding_idx)
        tt = emb.token_type_embeddings.weight[:, :dm]
        x = x + tt[0] if token_type_ids is None else x + F.embedding(token_type_ids, tt)
        x = x + emb.position_embeddings.weight[:n, :dm]
        x = F.dropout(self._ln(x, emb.LayerNorm, dm), p_hidden, training)
        mask = _key_mask(attention_mask)                                   # (B, n) bool or None
        hidden = (x,) if want_hidden else None
        scores = None
        layers = self.bert.encoder.layer
        for i in range(L):   # the first L layers (indexing, not slicing: no new ModuleList per call)
            layer = layers[i]
            mixer = layer.attention.self
            heads = {}
            for name in mixer.inputs:
                proj = self._lin(x, getattr(mixer, PROJECTIONS[name]), q, dm)   # (B, n, h*d)
                heads[name.lower()] = proj.view(B, n, h, d).transpose(1, 2)     # (B, h, n, d)
            if want_scores and i == L - 1:
                if "q" not in heads or "k" not in heads:
                    raise ConfigError(f"output_last_scores needs a formula with Q and K; "
                                      f"{self.space.formula!r} uses {', '.join(mixer.inputs)}")
                scores = heads["q"] @ heads["k"].transpose(-1, -2) / math.sqrt(d)   # (B, h, n, n)
            if mixer.use_sdpa:
                attn_mask = None if mask is None else mask[:, None, None, :]       # (B, 1, 1, n)
                y = F.scaled_dot_product_attention(heads["q"], heads["k"], heads["v"],
                                                   attn_mask=attn_mask)
            else:
                y = mixer.compiled_for(x.device)(key_padding_mask=mask, **heads)   # (B, h, n, d)
            y = y.transpose(1, 2).reshape(B, n, h * d)
            y = F.dropout(y, mixer.dropout_p, training)       # as CompiledSelfAttention
            out = layer.attention.output
            x = self._ln(F.dropout(self._lin(y, out.dense, dm, q), p_hidden, training) + x,
                         out.LayerNorm, dm)
            f = self._act(self._lin(x, layer.intermediate.dense, df, dm))           # (B, n, df)
            x = self._ln(F.dropout(self._lin(f, layer.output.dense, dm, df), p_hidden, training) + x,
                         layer.output.LayerNorm, dm)
            if want_hidden:
                hidden = hidden + (x,)
        return x, hidden, scores

    def _head(self, x, decoder=None):
        """MLM head at the active width: transform (dm -> dm) -> LayerNorm -> tied decoder."""
        dm = self.arch.hidden
        pred = self.cls.predictions
        x = self._ln(self._act(self._lin(x, pred.transform.dense, dm, dm)), pred.transform.LayerNorm, dm)
        decoder = pred.decoder.weight[:, :dm] if decoder is None else decoder
        return F.linear(x, decoder, pred.decoder.bias)                         # (..., vocab)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_last_scores=False) -> SuperPLMOutput:
        wte, dec = self._word_slices()
        x, hidden, scores = self._encode(input_ids, attention_mask, token_type_ids,
                                         output_hidden_states, output_last_scores, wte)
        logits = self._head(x, dec)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return SuperPLMOutput(loss=loss, logits=logits, hidden_states=hidden, last_scores=scores)

    def mlm_loss(self, input_ids, attention_mask, labels, token_type_ids=None) -> torch.Tensor:
        """MLM loss with vocabulary logits only at the labelled positions (training fast path)."""
        wte, dec = self._word_slices()
        x, _, _ = self._encode(input_ids, attention_mask, token_type_ids, wte=wte)
        sel = labels != -100
        return F.cross_entropy(self._head(x[sel], dec), labels[sel])
