"""Shared test set-up: one torch thread (two stall 10-50x when anything else runs), offline hub, tiny models."""

from __future__ import annotations

import os
import types
from collections import namedtuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def _data_dir() -> Path | None:
    root = os.environ.get("LEADKD_DATA_DIR")
    return Path(root) if root and Path(root).is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of real BEIR datasets ($LEADKD_DATA_DIR); tests that need it skip without it."""
    root = _data_dir()
    if root is None:
        pytest.skip("LEADKD_DATA_DIR is not set to a folder of BEIR datasets")
    return root


def build_tiny_tokenizer(words: list[str], lowercase: bool = True):
    """A WordPiece tokenizer over a small vocabulary, built in memory (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused1]", "[unused2]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


TINY_WORDS = ("the a of and to in is for on with cell cells protein gene genes cancer risk study patients "
              "treatment effect dna rna virus vaccine brain heart blood drug dose trial mouse human "
              "increase decrease level levels high low results show shows").split()


def make_tiny_bert_folder(path: Path, words: list[str] = TINY_WORDS, layers: int = 2, hidden: int = 32,
                          seed: int = 0, lowercase: bool = True, dropout: float = 0.1,
                          init_range: float = 0.02) -> Path:
    """Save a random BERT (``layers`` blocks, width ``hidden``) and its tokenizer as an HF folder."""
    from transformers import BertConfig, BertModel

    tokenizer = build_tiny_tokenizer(words, lowercase=lowercase)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, initializer_range=init_range)
    model = BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer, 32-wide BERT folder with its own small vocabulary."""
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_other(tmp_path_factory) -> Path:
    """A second random BERT with a different vocabulary (cased, other words), 3 layers, width 48."""
    words = [w.upper() for w in TINY_WORDS[::2]] + "alpha beta gamma delta tumour tumor".split()
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert_other"), words=words, layers=3, hidden=48,
                                 seed=1, lowercase=False)


@pytest.fixture(scope="module")
def models(tiny_bert):
    """One dual encoder per (pooling, normalize) setting, over the same tiny random BERT."""
    from leadkd.models import DualEncoder

    return {(pooling, normalize): DualEncoder.from_pretrained(tiny_bert, pooling=pooling, normalize=normalize)
            for pooling in ("cls", "mean") for normalize in (False, True)}


def make_tiny_beir(path: Path, docs: int = 24, queries: int = 12, seed: int = 0) -> Path:
    """A small BEIR folder of word-salad passages; query i is judged relevant to passage i (train and dev)."""
    import json
    import random

    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    words = TINY_WORDS
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(docs)]
    with open(path / "corpus.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with open(path / "queries.jsonl", "w") as f:
        for i in range(queries):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(texts[i].split()[:4])}) + "\n")
    (path / "qrels").mkdir(exist_ok=True)
    for split, rows in (("train", range(queries)), ("dev", range(queries // 2))):
        with open(path / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for i in rows:
                f.write(f"q{i}\td{i}\t1\n")
    return path


def make_tiny_groups(path: Path, queries: int = 12, docs: int = 24, negatives: int = 4, seed: int = 0) -> Path:
    """A training-groups file over :func:`make_tiny_beir`'s ids: query i, positive d_i, random negatives."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(queries):
            others = [f"d{j}" for j in range(docs) if j != i]
            f.write(json.dumps({"query_id": f"q{i}", "positives": [f"d{i}"],
                                "negatives": rng.sample(others, negatives)}) + "\n")
    return path


# -- a stand-in for the optional ir_datasets package ----------------------------------------------------
Doc = namedtuple("Doc", "doc_id text title")
Query = namedtuple("Query", "query_id text")
Judgment = namedtuple("Judgment", "query_id doc_id relevance iteration")


class FakeIrds:
    def __init__(self, docs, queries, qrels):
        self._d, self._q, self._r = docs, queries, qrels

    def has_docs(self): return bool(self._d)
    def has_queries(self): return bool(self._q)
    def has_qrels(self): return bool(self._r)
    def docs_iter(self): return iter(self._d)
    def queries_iter(self): return iter(self._q)
    def qrels_iter(self): return iter(self._r)


def fake_module(datasets: dict[str, FakeIrds]) -> types.ModuleType:
    module = types.ModuleType("ir_datasets")

    def load(name: str) -> FakeIrds:
        return datasets[name]  # the real one also raises KeyError for unknown ids

    module.load = load  # type: ignore[attr-defined]
    return module


# -- several gloo processes on this machine ----------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(worker, args: tuple, nprocs: int, timeout_s: float = 120.0) -> None:
    """``worker(rank, *args)`` in ``nprocs`` processes (fork where available: no re-import of torch), failed
    and killed when they outlive ``timeout_s`` so that a hung collective cannot hang the suite."""
    import time

    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if method == "fork":
        import torch._dynamo  # noqa: F401  DDP's first use imports it: once here, not once per child (~3 s)
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {nprocs} processes did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
