"""Dual encoder: one shared encoder for queries and passages, a pooled vector per layer, inner-product scores.

This is the paper's student (and DE teacher, ``--share_weight``): layer ``l``'s representation is the
pooled output of transformer block ``l`` ([CLS] by default, mean optional, L2-normalised optionally) and
its score is the inner product. Training uses :meth:`DualEncoder.layer_scores` (with autograd);
retrieval uses :meth:`DualEncoder.encode` (length-sorted, no autograd, NumPy out).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeadkdError
from ..fileio import atomic_directory
from .base import (block_outputs, freeze_pooler, load_backbone, num_blocks, pool, read_leadkd_config,
                   resolve_layers, resolve_model_path)
from .loading import read_st_settings, write_leadkd_config, write_st_metadata

Kind = Literal["query", "passage"]

POOLINGS = ("cls", "mean")

#: The paper's DE: [CLS], raw inner product (scale 1), no prefixes; queries 64 and passages 256 tokens.
DEFAULTS: dict[str, Any] = {
    "pooling": "cls",
    "normalize": False,
    "similarity_scale": 1.0,
    "query_prefix": "",
    "passage_prefix": "",
    "max_query_length": 64,
    "max_passage_length": 256,
}

#: Texts tokenised (and length-sorted) together by ``encode``; bounds memory on large corpora.
ENCODE_CHUNK = 16384

#: Padded tokens per batch in CPU inference. Measured on MiniLM-L6 (2 cores): 8 x 256 tokens ran ~15% faster
#: than 32 x 256 with both threads on one batch, because a small batch's activations stay in the CPU caches;
#: with one batch per core (``parallel_cpu_batches``) 4 x 256 is ~1.5% faster again than 8 x 256.
CPU_BATCH_TOKENS = 1024


def pair_scores(q_emb: torch.Tensor, p_emb: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-layer inner products of every query with every passage: ``[L,Q,d] x [L,P,d] -> [L,Q,P]``.

    A pure function so the trainer can score embeddings gathered from other processes; pass the model's
    ``similarity_scale`` as ``scale`` to get exactly its ``layer_scores``.
    """
    if q_emb.dim() != 3 or p_emb.dim() != 3 or q_emb.shape[0] != p_emb.shape[0] or q_emb.shape[2] != p_emb.shape[2]:
        raise ValueError(f"pair_scores needs [L,Q,d] and [L,P,d] tensors, got {tuple(q_emb.shape)} and "
                         f"{tuple(p_emb.shape)}")
    scores = torch.matmul(q_emb, p_emb.transpose(1, 2))
    return scores if scale == 1.0 else scores * scale


def _is_erf_gelu(module: Any) -> bool:
    """True for the exact (erf) GELU of BERT-family configs, the only activation the fusion reproduces."""
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    if type(module) is GELUActivation:
        return getattr(module, "act", None) is F.gelu
    return type(module) is nn.GELU and module.approximate == "none"


def _on_worker_threads(fn: Callable[[Any], None], items: Sequence[Any], workers: int, bf16: bool) -> None:
    """``fn(item)`` for every item, on ``workers`` threads that each run torch with one thread.

    Why: a batch's ops split over two cores spend part of each op synchronising; two batches side by
    side, one per core, keep both cores on GEMMs (+8% passages/s for MiniLM on this 2-core CPU). torch's
    thread count is process-wide, so it is 1 while this runs and restored after. Items are taken in order
    (the longest batches first), so the threads finish together. Inference mode and autocast are
    per-thread, hence entered in each worker.
    """
    from concurrent.futures import ThreadPoolExecutor

    def run(item: Any) -> None:
        with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                                      else contextlib.nullcontext()):
            fn(item)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(run, items):  # re-raises a worker's exception here
                pass
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def fused_cpu_inference(model: nn.Module) -> Iterator[int]:
    """Run BERT-style blocks' ``dense -> GELU`` and ``dense -> + residual`` as single oneDNN calls (eval only).

    Why: on CPU the separate GELU pass over the ``[tokens, 4d]`` activations, the residual add and the bias
    broadcast of each GEMM cost ~15% of a MiniLM forward; oneDNN applies them while the GEMM output is
    still in cache. The math is unchanged (exact erf GELU; dropout is skipped, as in eval mode); only some
    GEMMs' summation order differs (~1e-6). Modules are patched per instance and restored on exit, so
    training never sees the patch, and weights are re-packed on every entry, so they are never stale.
    Yields the number of patched modules (0 where oneDNN or a matching module is missing).
    """
    mkldnn = getattr(torch.ops, "mkldnn", None)
    linear = getattr(mkldnn, "_linear_pointwise", None)
    reorder = getattr(mkldnn, "_reorder_linear_weight", None)
    patched: list[nn.Module] = []
    try:
        if linear is not None and reorder is not None and torch.backends.mkldnn.is_available():
            for module in model.modules():
                dense = getattr(module, "dense", None)
                if not (isinstance(dense, nn.Linear) and dense.bias is not None and dense.weight.device.type == "cpu"
                        and dense.weight.dtype == torch.float32):
                    continue
                weight, bias = reorder(dense.weight.detach(), None), dense.bias.detach()
                if _is_erf_gelu(getattr(module, "intermediate_act_fn", None)):  # BertIntermediate and copies
                    module.forward = (lambda w, b: lambda hidden_states: linear(
                        hidden_states, w, b, "gelu", [], "none"))(weight, bias)
                elif type(module).__name__.endswith("Output") and isinstance(getattr(module, "LayerNorm", None),
                                                                              nn.LayerNorm):  # Bert(Self)Output
                    module.forward = (lambda w, b, norm: lambda hidden_states, input_tensor: norm(linear.binary(
                        hidden_states, input_tensor, w, b, "add")))(weight, bias, module.LayerNorm)
                else:
                    continue
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


class DualEncoder(nn.Module):
    """Shared-weight dual encoder over any Hugging Face ``AutoModel`` encoder."""

    #: Use :func:`fused_cpu_inference` in :meth:`encode` on CPU (after a one-off check against the plain model).
    fuse_cpu_ops: bool = True
    #: In :meth:`encode` on CPU, run batches side by side on as many threads as torch has, one torch thread
    #: each (see :func:`_on_worker_threads`).
    parallel_cpu_batches: bool = True

    kind = "dual_encoder"

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str = "cls", normalize: bool = False,
                 query_prefix: str = "", passage_prefix: str = "", max_query_length: int = 64,
                 max_passage_length: int = 256, similarity_scale: float = 1.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise LeadkdError(f"unknown pooling {pooling!r}; choose 'cls' or 'mean'")
        if isinstance(similarity_scale, bool) or not isinstance(similarity_scale, (int, float)) \
                or not similarity_scale > 0:
            raise LeadkdError(f"similarity_scale must be a positive number, got {similarity_scale!r}")
        positions = getattr(model.config, "max_position_embeddings", None)
        for name, value in (("max_query_length", max_query_length), ("max_passage_length", max_passage_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise LeadkdError(f"{name} must be an integer >= 2, got {value!r}")
            if isinstance(positions, int) and 0 < positions < value:
                raise LeadkdError(f"{name}={value} exceeds the model's {positions} positions")
        if tokenizer.pad_token_id is None:
            raise LeadkdError("the tokenizer has no padding token; set one before building a dual encoder")
        tokenizer.padding_side = "right"  # [CLS] pooling and per-batch trimming both need padding at the end
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.query_prefix = str(query_prefix)
        self.passage_prefix = str(passage_prefix)
        self.max_query_length = max_query_length
        self.max_passage_length = max_passage_length
        # Multiplies every score (training only; rankings and embeddings do not change). Cosine scores live
        # in [-1, 1], too flat for a softmax over candidates: sentence-transformers trains them at 20.
        self.similarity_scale = float(similarity_scale)
        freeze_pooler(model)  # its tanh head never reaches a DE score
        self.train(model.training)  # HF's from_pretrained gives eval mode; keep it (and dropout off)

    # ------------------------------------------------------------------------------------------------
    # construction, saving
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, pooling: str | None = None,
                        normalize: bool | None = None, query_prefix: str | None = None,
                        passage_prefix: str | None = None, max_query_length: int | None = None,
                        max_passage_length: int | None = None, similarity_scale: float | None = None,
                        trust_remote_code: bool = False, allow_partial: bool = False,
                        use_safetensors: bool = True) -> "DualEncoder":
        """Load an HF encoder; each ``None`` setting comes from leadkd_config.json, else ST metadata, else DEFAULTS.

        Loading is strict: missing, unexpected or mis-shaped encoder weights are refused unless
        ``allow_partial``; pickled weights need ``use_safetensors=False`` (see :func:`load_backbone`).
        """
        path = resolve_model_path(name_or_path)
        tokenizer, model = load_backbone(path, trust_remote_code=trust_remote_code, allow_partial=allow_partial,
                                         use_safetensors=use_safetensors)
        explicit = {"pooling": pooling, "normalize": normalize, "query_prefix": query_prefix,
                    "passage_prefix": passage_prefix, "max_query_length": max_query_length,
                    "max_passage_length": max_passage_length, "similarity_scale": similarity_scale}
        settings = {**DEFAULTS, **read_st_settings(path)}
        saved = read_leadkd_config(path) if os.path.isdir(path) else None
        if saved and saved.get("kind") == cls.kind:  # another kind's settings do not describe a DE
            settings.update({key: saved[key] for key in DEFAULTS if key in saved})
        # A default or inherited length never exceeds what the model can take (tiny or short-context models).
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        limit = min((x for x in limits if isinstance(x, int) and 0 < x < 1_000_000), default=None)
        for key in ("max_query_length", "max_passage_length"):
            if limit is not None and isinstance(settings[key], int):
                settings[key] = min(settings[key], limit)
        settings.update({key: value for key, value in explicit.items() if value is not None})
        return cls(model, tokenizer, **settings)

    def settings(self) -> dict[str, Any]:
        """The options that, with the weights, define this model (what ``leadkd_config.json`` stores)."""
        return {"pooling": self.pooling, "normalize": self.normalize, "query_prefix": self.query_prefix,
                "passage_prefix": self.passage_prefix, "max_query_length": self.max_query_length,
                "max_passage_length": self.max_passage_length, "similarity_scale": self.similarity_scale}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write weights (safetensors), tokenizer, leadkd config and ST metadata, atomically.

        ``SentenceTransformer(directory)`` then reproduces :meth:`encode` (ST applies the passage length
        limit to queries too).
        """
        with atomic_directory(directory) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_leadkd_config(tmp, self.kind, self.settings())
            write_st_metadata(tmp, hidden_size=self.hidden_size, pooling=self.pooling, normalize=self.normalize,
                              max_seq_length=self.max_passage_length, query_prefix=self.query_prefix,
                              passage_prefix=self.passage_prefix)

    # ------------------------------------------------------------------------------------------------
    # shape facts
    # ------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Transformer blocks, i.e. layers in the ``layer_scores`` numbering."""
        return num_blocks(self.model)

    @property
    def hidden_size(self) -> int:
        """Width of every layer's vector (no projection)."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------------
    # training side (autograd on)
    # ------------------------------------------------------------------------------------------------

    def _prepare(self, texts: Sequence[str], kind: str) -> tuple[list[str], int]:
        """Texts with their prefix, and the length limit of their kind."""
        if kind == "query":
            prefix, limit = self.query_prefix, self.max_query_length
        elif kind == "passage":
            prefix, limit = self.passage_prefix, self.max_passage_length
        else:
            raise LeadkdError(f"unknown text kind {kind!r}; choose 'query' or 'passage'")
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got one string")
        return ([prefix + text for text in texts] if prefix else list(texts)), limit

    def tokenize(self, texts: Sequence[str], kind: Kind) -> dict[str, torch.Tensor]:
        """Prefixed, truncated, batch-padded ``input_ids`` and ``attention_mask`` on the model's device."""
        prepared, limit = self._prepare(texts, kind)
        batch = self.tokenizer(prepared, padding=True, truncation=True, max_length=limit,
                               return_token_type_ids=False, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device)}

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                layer_ids: list[int] | None) -> torch.Tensor:
        """``[L', N, d]`` pooled (and normalised) vectors of the requested layers; last layer when None."""
        last_only = layer_ids is None or layer_ids == [self.num_layers - 1]
        hidden = block_outputs(self.model, input_ids, attention_mask, all_layers=not last_only)
        states = hidden if last_only else [hidden[i] for i in layer_ids]
        vectors = torch.stack([pool(h, attention_mask, self.pooling) for h in states])
        return F.normalize(vectors, p=2, dim=-1) if self.normalize else vectors

    def layer_embeddings(self, texts: Sequence[str], kind: Kind,
                         layers: Sequence[int] | None = None) -> torch.Tensor:
        """``[L', N, d]``: each requested layer's pooled vector (all layers when ``layers`` is None)."""
        layer_ids = resolve_layers(layers, self.num_layers)
        batch = self.tokenize(texts, kind)
        return self._pooled(batch["input_ids"], batch["attention_mask"], layer_ids)

    def layer_outputs(self, texts: Sequence[str], kind: Kind, layers: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Pooled vectors of ``layers`` plus every block's token states and the mask, from one forward.

        For the classical feature-distillation baseline, which compares token states directly.
        """
        layer_ids = resolve_layers(layers, self.num_layers)
        batch = self.tokenize(texts, kind)
        hidden = block_outputs(self.model, batch["input_ids"], batch["attention_mask"], all_layers=True)
        vectors = torch.stack([pool(hidden[i], batch["attention_mask"], self.pooling) for i in layer_ids])
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors, hidden, batch["attention_mask"]

    def layer_scores(self, queries: Sequence[str], passages: Sequence[str],
                     layers: Sequence[int] | None = None) -> torch.Tensor:
        """``[L', Q, P]`` inner products (cosine when normalised) of all pairs, times ``similarity_scale``;
        the last slice is the score."""
        return pair_scores(self.layer_embeddings(queries, "query", layers),
                           self.layer_embeddings(passages, "passage", layers), self.similarity_scale)

    def forward(self, queries: Sequence[str], passages: Sequence[str],
                layers: Sequence[int] | None = None) -> torch.Tensor:
        """Same as :meth:`layer_scores`, so a DistributedDataParallel wrapper sees a forward call."""
        return self.layer_scores(queries, passages, layers)

    # ------------------------------------------------------------------------------------------------
    # inference
    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                 max_batch_tokens: int | None) -> Iterator[np.ndarray]:
        """Consecutive slices of the length-sorted order: at most ``batch_size`` texts and, if given, at most
        ``max_batch_tokens`` padded tokens (short texts then travel in larger batches)."""
        start, total = 0, len(order)
        while start < total:
            count = batch_size
            if max_batch_tokens:  # the first text is the longest of the batch (descending order)
                count = max(1, min(count, max_batch_tokens // max(1, int(lengths[order[start]]))))
            yield order[start:start + count]
            start += count

    def _fusion_ok(self) -> bool:
        """Whether :func:`fused_cpu_inference` patches this model and reproduces it (checked once, in eval mode)."""
        verdict = getattr(self, "_fusion_verdict", None)
        if verdict is None:
            generator = torch.Generator().manual_seed(0)
            vocab = int(getattr(self.model.config, "vocab_size", 1000))
            ids = torch.randint(min(vocab, 1000) // 2, min(vocab, 1000), (2, 12), generator=generator)
            mask = torch.ones_like(ids)
            mask[1, 7:] = 0
            reference = block_outputs(self.model, ids, mask, all_layers=False)[-1]
            try:
                with fused_cpu_inference(self.model) as count:
                    fused = block_outputs(self.model, ids, mask, all_layers=False)[-1]
            except (RuntimeError, TypeError):  # a module that only looks like BERT's
                count, fused = 1, reference + float("inf")
            scale = max(1.0, float(reference.abs().max()))
            verdict = count > 0 and float((fused - reference).abs().max()) <= 1e-4 * scale
            if count > 0 and not verdict:
                warnings.warn("fused CPU inference does not reproduce this model; using the plain forward",
                              stacklevel=3)
            self._fusion_verdict = verdict
        return verdict

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], kind: Kind = "passage", batch_size: int = 128,
               show_progress: bool = False, bf16: bool = False, layers: Sequence[int] | None = None,
               max_batch_tokens: int | None = None) -> np.ndarray:
        """Embeddings as float32 ``[N, d]`` (``[L', N, d]`` with ``layers``), in input order.

        Texts are tokenised once per chunk and batched by descending *token* count, so each batch pads to
        its own longest text and little compute goes to padding. A batch holds at most ``batch_size`` texts
        and ``max_batch_tokens`` padded tokens (None: :data:`CPU_BATCH_TOKENS` on CPU, no limit elsewhere;
        0: no limit). The model runs in eval mode (its train/eval state is restored afterwards).
        """
        if batch_size < 1:
            raise LeadkdError(f"batch_size must be >= 1, got {batch_size}")
        prepared, limit = self._prepare(texts, kind)
        layer_ids = None if layers is None else resolve_layers(layers, self.num_layers)
        out_layers = 1 if layer_ids is None else len(layer_ids)
        out = np.empty((out_layers, len(prepared), self.hidden_size), dtype=np.float32)
        device = self.device
        if max_batch_tokens is None:
            max_batch_tokens = CPU_BATCH_TOKENS if device.type == "cpu" else 0
        was_training = self.training
        with contextlib.ExitStack() as stack:
            stack.callback(self.train, was_training)
            self.eval()
            if bf16:
                stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
            elif self.fuse_cpu_ops and device.type == "cpu" and len(prepared) > 0 and self._fusion_ok():
                stack.enter_context(fused_cpu_inference(self.model))
            progress = None
            if show_progress:
                from tqdm.auto import tqdm

                progress = stack.enter_context(tqdm(total=len(prepared), desc=f"encode {kind}s", unit="text"))
            lock = threading.Lock()
            for begin in range(0, len(prepared), ENCODE_CHUNK):
                chunk = prepared[begin:begin + ENCODE_CHUNK]
                # Right-padded to the chunk's longest text; each batch is cut to its own longest below.
                tokens = self.tokenizer(chunk, truncation=True, max_length=limit, padding=True,
                                        return_token_type_ids=False, return_tensors="np")
                input_ids = torch.from_numpy(tokens["input_ids"])
                attention = torch.from_numpy(tokens["attention_mask"])
                lengths = tokens["attention_mask"].sum(axis=1)
                order = np.argsort(-lengths, kind="stable")

                def encode_batch(rows: np.ndarray) -> None:  # every call returns within this chunk's loop
                    width = int(lengths[rows[0]])
                    index = torch.from_numpy(rows)
                    vectors = self._pooled(input_ids[index, :width].to(device), attention[index, :width].to(device),
                                           layer_ids)
                    out[:, begin + rows] = vectors.float().cpu().numpy()
                    if progress is not None:
                        with lock:
                            progress.update(len(rows))

                batches = list(self._batches(order, lengths, batch_size, max_batch_tokens))
                workers = torch.get_num_threads() if self.parallel_cpu_batches and device.type == "cpu" else 1
                if workers > 1 and len(batches) >= 2 * workers:
                    _on_worker_threads(encode_batch, batches, workers, bf16)
                else:
                    for rows in batches:
                        encode_batch(rows)
        return out[0] if layer_ids is None else out

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """:meth:`encode` with the query prefix and length."""
        return self.encode(texts, kind="query", **kwargs)

    def encode_passages(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """:meth:`encode` with the passage prefix and length."""
        return self.encode(texts, kind="passage", **kwargs)
