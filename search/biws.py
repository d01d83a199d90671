"""BIWS — bi-branch weight sharing (AutoBERT-Zero, section 3.3) for the OP-NAS search.

The supernet holds one copy of every weight a child architecture of the space can use:

* shared by all children: embeddings, the MLM head, per layer the FFN and both LayerNorms;
* per layer, an attention branch: the four projections Q, K, V, P and the attention output dense
  (a child's formula picks the projections of the inputs it uses);
* per layer, a conv branch: the GLU input projection, a kernel of the largest size (65) per head,
  the conv output dense, and one K x K kernel transformation matrix per smaller kernel size K,
  initialised to the identity and shared by all heads of the layer.

A child conv layer of kernel size K < 65 gets ``kernel = centre_crop(kernel65, K) @ T_K^T``, i.e.
each head's K taps are ``T_K @ crop``. This is Once-for-All's elastic kernel (centre crop, then a
learned linear map), applied to the raw (pre-softmax) lightweight-conv kernel.

Write-back, and why the transform is trained through a parametrisation: the child model is a plain
AttncBertForMaskedLM whose conv layer owns a plain (h, K) kernel, so from a trained plain kernel
alone one cannot tell how much of the change belongs to the shared centre taps and how much to
T_K. The proxy runner therefore trains each small-kernel conv layer with the kernel parametrised as
``crop @ T^T`` (``attach_kernel_transform``): both the crop and T receive gradients, and
``trained_payload`` returns them separately, so ``write_back`` puts the crop into the centre K taps
of the 65 kernel and T into T_K — the exact positions the child used, nothing else. T is stored
flattened (1-D) so optimisers that exclude 1-D tensors from weight decay (attnc's AdamW groups)
keep it out of weight decay, as OFA does.
"""
from __future__ import annotations

import copy
import functools
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from attnc.compiler.errors import ConfigError, DataError
from attnc.runtime.config import LAYER_CHECKS

MAX_KERNEL = 65
KERNEL_SIZES = (3, 5, 7, 9, 15, 31, 65)
# a 4-input template formula: its attention layers own all four projections Q, K, V, P
_TEMPLATE_FORMULA = "softmax(Q @ K^T / sqrt(d)) @ (V + P)"
_PROJ = {"Q": "query", "K": "key", "V": "value", "P": "extra"}
_LAYER_KEY = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.*)$")
SUPERNET_FILE = "supernet.pt"


@dataclass(frozen=True)
class SupernetDims:
    """The sizes a supernet is built for; every child must have the same widths."""

    num_layers: int
    hidden_size: int = 128
    intermediate_size: int = 512
    num_heads: int = 4
    vocab_size: int = 8000
    max_position_embeddings: int = 512
    kernel_sizes: tuple[int, ...] = KERNEL_SIZES
    initializer_range: float = 0.02
    seed: int = 0

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "vocab_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"supernet {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"supernet hidden_size {self.hidden_size} is not divisible by "
                              f"{self.num_heads} heads")
        bad = [k for k in self.kernel_sizes if k not in KERNEL_SIZES]
        if bad or MAX_KERNEL not in self.kernel_sizes:
            raise ConfigError(f"supernet kernel sizes {self.kernel_sizes} must be a subset of "
                              f"{KERNEL_SIZES} including {MAX_KERNEL}")


def _dims_from(space_or_dims: Any, num_layers: int | None, **overrides) -> SupernetDims:
    if isinstance(space_or_dims, SupernetDims):
        return space_or_dims if not overrides and num_layers is None else SupernetDims(**{
            **asdict(space_or_dims), **({"num_layers": num_layers} if num_layers else {}), **overrides})
    if isinstance(space_or_dims, dict):
        fields = dict(space_or_dims)
    else:   # a search Space or an Architecture: read the widths it carries
        fields = {}
        for name, alt in (("hidden_size", None), ("intermediate_size", None), ("num_heads", None),
                          ("num_layers", "layers")):
            if hasattr(space_or_dims, name):
                fields[name] = getattr(space_or_dims, name)
            elif alt and hasattr(space_or_dims, alt):
                fields[name] = len(getattr(space_or_dims, alt))
        ks = getattr(space_or_dims, "kernel_sizes", None)
        if ks:
            fields["kernel_sizes"] = tuple(sorted(set(ks) | {MAX_KERNEL}))
    if num_layers is not None:
        fields["num_layers"] = num_layers
    fields.update(overrides)
    if "num_layers" not in fields:
        raise ConfigError("the supernet needs num_layers")
    return SupernetDims(**fields)


@functools.lru_cache(maxsize=4096)
def _formula_inputs(formula: str) -> tuple[str, ...]:
    """The inputs (Q, K, V, P) a formula uses; analysed once per formula, not per key per child."""
    from attnc.compiler.api import analyze

    return tuple(analyze(formula, checks=LAYER_CHECKS).inputs)


class _ConvBranch(nn.Module):
    """A layer's conv branch: GLU input projection, (h, 65) raw kernel, output dense."""

    def __init__(self, d: SupernetDims):
        super().__init__()
        self.input_proj = nn.Linear(d.hidden_size, 2 * d.hidden_size)
        self.kernel = nn.Parameter(torch.empty(d.num_heads, MAX_KERNEL))
        self.dense = nn.Linear(d.hidden_size, d.hidden_size)


def centre_crop(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """The centre k taps of (..., K) kernels (K and k odd)."""
    start = (kernel.shape[-1] - k) // 2
    return kernel[..., start:start + k]


class KernelTransform(nn.Module):
    """Parametrisation of a child conv kernel: kernel = crop @ T^T (T stored flat, see module doc)."""

    def __init__(self, transform: torch.Tensor):
        super().__init__()
        k = transform.shape[-1]
        self.k = k
        self.transform = nn.Parameter(transform.detach().clone().reshape(k * k))

    def matrix(self) -> torch.Tensor:
        return self.transform.view(self.k, self.k)

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        return crop @ self.matrix().T            # (h, k): each head's taps are T @ crop


def attach_kernel_transform(model: nn.Module, layer: int, crop: torch.Tensor, transform: torch.Tensor) -> None:
    """Train `model`'s conv layer `layer` with its kernel parametrised as crop @ T^T."""
    conv = model.bert.encoder.layer[layer].attention.self
    with torch.no_grad():
        conv.kernel.copy_(crop)
    parametrize.register_parametrization(conv, "kernel", KernelTransform(transform), unsafe=True)
    with torch.no_grad():   # register_parametrization keeps the tensor as `original`
        conv.parametrizations.kernel.original.copy_(crop)


def trained_payload(model: nn.Module, copy: bool = True) -> dict:
    """A trained child's weights for write_back: {"state": plain state dict (kernels evaluated),
    "conv": {layer: {"crop", "transform"}} for the parametrised conv layers}. `model` is left plain.

    copy=False returns the model's own tensors (detached, no copy) for a caller that does not
    train the model further before the write-back (the proxy runner: the child is discarded, or
    only read to initialise a separate fine-tuning model)."""
    take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    convs = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        m = layer.attention.self
        if parametrize.is_parametrized(m, "kernel"):
            p = m.parametrizations.kernel
            # always copied (tiny): remove_parametrizations below re-points `original` with set_()
            convs[i] = {"crop": p.original.detach().clone(), "transform": p[0].matrix().detach().clone()}
            parametrize.remove_parametrizations(m, "kernel", leave_parametrized=True)
    state = {k: take(v) for k, v in model.state_dict().items()}
    return {"state": state, "conv": convs}


class Supernet(nn.Module):
    """The weight-sharing supernet of BIWS (see the module docstring).

    Supernet(space_or_dims, num_layers=None, vocab_size=..., ...): `space_or_dims` is a
    SupernetDims, a dict of its fields, or a search Space / Architecture carrying hidden_size,
    intermediate_size, num_heads (and num_layers / layers)."""

    def __init__(self, space_or_dims: Any, num_layers: int | None = None, **overrides):
        super().__init__()
        from attnc.runtime.config import AttncBertConfig
        from attnc.runtime.modeling import AttncBertForMaskedLM

        self.dims = d = _dims_from(space_or_dims, num_layers, **overrides)
        g = torch.random.fork_rng()   # deterministic init from dims.seed without touching the caller's RNG
        with g:
            torch.manual_seed(d.seed)
            template = AttncBertConfig(
                vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_hidden_layers=d.num_layers,
                num_attention_heads=d.num_heads, intermediate_size=d.intermediate_size,
                max_position_embeddings=d.max_position_embeddings, initializer_range=d.initializer_range,
                layers=[{"type": "attention", "formula": _TEMPLATE_FORMULA}] * d.num_layers)
            # embeddings, MLM head, FFNs, LayerNorms, attention projections + output dense
            self.shared = AttncBertForMaskedLM(template)
            self.conv = nn.ModuleList(_ConvBranch(d) for _ in range(d.num_layers))
            for c in self.conv:
                for lin in (c.input_proj, c.dense):
                    nn.init.normal_(lin.weight, std=d.initializer_range)
                    nn.init.zeros_(lin.bias)
                nn.init.normal_(c.kernel, std=d.initializer_range)
        # T_K per layer per smaller kernel size, identity at start (a child starts from the crop)
        self.transforms = nn.ModuleList(
            nn.ParameterDict({str(k): nn.Parameter(torch.eye(k)) for k in d.kernel_sizes if k < MAX_KERNEL})
            for _ in range(d.num_layers))

    # --- children ---------------------------------------------------------------------------------

    def child_config(self, arch, **overrides):
        """The child's AttncBertConfig: arch.to_config() with the supernet's vocabulary/positions."""
        self._check_arch(arch)
        kw = dict(vocab_size=self.dims.vocab_size, max_position_embeddings=self.dims.max_position_embeddings,
                  initializer_range=self.dims.initializer_range)
        kw.update(overrides)
        return arch.to_config(**kw)

    def _check_arch(self, arch) -> None:
        d = self.dims
        got = (len(arch.layers), arch.hidden_size, arch.intermediate_size, arch.num_heads)
        want = (d.num_layers, d.hidden_size, d.intermediate_size, d.num_heads)
        if got != want:
            raise ConfigError(f"architecture widths (layers, hidden, FFN, heads) = {got} do not match "
                              f"the supernet's {want}", hint="build the supernet from the same space")
        for i, layer in enumerate(arch.layers):
            if layer.kind == "conv" and layer.kernel_size not in d.kernel_sizes:
                raise ConfigError(f"layer {i}: kernel size {layer.kernel_size} is not in the supernet's "
                                  f"{d.kernel_sizes}")

    @staticmethod
    def _inputs(formula: str) -> tuple[str, ...]:
        return _formula_inputs(formula)

    def _shared_keys(self) -> tuple[str, ...]:
        # the shared model's state-dict keys never change; prepare and write-back walk them per child
        keys = self.__dict__.get("_shared_key_cache")
        if keys is None:
            keys = self.__dict__["_shared_key_cache"] = tuple(self.shared.state_dict().keys())
        return keys

    def _source(self, arch, key: str):
        """Where child key `key` lives in the supernet: ("shared", key) | ("conv", i, attr) |
        ("kernel", i) | None when the child has no such weight."""
        m = _LAYER_KEY.match(key)
        if not m:
            return ("shared", key)
        i, rest = int(m.group(1)), m.group(2)
        layer = arch.layers[i]
        if layer.kind == "conv":
            if rest == "attention.self.kernel":
                return ("kernel", i)
            if rest.startswith("attention.self.input_proj."):
                return ("conv", i, "input_proj." + rest.rsplit(".", 1)[1])
            if rest.startswith("attention.output.dense."):
                return ("conv", i, "dense." + rest.rsplit(".", 1)[1])
        return ("shared", key)

    def child_keys(self, arch) -> list[str]:
        """The child's state-dict keys (those of AttncBertForMaskedLM(child_config(arch)))."""
        self._check_arch(arch)
        keys = []
        for key in self._shared_keys():
            m = _LAYER_KEY.match(key)
            if m:
                i, rest = int(m.group(1)), m.group(2)
                layer = arch.layers[i]
                if rest.startswith("attention.self."):
                    proj = rest.split(".")[2]
                    if layer.kind == "conv":
                        continue
                    if proj not in {_PROJ[x] for x in self._inputs(layer.formula)}:
                        continue
            keys.append(key)
        for i, layer in enumerate(arch.layers):
            if layer.kind == "conv":
                p = f"bert.encoder.layer.{i}.attention.self."
                keys += [p + "input_proj.weight", p + "input_proj.bias", p + "kernel"]
        return keys

    def conv_parts(self, arch) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {"crop", "transform"}} for the child's conv layers with kernel size < 65."""
        out = {}
        for i, layer in enumerate(arch.layers):
            if layer.kind == "conv" and layer.kernel_size < MAX_KERNEL:
                k = layer.kernel_size
                out[i] = {"crop": centre_crop(self.conv[i].kernel, k).detach().clone(),
                          "transform": self.transforms[i][str(k)].detach().clone()}
        return out

    @torch.no_grad()
    def child_state(self, arch) -> dict[str, torch.Tensor]:
        """State dict for AttncBertForMaskedLM(child_config(arch)): shared weights, the projections
        of each formula's inputs, and conv kernels = centre crop of the 65 kernel times T_K."""
        shared = self.shared.state_dict()
        out = {}
        for key in self.child_keys(arch):
            src = self._source(arch, key)
            if src[0] == "shared":
                out[key] = shared[src[1]].detach().clone()
            elif src[0] == "conv":
                out[key] = self.conv[src[1]].get_parameter(src[2]).detach().clone()
            else:
                i = src[1]
                k = arch.layers[i].kernel_size
                full = self.conv[i].kernel
                out[key] = (full.detach().clone() if k == MAX_KERNEL
                            else KernelTransform(self.transforms[i][str(k)])(centre_crop(full, k)).detach().clone())
        return out

    def child_payload(self, arch) -> dict:
        """What a child needs to start training (picklable): plain state + conv crops/transforms, and
        the optimizer state of its parameters ("optim", by the child's parameter names; empty until a
        child has written one back)."""
        return {"state": self.child_state(arch), "conv": self.conv_parts(arch), "optim": self.child_optim_state(arch)}

    # --- optimizer state shared with the weights ----------------------------------------------------

    def _param_map(self, arch) -> list[tuple[str, str, Any]]:
        """(child parameter name, supernet parameter key, region) for every trainable tensor of the
        child as the proxy trains it (small conv kernels parametrised, see attach_kernel_transform).
        region: None (the whole tensor), ("crop", k) (centre taps of the 65 kernel) or "flat" (a
        transform, flattened in the child)."""
        cache = self.__dict__.setdefault("_param_map_cache", {})
        key = arch.key()
        if key in cache:
            return cache[key]
        params = self.__dict__.get("_param_keys")
        if params is None:
            params = self.__dict__["_param_keys"] = frozenset(k for k, _ in self.named_parameters())
        out = []
        for ck in self.child_keys(arch):
            src = self._source(arch, ck)
            if src[0] == "shared":
                sk = "shared." + src[1]
                if sk in params:   # tied duplicates (the MLM decoder) are not parameters of their own
                    out.append((ck, sk, None))
            elif src[0] == "conv":
                out.append((ck, f"conv.{src[1]}.{src[2]}", None))
            else:
                i = src[1]
                k = arch.layers[i].kernel_size
                if k == MAX_KERNEL:
                    out.append((ck, f"conv.{i}.kernel", None))
                else:
                    base = ck[: -len("kernel")] + "parametrizations.kernel."
                    out.append((base + "original", f"conv.{i}.kernel", ("crop", k)))
                    out.append((base + "0.transform", f"transforms.{i}.{k}", "flat"))
        cache[key] = out
        return out

    @staticmethod
    def _region(t: torch.Tensor, region) -> torch.Tensor:
        if region is None or t.dim() == 0:
            return t
        if region == "flat":
            return t.reshape(-1)
        start = (MAX_KERNEL - region[1]) // 2
        return t[..., start:start + region[1]]

    @torch.no_grad()
    def child_optim_state(self, arch) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer state of the child's parameters, cut from the supernet's as the weights are
        (centre crops of the 65 kernel's moments, flattened transform moments); parameters no child
        has trained yet are left out (the optimizer starts them fresh)."""
        out = {}
        for name, sk, region in self._param_map(arch):
            st = self.optim_state.get(sk)
            if st:
                out[name] = {k: self._region(v, region).clone() for k, v in st.items()}
        return out

    @property
    def optim_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{supernet parameter key: optimizer state (e.g. AdamW's exp_avg, exp_avg_sq, step)}."""
        return self.__dict__.setdefault("_optim_state", {})

    # --- write-back ---------------------------------------------------------------------------------

    def _targets(self, arch, trained: dict):
        """(accumulator key, live tensor, region, trained value) for every position the child used:
        weights, then optimizer state."""
        if "state" in trained and isinstance(trained.get("state"), dict):
            state, convs, optim = trained["state"], trained.get("conv", {}), trained.get("optim") or {}
        else:
            state, convs, optim = trained, {}, {}
        convs = {int(k): v for k, v in convs.items()}
        keys = self.child_keys(arch)
        missing = [k for k in keys if k not in state]
        if missing:
            raise DataError(f"write-back: the trained state lacks {len(missing)} of the child's weights, "
                            f"e.g. {missing[0]}")
        shared = self.shared.state_dict(keep_vars=True)   # the live tensors (tied ones share storage)
        seen = set()
        out = []
        for key in keys:
            src = self._source(arch, key)
            val = state[key]
            if src[0] == "shared":
                t = shared[src[1]]
                if t.data_ptr() in seen:   # the tied MLM decoder: same storage as the word embeddings
                    continue
                seen.add(t.data_ptr())
                out.append(("shared." + src[1], t, None, val))
            elif src[0] == "conv":
                out.append((f"conv.{src[1]}.{src[2]}", self.conv[src[1]].get_parameter(src[2]), None, val))
            else:
                i = src[1]
                k = arch.layers[i].kernel_size
                if k == MAX_KERNEL:
                    out.append((f"conv.{i}.kernel", self.conv[i].kernel, None, val))
                    continue
                if i not in convs:
                    raise DataError(f"write-back: conv layer {i} (kernel {k}) needs its crop and transform",
                                    hint="train the child with attach_kernel_transform and use trained_payload")
                out.append((f"conv.{i}.kernel", self.conv[i].kernel, ("crop", k), convs[i]["crop"]))
                out.append((f"transforms.{i}.{k}", self.transforms[i][str(k)], None, convs[i]["transform"]))
        params = dict(self.named_parameters())
        for name, sk, region in self._param_map(arch):
            got = optim.get(name)
            if not got:
                continue
            live = self.optim_state.setdefault(sk, {})
            for k, v in got.items():
                v = v.detach()
                if k not in live:   # first write-back of this state: it starts from zeros
                    live[k] = torch.zeros((), dtype=v.dtype) if v.dim() == 0 else \
                        torch.zeros(params[sk].shape, dtype=v.dtype)
                out.append((f"optim:{sk}:{k}", live[k], region, v))
        return out

    @torch.no_grad()
    def write_back(self, arch, trained: dict) -> None:
        """Put a trained child's weights (and optimizer state) back at exactly the positions it used.

        `trained` is trained_payload(model) ({"state", "conv", "optim"}) or a plain child state dict;
        with a plain state a small-kernel conv layer cannot be split into crop and transform, so that
        is an error (train it with attach_kernel_transform).

        Outside a merge the values are copied in (the supernet becomes the child at those positions).
        Between begin_merge() and end_merge() the child's update (trained minus the supernet's value,
        which does not change until end_merge) is accumulated instead, see end_merge."""
        targets = self._targets(arch, trained)
        acc = self.__dict__.get("_merge")
        for name, live, region, val in targets:
            part = self._region(live, region)
            if acc is None:
                part.copy_(val.reshape(part.shape))
                continue
            total, count = acc.get(name) or acc.setdefault(
                name, (torch.zeros(live.shape, dtype=torch.float64), torch.zeros(live.shape, dtype=torch.float32)))
            self._region(total, region).add_(val.reshape(part.shape).double() - part.double())
            self._region(count, region).add_(1.0)

    def begin_merge(self) -> None:
        """Start a merge: children written back from now on all started from the current supernet
        (one snapshot), and their updates are combined by end_merge, whatever their order."""
        if self.__dict__.get("_merge") is None:
            self.__dict__["_merge"] = {}

    @torch.no_grad()
    def end_merge(self) -> None:
        """Apply the merge: every position moves by the mean of the updates of the children that used
        it (a position one child used becomes that child's value; n children that trained the same
        weights from the same start each estimate one update, so their sum would take n steps at
        once: the mean is the local-SGD / federated-averaging rule). Optimizer moments and step
        counts are merged the same way."""
        acc = self.__dict__.pop("_merge", None)
        if not acc:
            return
        live = {}
        for name, t in self.state_dict(keep_vars=True).items():
            live[name] = t
        for sk, st in self.optim_state.items():
            for k, v in st.items():
                live[f"optim:{sk}:{k}"] = v
        for name, (total, count) in acc.items():
            t = live[name]
            used = count > 0
            new = t.double() + total / count.clamp(min=1.0)
            t.copy_(torch.where(used, new, t.double()).to(t.dtype))

    @property
    def merging(self) -> bool:
        return self.__dict__.get("_merge") is not None

    # --- forward through a child's branches --------------------------------------------------------

    def forward(self, arch, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, n, dm) of `arch` computed on the supernet's own branches (no dropout).

        Written from the supernet's tensors, independently of the child model's modules, so that a
        test can compare it with the child built from child_state."""
        import attnc

        self._check_arch(arch)
        d = self.dims
        bert = self.shared.bert
        emb = bert.embeddings
        B, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device)
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(pos)[None] + \
            emb.token_type_embeddings(torch.zeros_like(input_ids))
        x = emb.LayerNorm(x)
        mask = None if attention_mask is None else attention_mask.bool()
        h, dh = d.num_heads, d.hidden_size // d.num_heads
        for i, choice in enumerate(arch.layers):
            layer = bert.encoder.layer[i]
            if choice.kind == "conv":
                br = self.conv[i]
                u = F.glu(br.input_proj(x), dim=-1)                               # (B, n, C)
                if mask is not None:
                    u = u * mask[..., None]
                k = choice.kernel_size
                raw = br.kernel if k == MAX_KERNEL else centre_crop(br.kernel, k) @ self.transforms[i][str(k)].T
                w = torch.softmax(raw, dim=-1)                                    # (h, k)
                # explicit shifted sum (not conv1d): y[t, c] = sum_j w[head(c), j] u[t + j - k//2, c]
                up = F.pad(u, (0, 0, k // 2, k // 2))                             # (B, n + k - 1, C)
                wc = w.repeat_interleave(d.hidden_size // h, dim=0)               # (C, k)
                y = sum(up[:, j:j + n, :] * wc[:, j] for j in range(k))
                mixed = br.dense(y)
            else:
                sa = layer.attention.self
                heads = {}
                for name in self._inputs(choice.formula):
                    p = getattr(sa, _PROJ[name])(x)
                    heads[name.lower()] = p.view(B, n, h, dh).transpose(1, 2)
                fn = attnc.compile(choice.formula, backend="torch", checks=LAYER_CHECKS)
                y = fn(key_padding_mask=mask, **heads).transpose(1, 2).reshape(B, n, d.hidden_size)
                mixed = layer.attention.output.dense(y)
            x = layer.attention.output.LayerNorm(mixed + x)
            ffn = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x)))
            x = layer.output.LayerNorm(ffn + x)
        return x

    # --- persistence ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write {"dims", "state"} atomically (temp file + os.replace), so a crash never leaves a torn file."""
        path = Path(path)
        if path.is_dir() or not path.suffix:   # a run folder
            path = path / SUPERNET_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".supernet-", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(self.state_refs(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Supernet":
        path = Path(path)
        if path.is_dir():
            path = path / SUPERNET_FILE
        if not path.is_file():
            raise DataError(f"no supernet checkpoint at {path}",
                            hint="run a weight-sharing search first (or pass the supernet file)")
        return cls.from_state_copy(torch.load(path, weights_only=False, map_location="cpu"))

    def state_refs(self) -> dict:
        """dims + the live weights, optimizer state and open merge, not copied: for saving at once
        (torch.save) or loading into another supernet (from_state_copy copies); a later write-back
        changes these tensors."""
        return {"dims": asdict(self.dims), "state": self.state_dict(), "optim": self.optim_state,
                "merge": self.__dict__.get("_merge")}

    def state_copy(self) -> dict:
        """A detached copy of state_refs() (for an evaluator's state_dict)."""
        return copy.deepcopy(self.state_refs())

    @classmethod
    def from_state_copy(cls, blob: dict) -> "Supernet":
        dims = dict(blob["dims"])
        dims["kernel_sizes"] = tuple(dims["kernel_sizes"])
        net = cls(SupernetDims(**dims))
        net.load_state_dict(blob["state"])
        net.__dict__["_optim_state"] = {k: {n: v.clone() for n, v in st.items()}
                                        for k, st in (blob.get("optim") or {}).items()}
        if blob.get("merge") is not None:
            net.__dict__["_merge"] = {k: (t.clone(), c.clone()) for k, (t, c) in blob["merge"].items()}
        return net


def export_model(source, arch, **config_overrides):
    """AttncBertForMaskedLM of `arch` with its supernet weights; `source` is a Supernet, a supernet
    file, or a folder holding supernet.pt. save_pretrained() of it loads with transformers.AutoModel
    after `import attnc`."""
    from attnc.runtime.modeling import AttncBertForMaskedLM

    net = source if isinstance(source, Supernet) else Supernet.load(source)
    model = AttncBertForMaskedLM(net.child_config(arch, **config_overrides))
    model.load_state_dict(net.child_state(arch))
    return model
