"""Dual encoder: one shared encoder for queries and passages, a pooled vector per layer, inner-product scores.

This is the paper's student (and DE teacher, ``--share_weight``): layer ``l``'s representation is the
pooled output of transformer block ``l`` ([CLS] by default, mean optional, L2-normalised optionally) and
its score is the inner product. A sentence-transformers model's ``Dense`` projections (``dense``) belong
to its final embedding only, as ColBERT's projection does: the last layer's vector is
``normalize(dense_k(...dense_1(pool(h_L))))``, the model's own score, while every other layer stays its
pooled hidden states (normalised when the model normalises). When a projection changes the width, the
per-layer tensors are zero-padded to one common width, :attr:`DualEncoder.layer_width`, which leaves every
inner product and norm unchanged; ``encode`` without ``layers`` gives the final embedding at its own width.
Training uses :meth:`DualEncoder.layer_scores` (with autograd); retrieval uses :meth:`DualEncoder.encode`
(length-sorted, no autograd, NumPy out). The CPU speed-ups of inference and training live in
:mod:`leadkd.accel.cpu`, applied by whoever runs the model. sentence-transformers folders:
docs/teachers.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import distributed as dist
from ..runtime.errors import LeadkdError
from ..runtime.fileio import atomic_directory
from .base import (
    block_outputs,
    freeze_pooler,
    load_backbone,
    loading_options,
    num_blocks,
    pool,
    read_leadkd_config,
    resolve_layers,
    resolve_model_path,
)
from .batch_inputs import DualEncoderTokenizer, inputs_to
from .loading import read_st_dense, read_st_settings, write_leadkd_config, write_st_metadata
from .st_modules import DenseLayer, check_chain

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Side = Literal["query", "passage"]

POOLINGS = ("cls", "mean")

#: Texts tokenised (and length-sorted) together by ``encode``; bounds memory on large corpora.
ENCODE_CHUNK = 16384

#: Runs ``encode_batch(rows)`` over every batch of rows; :mod:`leadkd.accel.cpu` has a parallel one.
BatchRunner = Callable[[Callable[[np.ndarray], None], list], None]

#: Maps ``tokenize(chunk)`` over the chunks of texts, in order (default: the builtin ``map``, one after the
#: other); :mod:`leadkd.accel.cuda` tokenises the next chunk on a thread while the GPU runs this one.
ChunkTokenizer = Callable[[Callable[[list], Any], Iterator[list]], Iterator[Any]]


@dataclass(frozen=True)
class DualEncoderOptions:
    """What a dual-encoder folder remembers in ``leadkd_config.json`` besides its weights. The defaults are
    the paper's DE: [CLS], raw inner product (scale 1), no prefixes; queries 64 and passages 256 tokens."""

    pooling: str = "cls"
    normalize: bool = False
    similarity_scale: float = 1.0
    query_prefix: str = ""
    passage_prefix: str = ""
    max_query_length: int = 64
    max_passage_length: int = 256

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise LeadkdError(f"unknown pooling {self.pooling!r}; choose 'cls' or 'mean'")
        scale = self.similarity_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise LeadkdError(f"similarity_scale must be a positive number, got {scale!r}")
        for name in ("max_query_length", "max_passage_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise LeadkdError(f"{name} must be an integer >= 2, got {value!r}")
        object.__setattr__(self, "normalize", bool(self.normalize))
        object.__setattr__(self, "similarity_scale", float(scale))
        object.__setattr__(self, "query_prefix", str(self.query_prefix))
        object.__setattr__(self, "passage_prefix", str(self.passage_prefix))


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(DualEncoderOptions))


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


@dataclass
class DenseBatch:
    """A dual encoder's view of a batch: one pooled vector per layer and text, scored by inner products."""

    queries: torch.Tensor               # [L', Q, d]
    passages: torch.Tensor              # [L', P, d]
    scale: float = 1.0                  # the model's similarity scale (e.g. 20 for cosine models)
    states: tuple | None = None         # with_states: (query states, query mask, passage states, passage mask)

    def gathered(self, with_grad: bool) -> DenseBatch:
        passages = self.passages.transpose(0, 1).contiguous()
        if with_grad:
            passages = dist.gather_with_grad(passages)
        else:
            with torch.no_grad():
                passages = dist.gather_with_grad(passages.detach())
        return DenseBatch(self.queries, passages.transpose(0, 1), self.scale)

    def scores(self) -> torch.Tensor:
        return pair_scores(self.queries, self.passages, scale=self.scale)


class DualEncoder(nn.Module):
    """Shared-weight dual encoder over any Hugging Face ``AutoModel`` encoder (``backbone``)."""

    kind = "dual_encoder"
    scores_whole_batch = True

    def __init__(self, backbone: PreTrainedModel, tokenizer: Any, dense: Sequence[DenseLayer] = (), **options: Any):
        """``options``: :class:`DualEncoderOptions` fields (the paper's DE where not given); ``dense``: the
        sentence-transformers projections of the final embedding, in order (none: the paper's DE)."""
        super().__init__()
        self.options = DualEncoderOptions(**options)
        check_chain(dense, int(backbone.config.hidden_size))
        positions = getattr(backbone.config, "max_position_embeddings", None)
        for name in ("max_query_length", "max_passage_length"):
            value = getattr(self.options, name)
            if isinstance(positions, int) and 0 < positions < value:
                raise LeadkdError(f"{name}={value} exceeds the model's {positions} positions")
        if tokenizer.pad_token_id is None:
            raise LeadkdError("the tokenizer has no padding token; set one before building a dual encoder")
        tokenizer.padding_side = "right"  # [CLS] pooling and per-batch trimming both need padding at the end
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.dense = nn.ModuleList(dense)
        freeze_pooler(backbone)  # its tanh head never reaches a DE score
        self.train(backbone.training)  # HF's from_pretrained gives eval mode; keep it (and dropout off)

    def __getattr__(self, name: str) -> Any:
        """The options read as attributes (``model.pooling``, ``model.similarity_scale``, ...)."""
        options = self.__dict__.get("options")  # absent while a copy or unpickling builds the instance
        if options is not None and name in OPTION_NAMES:
            return getattr(options, name)
        return super().__getattr__(name)

    # ------------------------------------------------------------------------------------------------
    # construction, saving
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, pooling: str | None = None,
                        normalize: bool | None = None, query_prefix: str | None = None,
                        passage_prefix: str | None = None, max_query_length: int | None = None,
                        max_passage_length: int | None = None, similarity_scale: float | None = None,
                        trust_remote_code: bool = False, allow_partial: bool = False,
                        use_safetensors: bool = True) -> DualEncoder:
        """Load an HF encoder; each ``None`` setting comes from leadkd_config.json, else ST metadata, else the
        :class:`DualEncoderOptions` defaults.

        Loading is strict: missing, unexpected or mis-shaped encoder weights are refused unless
        ``allow_partial``; pickled weights need ``use_safetensors=False`` (see :func:`load_backbone`). The
        ``Dense`` modules of a sentence-transformers folder are loaded too (:func:`read_st_dense`), and a
        module leadkd cannot reproduce is refused in one line.
        """
        path = resolve_model_path(name_or_path)
        st_settings = read_st_settings(path)  # first: an unusable modules.json fails before any weight loads
        tokenizer, backbone = load_backbone(path, trust_remote_code=trust_remote_code, allow_partial=allow_partial,
                                            use_safetensors=use_safetensors)
        dense = read_st_dense(path, use_safetensors=use_safetensors)
        check_chain(dense, int(backbone.config.hidden_size), os.path.join(path, "modules.json"))
        explicit = {"pooling": pooling, "normalize": normalize, "query_prefix": query_prefix,
                    "passage_prefix": passage_prefix, "max_query_length": max_query_length,
                    "max_passage_length": max_passage_length, "similarity_scale": similarity_scale}
        settings = {**dataclasses.asdict(DualEncoderOptions()), **st_settings}
        saved = read_leadkd_config(path) if os.path.isdir(path) else None
        if saved and saved.get("kind") == cls.kind:  # another kind's settings do not describe a DE
            settings.update({key: saved[key] for key in OPTION_NAMES if key in saved})
        # A default or inherited length never exceeds what the model can take (tiny or short-context models).
        limits = [getattr(backbone.config, "max_position_embeddings", None),
                  getattr(tokenizer, "model_max_length", None)]
        limit = min((x for x in limits if isinstance(x, int) and 0 < x < 1_000_000), default=None)
        for key in ("max_query_length", "max_passage_length"):
            if limit is not None and isinstance(settings[key], int):
                settings[key] = min(settings[key], limit)
        settings.update({key: value for key, value in explicit.items() if value is not None})
        return cls(backbone, tokenizer, dense, **settings)

    @staticmethod
    def _config_overrides(config) -> dict[str, Any]:
        names = ("pooling", "normalize", "max_query_length", "max_passage_length", "similarity_scale")
        return {name: getattr(config, name, None) for name in names if getattr(config, name, None) is not None}

    @classmethod
    def from_config(cls, config, path: str | None = None) -> DualEncoder:
        """From a :class:`~leadkd.config.ModelConfig` (its unset fields come from the folder)."""
        return cls.from_pretrained(path or config.path, **cls._config_overrides(config), **loading_options(config))

    @classmethod
    def from_blocks(cls, teacher: nn.Module, layers: Sequence[int], config, keep_dense: bool = False) -> DualEncoder:
        """A student made of a subset of ``teacher``'s blocks (DistilBERT/PROD-style init), whatever the
        teacher's kind: its backbone and tokenizer; a dual-encoder teacher's settings too, under the
        config's.

        The student has no Dense projection, even when the teacher has one: the projection was trained on
        the teacher's last block, which a cut student does not have, and the paper's student has none.
        ``keep_dense=True`` copies the teacher's projections (e.g. when the teacher's last block is kept).
        """
        import copy

        from .surgery import keep_layers

        settings = teacher.settings() if isinstance(teacher, DualEncoder) else {}
        settings.update(cls._config_overrides(config))
        # The casts only name types torch's annotations lose: a ModuleList's items are plain modules to a type
        # checker (a dual encoder's ``dense`` holds DenseLayers), and every kind's backbone is a Hugging Face model.
        dense = (copy.deepcopy(cast("list[DenseLayer]", list(teacher.dense)))
                 if keep_dense and isinstance(teacher, DualEncoder) else ())
        return cls(keep_layers(cast("PreTrainedModel", teacher.backbone), layers), teacher.tokenizer, dense,
                   **settings)

    def settings(self) -> dict[str, Any]:
        """The options that, with the weights, define this model (what ``leadkd_config.json`` stores)."""
        return dataclasses.asdict(self.options)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write weights (safetensors), tokenizer, leadkd config and ST metadata, atomically.

        ``SentenceTransformer(directory)`` then reproduces :meth:`encode` (ST applies the passage length
        limit to queries too); Dense projections are written as ST's ``N_Dense`` modules.
        """
        with atomic_directory(directory) as tmp:
            self.backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_leadkd_config(tmp, self.kind, self.settings())
            write_st_metadata(tmp, hidden_size=self.hidden_size, pooling=self.pooling, normalize=self.normalize,
                              max_seq_length=self.max_passage_length, query_prefix=self.query_prefix,
                              passage_prefix=self.passage_prefix, dense=list(self.dense))

    # ------------------------------------------------------------------------------------------------
    # shape facts
    # ------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Transformer blocks, i.e. layers in the ``layer_scores`` numbering."""
        return num_blocks(self.backbone)

    @property
    def hidden_size(self) -> int:
        """Width of the encoder's hidden states: token states and pooled vectors before any projection."""
        return int(self.backbone.config.hidden_size)

    @property
    def embedding_size(self) -> int:
        """Width of the final embedding (what ``encode`` returns and an index holds): the last projection's."""
        return cast(DenseLayer, self.dense[-1]).out_features if len(self.dense) else self.hidden_size

    @property
    def layer_width(self) -> int:
        """Width of the per-layer tensors (``layer_embeddings``, ``encode(layers=...)``, a teacher cache):
        the wider of the hidden states and the final embedding, the narrower one zero-padded."""
        return max(self.hidden_size, self.embedding_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ------------------------------------------------------------------------------------------------
    # training side (autograd on)
    # ------------------------------------------------------------------------------------------------

    def batch_tokenizer(self) -> DualEncoderTokenizer:
        """This model's tokenisation as a picklable object (:mod:`~leadkd.models.batch_inputs`), for workers."""
        return DualEncoderTokenizer(self.tokenizer, self.query_prefix, self.passage_prefix, self.max_query_length,
                                    self.max_passage_length)

    def tokenize(self, texts: Sequence[str], side: Side) -> dict[str, Any]:
        """Prefixed, truncated, batch-padded ``input_ids`` and ``attention_mask`` on the model's device, and
        ``padded``: whether any text was padded, known here on the host (see :func:`prepared_mask`)."""
        return inputs_to(self.batch_tokenizer().side(texts, side), self.device)

    def _layer_vectors(self, states: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                       layer_ids: list[int] | None) -> torch.Tensor:
        """``[L', N, d]`` from each requested layer's token states: pooled, the last layer through the Dense
        projections, normalised if the model normalises; ``d`` is :attr:`layer_width` (zero-padded), or the
        final embedding's own width when ``layer_ids`` is None (the final embedding alone)."""
        last = self.num_layers - 1
        vectors = []
        for layer, hidden in zip([last] if layer_ids is None else layer_ids, states, strict=True):
            vector = pool(hidden, attention_mask, self.pooling)
            if layer == last:
                for projection in self.dense:
                    vector = projection(vector)
            if self.normalize:
                vector = F.normalize(vector, p=2, dim=-1)
            if layer_ids is not None and vector.shape[-1] < self.layer_width:
                vector = F.pad(vector, (0, self.layer_width - vector.shape[-1]))
            vectors.append(vector)
        return torch.stack(vectors)

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                layer_ids: list[int] | None, padded: bool = True) -> torch.Tensor:
        """``[L', N, d]`` vectors of the requested layers (see :meth:`_layer_vectors`); final embedding when None.
        ``padded`` False: no text of the batch was padded, so the backbone runs without a mask."""
        last_only = layer_ids is None or layer_ids == [self.num_layers - 1]
        hidden = block_outputs(self.backbone, input_ids, attention_mask if padded else None,
                               all_layers=not last_only)
        # layer_ids is a list whenever last_only is False (mypy cannot follow the condition through last_only)
        states = hidden if last_only else [hidden[i] for i in cast("list[int]", layer_ids)]
        return self._layer_vectors(states, attention_mask, layer_ids)

    def layer_embeddings(self, texts: Sequence[str], side: Side,
                         layers: Sequence[int] | None = None) -> torch.Tensor:
        """``[L', N, layer_width]``: each requested layer's pooled vector (all layers when ``layers`` is None);
        the last layer's is the final embedding (after any Dense projection)."""
        layer_ids = resolve_layers(layers, self.num_layers)
        batch = self.tokenize(texts, side)
        return self._pooled(batch["input_ids"], batch["attention_mask"], layer_ids, batch["padded"])

    def layer_outputs(self, texts: Sequence[str], side: Side, layers: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Pooled vectors of ``layers`` plus every block's token states and the mask, from one forward.

        For the classical feature-distillation baseline, which compares token states directly.
        """
        layer_ids = resolve_layers(layers, self.num_layers)
        batch = self.tokenize(texts, side)
        hidden = block_outputs(self.backbone, batch["input_ids"], batch["attention_mask"] if batch["padded"] else None,
                               all_layers=True)
        vectors = self._layer_vectors([hidden[i] for i in layer_ids], batch["attention_mask"], layer_ids)
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

    def encode_batch(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int],
                     final: bool = False, raw_last_layer: bool = True, with_states: bool = False,
                     inputs: dict[str, Any] | None = None) -> DenseBatch:
        """The training view: pooled vectors of ``layers`` (then of the last layer, the score, with
        ``final``); ``with_states`` adds every block's token states for the hidden-state baseline.
        ``inputs``: the texts already tokenised by :meth:`batch_tokenizer` (on any device), else done here."""
        layers = list(layers) + ([self.num_layers - 1] if final else [])
        if inputs is not None and not with_states:
            layer_ids = resolve_layers(layers, self.num_layers)
            q, p = (inputs_to(inputs[side], self.device, non_blocking=True) for side in ("query", "passage"))
            return DenseBatch(self._pooled(q["input_ids"], q["attention_mask"], layer_ids, q["padded"]),
                              self._pooled(p["input_ids"], p["attention_mask"], layer_ids, p["padded"]),
                              self.similarity_scale)
        if with_states:
            q_vectors, q_states, q_mask = self.layer_outputs(queries, "query", layers)
            p_vectors, p_states, p_mask = self.layer_outputs(passages, "passage", layers)
            return DenseBatch(q_vectors, p_vectors, self.similarity_scale, (q_states, q_mask, p_states, p_mask))
        return DenseBatch(self.layer_embeddings(queries, "query", layers),
                          self.layer_embeddings(passages, "passage", layers), self.similarity_scale)

    def vectors_batch(self, queries: torch.Tensor, passages: torch.Tensor) -> DenseBatch:
        """The training view of vectors computed elsewhere (a teacher cache)."""
        return DenseBatch(queries, passages, self.similarity_scale)

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

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], side: Side = "passage", batch_size: int = 128,
               show_progress: bool = False, bf16: bool = False, layers: Sequence[int] | None = None,
               max_batch_tokens: int = 0, run_batches: BatchRunner | None = None,
               tokenize_chunks: ChunkTokenizer | None = None, chunk_size: int = ENCODE_CHUNK) -> np.ndarray:
        """Embeddings as float32 ``[N, embedding_size]`` (``[L', N, layer_width]`` with ``layers``), in input order.

        Texts are tokenised once per chunk and batched by descending *token* count, so each batch pads to
        its own longest text and little compute goes to padding. A batch holds at most ``batch_size`` texts
        and, if set, ``max_batch_tokens`` padded tokens. ``run_batches(encode_batch, batches)`` runs the
        batches (default: one after the other; :func:`leadkd.accel.cpu.encode` runs them side by side), and
        ``tokenize_chunks(tokenize, chunks)`` tokenises the chunks of ``chunk_size`` texts (default: ``map``).
        The model runs in eval mode (its train/eval state is restored afterwards).
        """
        if batch_size < 1 or chunk_size < 1:
            raise LeadkdError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
        prepared, limit = self.batch_tokenizer().prepared(texts, side)
        layer_ids = None if layers is None else resolve_layers(layers, self.num_layers)
        out_layers = 1 if layer_ids is None else len(layer_ids)
        width = self.embedding_size if layer_ids is None else self.layer_width
        out = np.empty((out_layers, len(prepared), width), dtype=np.float32)
        device = self.device
        was_training = self.training
        with contextlib.ExitStack() as stack:
            stack.callback(self.train, was_training)
            self.eval()
            if bf16:
                stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
            progress = None
            if show_progress:
                from tqdm.auto import tqdm

                progress = stack.enter_context(tqdm(total=len(prepared), desc=f"encode {side}s", unit="text"))
            lock = threading.Lock()

            def tokenize(chunk: list[str]) -> tuple[np.ndarray, np.ndarray]:
                # Right-padded to the chunk's longest text; each batch is cut to its own longest below.
                tokens = self.tokenizer(chunk, truncation=True, max_length=limit, padding=True,
                                        return_token_type_ids=False, return_tensors="np")
                return tokens["input_ids"], tokens["attention_mask"]

            chunks = (prepared[start:start + chunk_size] for start in range(0, len(prepared), chunk_size))
            begin = 0
            for ids, mask in (map if tokenize_chunks is None else tokenize_chunks)(tokenize, chunks):
                input_ids, attention = torch.from_numpy(ids), torch.from_numpy(mask)
                lengths = mask.sum(axis=1)
                order = np.argsort(-lengths, kind="stable")

                def encode_batch(rows: np.ndarray) -> None:  # every call returns within this chunk's loop
                    # B023 (noqa below): run_batches returns only once every batch is done, so before the loop
                    # moves on to the next chunk and rebinds the names this closure reads.
                    width = int(lengths[rows[0]])  # noqa: B023
                    index = torch.from_numpy(rows)
                    vectors = self._pooled(input_ids[index, :width].to(device),  # noqa: B023
                                           attention[index, :width].to(device), layer_ids)  # noqa: B023
                    out[:, begin + rows] = vectors.float().cpu().numpy()  # noqa: B023
                    if progress is not None:
                        with lock:
                            progress.update(len(rows))

                batches = list(self._batches(order, lengths, batch_size, max_batch_tokens))
                if run_batches is None:
                    for rows in batches:
                        encode_batch(rows)
                else:
                    run_batches(encode_batch, batches)
                begin += len(ids)
        return out[0] if layer_ids is None else out

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """:meth:`encode` with the query prefix and length."""
        return self.encode(texts, side="query", **kwargs)

    def encode_passages(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """:meth:`encode` with the passage prefix and length."""
        return self.encode(texts, side="passage", **kwargs)
