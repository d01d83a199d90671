"""Token-uniformity figures (AutoBERT-Zero, after Dong et al. 2021 "Attention is not all you need").

For every layer's hidden states H (n real tokens x dm) of a sequence:
  * relative residual norm  ||H - 1 x^T||_F / ||H||_F, x the mean token (the best rank-1
    "all tokens equal" fit): 0 means every token has the same representation;
  * rank-1 residual         ||H - H_1||_F / ||H||_F with H_1 the best rank-1 approximation (SVD);
  * average pairwise cosine similarity of the token vectors (i != j): 1 means uniform tokens.
Averaged over sequences. Layer 0 is the embedding output.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from attnc.compiler.errors import DataError
from attnc._progress import progress_bar

from . import data as D


def uniformity_of(h: torch.Tensor) -> dict[str, float]:
    """Figures of one (n, dm) matrix of token representations (real tokens only)."""
    h = h.double()
    n = h.shape[0]
    total = torch.linalg.norm(h)
    resid = torch.linalg.norm(h - h.mean(dim=0, keepdim=True))
    s = torch.linalg.svdvals(h)
    rank1 = torch.sqrt(torch.clamp((s * s).sum() - s[0] ** 2, min=0))
    u = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = u @ u.T                                                # (n, n)
    avg_cos = (cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1)
    return {"relative_residual": float(resid / total), "rank1_residual": float(rank1 / total),
            "avg_cosine": float(avg_cos)}


def token_uniformity(model_dir: str | os.PathLike, *, corpus: str = "wiki-sample", num_sequences: int = 64,
                     seq_len: int = 128, batch_size: int = 16, seed: int = 0, progress: bool = True) -> dict:
    """Per-layer token-uniformity figures of a saved model on blocks of `corpus`."""
    from .modeling import AttncBertModel
    from .train import _quiet_datasets, _quiet_transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir} has no config.json", hint="give a folder written by `attnc pretrain`")
    with _quiet_datasets(progress), _quiet_transformers(progress):
        try:
            tok = D.load_tokenizer(model_dir)
        except DataError:
            tok = D.load_tokenizer(None)
        model = AttncBertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
        seq_len = min(seq_len, model.config.max_position_embeddings)
        blocks = D.make_blocks(D.load_corpus(corpus), tok, seq_len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(blocks), generator=g)[:num_sequences].tolist()
    ids_all = torch.tensor([blocks[i]["input_ids"] for i in pick])     # (N, n), no padding
    sums: list[dict[str, float]] | None = None
    with torch.no_grad():
        for i in progress_bar(range(0, len(ids_all), batch_size), desc="analyze", disable=not progress):
            ids = ids_all[i:i + batch_size]
            hidden = model(ids, output_hidden_states=True).hidden_states   # L+1 x (B, n, dm)
            if sums is None:
                sums = [dict.fromkeys(("relative_residual", "rank1_residual", "avg_cosine"), 0.0)
                        for _ in hidden]
            for li, h in enumerate(hidden):
                for row in h:
                    for k, v in uniformity_of(row).items():
                        sums[li][k] += v
    n = len(ids_all)
    layers = [{"layer": li, "kind": "embeddings" if li == 0 else model.config.layers[li - 1]["type"],
               **{k: v / n for k, v in s.items()}} for li, s in enumerate(sums or [])]
    return {"model_dir": str(model_dir), "corpus": corpus, "sequences": n, "seq_len": seq_len,
            "layers": layers}


def format_table(result: dict) -> str:
    lines = [f"token uniformity of {result['model_dir']} ({result['sequences']} x {result['seq_len']} "
             f"tokens of {result['corpus']})",
             f"{'layer':>5}  {'kind':<10}  {'rel. residual':>13}  {'rank-1 resid.':>13}  {'avg cosine':>10}"]
    for r in result["layers"]:
        lines.append(f"{r['layer']:>5}  {r['kind']:<10}  {r['relative_residual']:>13.4f}  "
                     f"{r['rank1_residual']:>13.4f}  {r['avg_cosine']:>10.4f}")
    return "\n".join(lines)


def plot(result: dict, path: str | os.PathLike) -> Path:
    """Line plot of the figures by layer (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("plotting needs matplotlib", hint="pip install matplotlib (or attnc[viz])") from None
    xs = [r["layer"] for r in result["layers"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("relative_residual", "relative residual norm"), ("avg_cosine", "avg pairwise cosine")):
        ax.plot(xs, [r[key] for r in result["layers"]], marker="o", label=label)
    short = {"embeddings": "emb", "attention": "attn", "conv": "conv"}
    ax.set_xticks(xs, [f"{r['layer']}\n{short.get(r.get('kind'), '')}" for r in result["layers"]])
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("token uniformity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
