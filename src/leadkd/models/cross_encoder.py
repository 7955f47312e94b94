"""Cross-encoder as a LEAD model: one score head read out at every layer's [CLS].

The joint input is the tokenizer's pair encoding ``[CLS] query [SEP] passage [SEP]``, truncated on
the passage side. As in the LEAD paper's code (spec §2.2), a single head Linear(hidden, 1) scores the
[CLS] vector of *every* layer, t^l = wᵀ h^l_CLS + b; there are no per-layer heads. A cross-encoder
scores pairs, so the candidates of a query are its own group only (spec §2.3).

``use_token_type_ids=True`` (default) feeds the usual segment ids (query 0, passage 1); the paper's
code fed none, i.e. all zeros, which ``use_token_type_ids=False`` reproduces. Models without segment
embeddings (RoBERTa-like, ``type_vocab_size`` < 2; DistilBERT) never get them.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, LeadkdError
from ..fileio import atomic_directory
from .base import (freeze_pooler, load_backbone, loading_options, num_blocks, options_from_folder, position_limit,
                   read_leadkd_config, resolve_layers, resolve_model_path)
from .loading import write_leadkd_config

logger = logging.getLogger(__name__)

KIND = "cross_encoder"
#: Score head saved beside the backbone (keys ``weight`` [1, hidden] and ``bias`` [1]).
HEAD_FILE = "cross_encoder_head.safetensors"
#: Seed of the head's N(0, 0.02) initialisation when a folder has none (a plain HF checkpoint).
HEAD_SEED = 0


@dataclass(frozen=True)
class CrossEncoderOptions:
    """What a cross-encoder folder remembers in ``leadkd_config.json`` besides its weights."""

    max_length: int = 256
    use_token_type_ids: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 4:
            raise ConfigError(f"cross-encoder max_length must be an integer >= 4, got {self.max_length!r}")
        if not isinstance(self.use_token_type_ids, bool):
            raise ConfigError("cross-encoder use_token_type_ids must be true or false, "
                              f"got {self.use_token_type_ids!r}")


@dataclass
class GroupScores:
    """A cross-encoder's view of a batch: its scores ``[L', Q, G]`` of each query's own group, already
    final; there is nothing to gather (no query is scored against another process's passages)."""

    values: torch.Tensor

    def gathered(self, with_grad: bool) -> "GroupScores":
        return self

    def scores(self) -> torch.Tensor:
        return self.values


class CrossEncoder(nn.Module):
    """A reranker over any Hugging Face encoder, exposing the shared head's score at every layer.

    ``from_pretrained`` returns it in eval mode (as Hugging Face does); call ``.train()`` to train it.
    Calling the module is ``layer_scores`` (so DDP can wrap it).
    """

    kind = KIND
    scores_whole_batch = False

    def __init__(self, tokenizer, backbone: nn.Module, options: CrossEncoderOptions = CrossEncoderOptions(),
                 head: nn.Linear | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.options = options
        self.num_layers = num_blocks(backbone)
        freeze_pooler(backbone)
        hidden = backbone.config.hidden_size
        if head is None:
            head = _seeded_head(hidden)
        elif tuple(head.weight.shape) != (1, hidden) or head.bias is None:
            raise ConfigError(f"cross-encoder head must be Linear({hidden}, 1) with a bias")
        self.head = head
        limit = position_limit(tokenizer, backbone)
        self.max_length = options.max_length
        if limit is not None and self.max_length > limit:
            logger.warning("cross-encoder max_length=%d exceeds the model's %d positions; using %d",
                           self.max_length, limit, limit)
            self.max_length = limit
        accepts = "token_type_ids" in inspect.signature(backbone.forward).parameters
        self.feeds_token_types = (options.use_token_type_ids and accepts
                                  and getattr(backbone.config, "type_vocab_size", 0) >= 2)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, trust_remote_code: bool = False,
                        allow_partial: bool = False, use_safetensors: bool = True,
                        **overrides) -> "CrossEncoder":
        """Load a leadkd cross-encoder folder, or start one from any HF encoder (folder or hub name).

        ``overrides`` are :class:`CrossEncoderOptions` fields (``max_length``, ``use_token_type_ids``);
        given ones win over the folder's saved options, which win over the defaults. A folder without
        ``cross_encoder_head.safetensors`` (a plain HF checkpoint) gets a fresh head: weight N(0, 0.02)
        from seed :data:`HEAD_SEED`, bias 0; a saved cross-encoder folder that lost its head is refused
        unless ``allow_partial``. The backbone loads strictly (see :func:`~leadkd.models.base.load_backbone`
        for ``allow_partial`` and ``use_safetensors``).
        """
        location = resolve_model_path(path)
        options = options_from_folder(location, KIND, CrossEncoderOptions, overrides)
        tokenizer, backbone = load_backbone(location, trust_remote_code=trust_remote_code,
                                            allow_partial=allow_partial, use_safetensors=use_safetensors)
        file = Path(location) / HEAD_FILE
        head = _load_head(file, backbone.config.hidden_size) if file.is_file() else None
        if head is None:
            saved = read_leadkd_config(location) if os.path.isdir(location) else None
            if saved and saved.get("kind") == KIND and not allow_partial:
                raise LeadkdError(f"{location}: a saved cross-encoder without its score head ({HEAD_FILE}); "
                                  "restore the file, or load with allow_partial=True for a fresh head")
            logger.info("%s: no cross-encoder head (%s); starting a fresh one (N(0, 0.02), seed %d)",
                        location, HEAD_FILE, HEAD_SEED)
        return cls(tokenizer, backbone, options, head).eval()

    @classmethod
    def from_config(cls, config, path: str | None = None) -> "CrossEncoder":
        """From a :class:`~leadkd.config.ModelConfig`: the pair's length is ``max_passage_length``."""
        length = {"max_length": config.max_passage_length} if config.max_passage_length else {}
        segments = {} if config.token_type_ids is None else {"use_token_type_ids": config.token_type_ids}
        return cls.from_pretrained(path or config.path, **length, **segments, **loading_options(config))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write backbone (safetensors), tokenizer, head and settings; the folder appears whole or not at all."""
        from safetensors.torch import save_file

        with atomic_directory(path) as tmp:
            self.backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.head.state_dict().items()},
                      str(tmp / HEAD_FILE))
            write_leadkd_config(tmp, self.kind, self.settings())

    def settings(self) -> dict:
        """The options that, with the weights, define this model (what ``leadkd_config.json`` stores)."""
        return dataclasses.asdict(self.options)

    # ------------------------------------------------------------------ tokenisation
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _fit_queries(self, queries: Sequence[str]) -> list[str]:
        """Queries cut to half the budget where they would leave no room for the passage.

        Truncation is on the passage side only; a query that alone fills ``max_length`` would make that
        impossible (the tokenizer raises), so such a query is cut to half the budget first.
        """
        queries = list(queries)
        if not getattr(self.tokenizer, "is_fast", False):
            return queries
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)
        encoded = self.tokenizer(queries, add_special_tokens=False, return_offsets_mapping=True)
        fitted = []
        for query, offsets in zip(queries, encoded["offset_mapping"]):
            if len(offsets) >= budget:
                query = query[:offsets[max(1, budget // 2) - 1][1]]
            fitted.append(query)
        return fitted

    def tokenize_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for aligned (query, passage) pairs, padded to the longest pair."""
        if isinstance(queries, str) or isinstance(passages, str):
            raise TypeError("expected sequences of texts, got a single string")
        if len(queries) != len(passages):
            raise LeadkdError(f"{len(queries)} queries but {len(passages)} passages: pairs must align")
        encoded = self.tokenizer(self._fit_queries(queries), list(passages), truncation="only_second",
                                 max_length=self.max_length, padding=True, return_tensors="pt",
                                 return_token_type_ids=self.feeds_token_types)
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if self.feeds_token_types:
            inputs["token_type_ids"] = encoded["token_type_ids"]
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}

    # ------------------------------------------------------------------ scores
    def pair_layer_scores(self, queries: Sequence[str], passages: Sequence[str],
                          layers: Sequence[int] | None = None) -> torch.Tensor:
        """The head's score at each requested layer for aligned pairs: ``[L', N]``."""
        wanted = resolve_layers(layers, self.num_layers)
        everything = any(layer != self.num_layers - 1 for layer in wanted)
        outputs = self.backbone(**self.tokenize_pairs(queries, passages), output_hidden_states=everything,
                                return_dict=True)
        if everything:
            blocks = dict(enumerate(outputs.hidden_states[1:]))
        else:
            blocks = {self.num_layers - 1: outputs.last_hidden_state}
        cls_vectors = torch.stack([blocks[layer][:, 0] for layer in wanted])  # [L', N, hidden]
        return self.head(cls_vectors).squeeze(-1)

    def layer_scores(self, queries: Sequence[str], passages: Sequence[str],
                     layers: Sequence[int] | None = None) -> torch.Tensor:
        """Scores of each query's own G candidates at each requested layer: ``[L', Q, G]``.

        ``passages`` holds G candidates per query, query-major (query i's are ``passages[i*G:(i+1)*G]``).
        """
        num_queries, num_passages = len(queries), len(passages)
        if num_queries == 0 or num_passages == 0 or num_passages % num_queries:
            raise LeadkdError(f"a cross-encoder needs the same number of candidates for every query, listed "
                              f"query-major: got {num_passages} passages for {num_queries} queries")
        group = num_passages // num_queries
        repeated = [query for query in queries for _ in range(group)]
        scores = self.pair_layer_scores(repeated, passages, layers)
        return scores.view(scores.shape[0], num_queries, group)

    def forward(self, queries: Sequence[str], passages: Sequence[str],
                layers: Sequence[int] | None = None) -> torch.Tensor:
        return self.layer_scores(queries, passages, layers)

    def encode_batch(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int],
                     final: bool = False, raw_last_layer: bool = True) -> GroupScores:
        """The training view: the head's scores at ``layers`` (then the last layer, the score, with
        ``final``) of each query's own group, query-major as :meth:`layer_scores` takes them."""
        return GroupScores(self.layer_scores(queries, passages, list(layers) + ([self.num_layers - 1] if final else [])))

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """The ordinary cross-encoder score (last layer) of each query's own group: ``[Q, G]``."""
        return self.layer_scores(queries, passages, layers=[-1])[0]

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Final scores of aligned (query, passage) pairs for reranking, as float32 ``[N]``.

        Runs in eval mode under ``inference_mode``; pairs are batched by length to save padding.
        """
        if len(queries) != len(passages):
            raise LeadkdError(f"{len(queries)} queries but {len(passages)} passages: pairs must align")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]) + len(passages[i]))
        scores = np.empty(len(queries), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    chunk = order[start:start + batch_size]
                    batch = self.pair_layer_scores([queries[i] for i in chunk], [passages[i] for i in chunk], [-1])
                    scores[chunk] = batch[0].float().cpu().numpy()
        finally:
            self.train(was_training)
        return scores


def _seeded_head(hidden: int) -> nn.Linear:
    """A fresh score head as the paper's code builds it: weight N(0, 0.02), bias 0, from a fixed seed."""
    head = nn.Linear(hidden, 1)
    generator = torch.Generator().manual_seed(HEAD_SEED)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden, generator=generator) * 0.02)
        head.bias.zero_()
    return head


def _load_head(file: Path, hidden: int) -> nn.Linear:
    from safetensors.torch import load_file

    weights = load_file(str(file))
    weight, bias = weights.get("weight"), weights.get("bias")
    if weight is None or bias is None or tuple(weight.shape) != (1, hidden) or tuple(bias.shape) != (1,):
        raise LeadkdError(f"{file}: not a score head for hidden size {hidden} (need weight [1, {hidden}] and bias [1])")
    head = nn.Linear(hidden, 1)
    head.load_state_dict({"weight": weight, "bias": bias})
    return head
