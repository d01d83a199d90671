"""The attnc BERT runtime, top-down: model classes, layers, attention / conv mixers, embeddings.

Attribute names match the Hugging Face BERT checkpoint keys (embeddings.word_embeddings,
encoder.layer.N.attention.self.query, ..., pooler.dense, cls.predictions...), so a standard BERT
state dict loads with one loop (see load_bert_weights) and from_pretrained works on a BERT folder.

Per layer the token mixer is either
  * CompiledSelfAttention: projections for the inputs the formula uses (Q, K, V, P) -> the op
    from attnc.compile (reference path) or F.scaled_dot_product_attention when the formula's
    canonical form is the standard one (fast path, numerically BERT's); or
  * LightweightConv (Wu et al. 2019): input projection -> GLU -> depthwise convolution whose
    softmax-normalised kernels are shared by groups of channels (one kernel per head).
then attention.output (dense + dropout + residual + LayerNorm) and the feed-forward block.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput

from attnc.compiler.errors import ConfigError

from .config import LAYER_CHECKS, STANDARD_FORMULA, AttncBertConfig

_WARNED: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (a module without parameters counts as on the CPU)."""
    p = next(module.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def plan_summary(model) -> str:
    """One line per layer: what it runs on the model's device (sdpa, triton-fused, torch, conv)."""
    device = _device_of(model)
    lines = [f"plan on {device}:"]
    layers = [m for m in model.modules() if isinstance(m, AttncBertLayer)]
    for i, layer in enumerate(layers):
        mixer = layer.attention.self
        if isinstance(mixer, LightweightConv):
            lines.append(f"  layer {i}: conv k={mixer.kernel_size}, heads={mixer.num_heads} -> torch conv1d")
        else:
            lines.append(f"  layer {i}: {mixer.formula} ({mixer.num_attention_heads} heads) -> "
                         f"{mixer.plan(device)}")
    return "\n".join(lines)

# ================================================================================================
# Pretrained-model base and the public models
# ================================================================================================


class AttncBertPreTrainedModel(PreTrainedModel):
    config_class = AttncBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = False
    _no_split_modules = ["AttncBertEmbeddings", "AttncBertLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LightweightConv):
            init.normal_(module.kernel, mean=0.0, std=std)
        elif isinstance(module, AttncBertLMPredictionHead):
            init.zeros_(module.bias)
        if isinstance(module, AttncBertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


class AttncBertModel(AttncBertPreTrainedModel):
    """The encoder: embeddings -> L layers -> (optional) pooler. Returns BaseModelOutputWithPooling."""

    def __init__(self, config: AttncBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.config = config
        self.embeddings = AttncBertEmbeddings(config)
        self.encoder = AttncBertEncoder(config)
        self.pooler = AttncBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=None, return_dict=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, n, dm)
        mask = _key_mask(attention_mask)   # (B, n) bool, True = real token; None when no padding
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        x, hidden = self.encoder(x, mask, output_hidden_states)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                         hidden_states=hidden)
        return out if return_dict is not False else out.to_tuple()


class AttncBertForMaskedLM(AttncBertPreTrainedModel):
    """BERT + MLM head (decoder tied to the word embeddings)."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: AttncBertConfig):
        super().__init__(config)
        self.bert = AttncBertModel(config, add_pooling_layer=False)
        self.cls = AttncBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states=output_hidden_states)
        logits = self.cls(out.last_hidden_state)   # (B, n, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        res = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return res if return_dict is not False else res.to_tuple()

    def mlm_loss(self, input_ids, attention_mask, labels, token_type_ids=None) -> torch.Tensor:
        """MLM loss computing vocabulary logits only at the labelled positions (training fast path)."""
        h = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, n, dm)
        sel = labels != -100                                                          # (B, n)
        logits = self.cls(h[sel])                                                     # (m, vocab)
        return F.cross_entropy(logits, labels[sel])


@dataclass
class AttncBertForPreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple | None = None


class AttncBertForPreTraining(AttncBertPreTrainedModel):
    """BERT + MLM head + next-sentence-prediction head (BERT's pretraining heads)."""

    _tied_weights_keys = AttncBertForMaskedLM._tied_weights_keys

    def __init__(self, config: AttncBertConfig):
        super().__init__(config)
        self.bert = AttncBertModel(config)
        self.cls = AttncBertPreTrainingHeads(config)
        self.post_init()

    get_output_embeddings = AttncBertForMaskedLM.get_output_embeddings
    set_output_embeddings = AttncBertForMaskedLM.set_output_embeddings

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states=output_hidden_states)
        logits, nsp = self.cls(out.last_hidden_state, out.pooler_output)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
            if next_sentence_label is not None:
                loss = loss + F.cross_entropy(nsp.view(-1, 2), next_sentence_label.view(-1))
        res = AttncBertForPreTrainingOutput(loss=loss, prediction_logits=logits,
                                            seq_relationship_logits=nsp, hidden_states=out.hidden_states)
        return res if return_dict is not False else res.to_tuple()

    def mlm_loss(self, input_ids, attention_mask, labels, token_type_ids=None,
                 next_sentence_label=None) -> torch.Tensor:
        """MLM (+ NSP) loss with vocabulary logits only at the labelled positions."""
        out = self.bert(input_ids, attention_mask, token_type_ids)
        sel = labels != -100
        loss = F.cross_entropy(self.cls.predictions(out.last_hidden_state[sel]), labels[sel])
        if next_sentence_label is not None:
            loss = loss + F.cross_entropy(self.cls.seq_relationship(out.pooler_output), next_sentence_label)
        return loss


class AttncBertForSequenceClassification(AttncBertPreTrainedModel):
    """BERT + pooler + linear classifier; num_labels == 1 is regression (MSE)."""

    def __init__(self, config: AttncBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = AttncBertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))   # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            else:
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        res = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return res if return_dict is not False else res.to_tuple()


# ================================================================================================
# Encoder and layers
# ================================================================================================


class AttncBertEncoder(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([AttncBertLayer(config, spec) for spec in config.layers])

    def forward(self, x, mask, output_hidden_states=False):
        hidden = (x,) if output_hidden_states else None
        for layer in self.layer:
            x = layer(x, mask)
            if output_hidden_states:
                hidden = hidden + (x,)
        return x, hidden


class AttncBertLayer(nn.Module):
    """mixer (attention or conv) -> dense + residual + LayerNorm -> FFN + residual + LayerNorm."""

    def __init__(self, config: AttncBertConfig, spec: dict):
        super().__init__()
        self.attention = AttncBertAttention(config, spec)
        self.intermediate = AttncBertIntermediate(config)
        self.output = AttncBertOutput(config)

    def forward(self, x, mask):
        x = self.attention(x, mask)                          # (B, n, dm)
        return self.output(self.intermediate(x), x)          # (B, n, dm)


class AttncBertAttention(nn.Module):
    def __init__(self, config: AttncBertConfig, spec: dict):
        super().__init__()
        if spec["type"] == "conv":
            self.self = LightweightConv(config, spec)
        else:
            self.self = CompiledSelfAttention(config, spec)
        self.output = AttncBertSelfOutput(config, spec["qkv_size"])

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class AttncBertSelfOutput(nn.Module):
    def __init__(self, config: AttncBertConfig, qkv_size: int):
        super().__init__()
        self.dense = nn.Linear(qkv_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class AttncBertIntermediate(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class AttncBertOutput(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


# ================================================================================================
# Token mixers
# ================================================================================================

# projection attribute per formula input (query/key/value are BERT's names)
PROJECTIONS = {"Q": "query", "K": "key", "V": "value", "P": "extra"}


class CompiledSelfAttention(nn.Module):
    """Multi-head attention whose score/mix step is an attnc-compiled formula.

    Only the inputs the formula uses get a projection (a two-input formula has fewer parameters).
    forward: (B, n, dm) -> (B, n, dq)."""

    def __init__(self, config: AttncBertConfig, spec: dict):
        super().__init__()
        from attnc.compiler.api import analyze

        self.formula = spec["formula"]
        self.num_attention_heads = spec["heads"]
        self.attention_head_size = spec["qkv_size"] // spec["heads"]
        self.all_head_size = spec["qkv_size"]
        self.backend = config.attention_backend
        analysis = analyze(self.formula, checks=LAYER_CHECKS)
        self.inputs = analysis.inputs                              # subset of Q K V P
        self.is_standard = analysis.hash == analyze(STANDARD_FORMULA).hash
        self.use_sdpa = bool(config.sdpa_fast_path) and self.is_standard
        for name in self.inputs:
            setattr(self, PROJECTIONS[name], nn.Linear(config.hidden_size, self.all_head_size))
        self.dropout_p = config.attention_probs_dropout_prob
        self._compiled: dict[str, object] = {}                     # device type -> CompiledAttention

    def extra_repr(self) -> str:
        device = _device_of(self)
        return f"formula={self.formula!r}, heads={self.num_attention_heads}, runs={self.plan(device)!r}"

    def plan(self, device: torch.device | str = "cpu") -> str:
        """What this layer runs on `device`: "sdpa", "triton-fused" or "torch" (with the reason
        when the Triton backend was asked for but cannot fuse the formula)."""
        if self.use_sdpa:
            return "sdpa"
        fn = self.compiled_for(torch.device(device))
        if fn.plan == "streaming":
            return "triton-fused"
        if fn.plan == "torch-fallback":
            reason = getattr(getattr(fn, "classification", None), "reason", None)
            return f"torch (triton cannot fuse it: {reason})"
        return "torch"

    def compiled_for(self, device: torch.device):
        """The compiled op for tensors on `device`: the torch backend on the CPU (the Triton one when
        attention_backend="triton" and the Triton interpreter is on), the config's backend on CUDA
        ("auto" = Triton). Warns once when Triton is not installed or cannot fuse the formula;
        any other code-generation error is raised."""
        fn = self._compiled.get(device.type)
        if fn is None:
            import importlib.util
            import os

            import attnc

            backend = self.backend
            interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
            if device.type != "cuda":
                backend = "triton" if backend == "triton" and interpreting else "torch"
            elif backend == "auto":
                backend = "triton"
            if backend == "triton" and importlib.util.find_spec("triton") is None:
                if self.backend == "triton":
                    raise ConfigError("attention_backend='triton' but Triton is not installed",
                                      hint="pip install triton, or use attention_backend='auto' / 'torch'")
                _warn_once(("no-triton",), "Triton is not installed: compiled attention layers run the "
                                           "PyTorch path on CUDA (pip install triton for fused kernels)")
                backend = "torch"
            fn = attnc.compile(self.formula, backend=backend, checks=LAYER_CHECKS)
            if fn.plan == "torch-fallback":
                reason = getattr(getattr(fn, "classification", None), "reason", "not a streaming formula")
                _warn_once(("fallback", fn.hash), f"formula {self.formula!r} cannot be fused into one "
                                                  f"Triton kernel ({reason}); it runs the PyTorch path")
            self._compiled[device.type] = fn
        return fn

    def forward(self, x, mask, use_sdpa: bool | None = None):
        B, n, _ = x.shape
        h, dh = self.num_attention_heads, self.attention_head_size
        heads = {}
        for name in self.inputs:
            proj = getattr(self, PROJECTIONS[name])(x)                            # (B, n, dq)
            heads[name.lower()] = proj.view(B, n, h, dh).transpose(1, 2)         # (B, h, n, dh)
        if self.use_sdpa if use_sdpa is None else (use_sdpa and self.is_standard):
            # fast path: the standard formula is exactly softmax(QK^T/sqrt(dh))V -> SDPA (BERT's)
            attn_mask = None if mask is None else mask[:, None, None, :]          # (B, 1, 1, n)
            y = F.scaled_dot_product_attention(heads["q"], heads["k"], heads["v"], attn_mask=attn_mask)
        else:
            y = self.compiled_for(x.device)(key_padding_mask=mask, **heads)       # (B, h, n, dh)
        # One dropout setting for every attention layer, SDPA or compiled: dropout with
        # attention_probs_dropout_prob on the per-head attention output. Fused kernels never
        # materialise the probabilities, so dropping them would make compiled layers train
        # differently from standard ones; a search must compare models trained alike.
        y = y.transpose(1, 2).reshape(B, n, self.all_head_size)                  # (B, n, dq)
        return F.dropout(y, self.dropout_p, self.training)   # contiguous: same mask on both paths

    def __getstate__(self):   # compiled ops are rebuilt on demand (deepcopy / pickle)
        state = self.__dict__.copy()
        state["_compiled"] = {}
        return state


class LightweightConv(nn.Module):
    """Projected input -> GLU -> lightweight depthwise convolution (Wu et al. 2019).

    Channels C = qkv_size are split into `heads` contiguous groups; every group shares one kernel of
    width K, softmax-normalised over its K taps (and dropped out in training, as DropConnect).
    Padded positions are zeroed before the convolution, so they contribute nothing.
    forward: (B, n, dm) -> (B, n, C)."""

    def __init__(self, config: AttncBertConfig, spec: dict):
        super().__init__()
        self.kernel_size = spec["kernel_size"]
        self.num_heads = spec["heads"]
        self.channels = spec["qkv_size"]
        self.input_proj = nn.Linear(config.hidden_size, 2 * self.channels)    # GLU halves: value, gate
        self.kernel = nn.Parameter(torch.empty(self.num_heads, self.kernel_size))  # (h, K)
        self.weight_dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, heads={self.num_heads}, channels={self.channels}"

    def normalised_kernel(self) -> torch.Tensor:
        return self.weight_dropout(torch.softmax(self.kernel, dim=-1))       # (h, K)

    def forward(self, x, mask, reference: bool = False):
        u = F.glu(self.input_proj(x), dim=-1)                                 # (B, n, C)
        if mask is not None:
            u = u.masked_fill(~mask[..., None], 0.0)
        w = self.normalised_kernel()                                          # (h, K)
        if reference:
            return lightweight_conv_reference(u, w)
        w = w.repeat_interleave(self.channels // self.num_heads, dim=0)       # (C, K)
        y = F.conv1d(u.transpose(1, 2), w.unsqueeze(1), padding=self.kernel_size // 2,
                     groups=self.channels)                                    # (B, C, n)
        return y.transpose(1, 2)                                              # (B, n, C)


def lightweight_conv_reference(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference lightweight conv: out[b, t, c] = sum_k w[c // (C/h), k] * u[b, t + k - K//2, c]."""
    B, n, C = u.shape
    h, K = w.shape
    pad = K // 2
    up = F.pad(u, (0, 0, pad, pad))                                           # (B, n + 2 pad, C)
    wc = w.repeat_interleave(C // h, dim=0)                                   # (C, K)
    out = torch.zeros_like(u)
    for k in range(K):
        out = out + up[:, k:k + n, :] * wc[:, k]
    return out


# ================================================================================================
# Embeddings, pooler, heads
# ================================================================================================


class AttncBertEmbeddings(nn.Module):
    """word + position + token-type embeddings -> LayerNorm -> dropout (BERT's)."""

    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)                   # (B, n, dm)
        n = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :n]                           # (1, n)
        if token_type_ids is None:
            x = inputs_embeds + self.token_type_embeddings.weight[0]          # all segment A
        else:
            x = inputs_embeds + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class AttncBertPooler(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x):
        return self.activation(self.dense(x[:, 0]))                           # (B, dm) from [CLS]


class AttncBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class AttncBertLMPredictionHead(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.transform = AttncBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)  # tied weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))                     # tied bias

    def forward(self, x):
        return self.decoder(self.transform(x))                                # (..., vocab)


class AttncBertOnlyMLMHead(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.predictions = AttncBertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


class AttncBertPreTrainingHeads(nn.Module):
    def __init__(self, config: AttncBertConfig):
        super().__init__()
        self.predictions = AttncBertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, x, pooled):
        return self.predictions(x), self.seq_relationship(pooled)


def _key_mask(attention_mask):
    """HF attention_mask (B, n) of 1/0 -> bool key mask, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, n), got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


# ================================================================================================
# Weight import from a transformers BERT
# ================================================================================================


def load_bert_weights(model: AttncBertPreTrainedModel, bert_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a transformers BERT state dict (BertModel or Bert*For*, keys with or without "bert.")
    into `model` by name, asserting shapes. Returns the model keys that got no weight."""
    own = model.state_dict()
    prefix = "bert." if any(k.startswith("bert.") for k in own) else ""
    src = {}
    for k, v in bert_state.items():
        k = k.removeprefix("bert.")
        src[k if k.startswith("cls.") else prefix + k] = v
    missing = []
    with torch.no_grad():
        for key, param in own.items():
            if key not in src:
                missing.append(key)
                continue
            assert src[key].shape == param.shape, f"{key}: {tuple(src[key].shape)} vs {tuple(param.shape)}"
            param.copy_(src[key])
    return missing


def from_bert(bert_model, **config_overrides) -> AttncBertModel:
    """An AttncBertModel with the weights of a live transformers.BertModel (standard formula)."""
    cfg = bert_model.config.to_dict()
    cfg.update(config_overrides)
    config = AttncBertConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    model = AttncBertModel(config, add_pooling_layer=getattr(bert_model, "pooler", None) is not None)
    missing = load_bert_weights(model, bert_model.state_dict())
    assert not missing, f"weights missing from the BERT state dict: {missing}"
    return model.eval() if not bert_model.training else model


def bert_incompatibility(config: AttncBertConfig) -> str | None:
    """Why a model of `config` is not a vanilla Hugging Face BERT (None when it is one: every layer
    standard attention with qkv size = hidden size, as transformers.BertConfig ties them)."""
    from attnc.compiler.api import analyze

    standard = analyze(STANDARD_FORMULA).canonical
    for i, spec in enumerate(config.layers):
        if spec["type"] != "attention":
            return f"layer {i} is a {spec['type']} layer, which BertModel has no equivalent for"
        if analyze(spec["formula"], checks=LAYER_CHECKS).canonical != standard:
            return f"layer {i} computes {spec['formula']!r}, not BERT's softmax(Q @ K^T / sqrt(d)) @ V"
        if spec["qkv_size"] != config.hidden_size:
            return (f"layer {i} has qkv size {spec['qkv_size']} and hidden size {config.hidden_size}: "
                    f"BertModel's Q/K/V width is its hidden size")
        if spec["heads"] != config.num_attention_heads:
            return (f"layer {i} has {spec['heads']} heads, the model {config.num_attention_heads}: BertModel's "
                    f"layers all have the same head count")
    return None


_TO_BERT = {"AttncBertModel": "BertModel", "AttncBertForMaskedLM": "BertForMaskedLM",
            "AttncBertForPreTraining": "BertForPreTraining",
            "AttncBertForSequenceClassification": "BertForSequenceClassification"}


def to_bert(model: AttncBertPreTrainedModel):
    """The same model as a vanilla transformers BERT (BertModel / BertForMaskedLM / BertForPreTraining /
    BertForSequenceClassification, model_type "bert"): config fields copied, every weight copied by
    name (the parameter names are BERT's by design), in the model's train/eval mode, device and dtype.
    ConfigError naming the reason (bert_incompatibility) when the model is not expressible as one."""
    import transformers

    why = bert_incompatibility(model.config)
    if why is not None:
        raise ConfigError(f"this model is not a vanilla BERT: {why}",
                          hint="keep the attnc_bert format (loads after `import attnc`)")
    cls_name = _TO_BERT.get(type(model).__name__)
    if cls_name is None:
        raise ConfigError(f"no BERT class for {type(model).__name__}", hint=f"use one of {', '.join(_TO_BERT)}")
    c = model.config
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "classifier_dropout",
            "tie_word_embeddings", "id2label", "label2id", "problem_type")
    bc = transformers.BertConfig(**{k: getattr(c, k) for k in keep if hasattr(c, k)})
    cls = getattr(transformers, cls_name)
    kw = {"add_pooling_layer": model.pooler is not None} if cls_name == "BertModel" else {}
    bert = cls(bc, **kw)
    p = next(model.parameters())
    bert = bert.to(p.device, p.dtype)
    missing, unexpected = bert.load_state_dict(model.state_dict(), strict=False)
    # a checkpoint key BERT lacks, or a BERT weight the model lacks, would be a wrong mapping
    if unexpected or missing:
        raise RuntimeError(f"attnc -> BERT weight mapping: missing {missing}, unexpected {unexpected}")
    if getattr(bc, "tie_word_embeddings", True) and hasattr(bert, "tie_weights"):
        bert.tie_weights()
    return bert.train(model.training)


ALL_MODELS = (AttncBertModel, AttncBertForMaskedLM, AttncBertForPreTraining,
              AttncBertForSequenceClassification)
