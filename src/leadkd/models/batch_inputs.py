"""A model's tokenisation of a training batch as a small picklable object, run ahead of the step.

Each kind tokenises its own view of the batch's text (that is what lets teacher and student differ in
tokenizer). Done inside the step, on the training process, it is host time the GPU waits for: a batch of
32 queries and 256 passages of 256 tokens costs ~0.2 s on one core, about a 12-layer teacher step's GPU
time on an H200. A :class:`BatchTokenizer` holds only what tokenising needs (the tokenizer and the kind's
settings, never the weights), so DataLoader workers run it on the next batches while the GPU runs this
one; the model's ``encode_batch(..., inputs=...)`` then starts from its tensors. The model's own
in-step tokenisation calls the same object, so both paths give the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..runtime.errors import LeadkdError


class BatchTokenizer(Protocol):
    """``(queries, passages) -> inputs``: CPU tensors (and host flags) a kind's ``encode_batch`` reads."""

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DualEncoderTokenizer:
    """A dual encoder's view: each side prefixed, truncated at its length and padded to its longest text;
    ``padded`` says on the host whether any text was padded (no padding: the backbone runs unmasked)."""

    tokenizer: Any
    query_prefix: str
    passage_prefix: str
    max_query_length: int
    max_passage_length: int

    def prepared(self, texts: Sequence[str], side: str) -> tuple[list[str], int]:
        """Texts with their side's prefix, and its length limit."""
        if side == "query":
            prefix, limit = self.query_prefix, self.max_query_length
        elif side == "passage":
            prefix, limit = self.passage_prefix, self.max_passage_length
        else:
            raise LeadkdError(f"unknown side {side!r}; choose 'query' or 'passage'")
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got one string")
        return ([prefix + text for text in texts] if prefix else list(texts)), limit

    def side(self, texts: Sequence[str], side: str) -> dict[str, Any]:
        """One side's tensors on the CPU, and ``padded``."""
        prepared, limit = self.prepared(texts, side)
        batch = self.tokenizer(prepared, padding=True, truncation=True, max_length=limit,
                               return_token_type_ids=False, return_tensors="np")
        return {"input_ids": torch.from_numpy(batch["input_ids"]),
                "attention_mask": torch.from_numpy(batch["attention_mask"]),
                "padded": bool(not batch["attention_mask"].all())}

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, Any]:
        return {"query": self.side(queries, "query"), "passage": self.side(passages, "passage")}


def inputs_to(inputs: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``inputs`` with every tensor on ``device`` (nested dicts kept; host flags as they are)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    if isinstance(inputs, Mapping):
        return {key: inputs_to(value, device, non_blocking) for key, value in inputs.items()}
    return inputs


@dataclass(frozen=True)
class ColBERTTokenizer:
    """A ColBERT's view: its [Q]/[D] markers in [CLS]'s place or right after it, queries padded with [MASK]
    to their full length (query expansion) and passages with [PAD] to the batch's longest."""

    tokenizer: Any
    insert_marker: bool  # after [CLS] (ColBERTv2, PyLate) instead of in its place
    query_length: int
    passage_length: int
    query_marker_id: int
    doc_marker_id: int
    mask_id: int
    pad_id: int
    query_expansion: bool
    attend_expansion: bool

    def marked_ids(self, texts: Sequence[str], max_length: int, marker_id: int) -> list[list[int]]:
        """Token ids with special tokens, truncated to ``max_length`` (keeping the final [SEP]), with the marker
        in [CLS]'s place, or inserted right after it (``insert_marker``, as ColBERTv2 and PyLate do: they
        tokenise one position shorter, then insert)."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got a single string")
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                                 max_length=max_length - 1 if self.insert_marker else max_length)
        rows = []
        for ids in encoded["input_ids"]:
            if not ids or ids[0] != self.tokenizer.cls_token_id:
                raise LeadkdError("ColBERT needs a tokenizer whose sequences start with its [CLS] token")
            rows.append([ids[0], marker_id] + list(ids[1:]) if self.insert_marker else [marker_id] + list(ids[1:]))
        return rows

    def _padded(self, rows: list[list[int]], width: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), width), fill, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids, mask

    def queries(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.marked_ids(texts, self.query_length, self.query_marker_id)
        expand = self.query_expansion
        width = self.query_length if expand else max((len(row) for row in rows), default=0)
        ids, mask = self._padded(rows, width, self.mask_id if expand else self.pad_id)
        if expand and self.attend_expansion:
            mask.fill_(1)
        return ids, mask

    def passages(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.marked_ids(texts, self.passage_length, self.doc_marker_id)
        return self._padded(rows, max((len(row) for row in rows), default=0), self.pad_id)

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, Any]:
        (q_ids, q_mask), (p_ids, p_mask) = self.queries(queries), self.passages(passages)
        return {"query": {"input_ids": q_ids, "attention_mask": q_mask},
                "passage": {"input_ids": p_ids, "attention_mask": p_mask}}


@dataclass(frozen=True)
class CrossEncoderTokenizer:
    """A cross-encoder's view: each query paired with every passage of its own group (query-major), a query
    that alone would fill ``max_length`` cut to half of it, the passage truncated, padded to the longest."""

    tokenizer: Any
    max_length: int
    feeds_token_types: bool

    def fitted_queries(self, queries: Sequence[str]) -> list[str]:
        """Queries cut to half the budget where they would leave no room for the passage (truncation is on
        the passage side only; a query that alone fills ``max_length`` would make the tokenizer raise)."""
        queries = list(queries)
        if not getattr(self.tokenizer, "is_fast", False):
            return queries
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)
        encoded = self.tokenizer(queries, add_special_tokens=False, return_offsets_mapping=True)
        fitted = []
        for query, offsets in zip(queries, encoded["offset_mapping"], strict=True):
            if len(offsets) >= budget:
                query = query[:offsets[max(1, budget // 2) - 1][1]]
            fitted.append(query)
        return fitted

    def pairs(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for aligned (query, passage) pairs, on the CPU."""
        if isinstance(queries, str) or isinstance(passages, str):
            raise TypeError("expected sequences of texts, got a single string")
        if len(queries) != len(passages):
            raise LeadkdError(f"{len(queries)} queries but {len(passages)} passages: pairs must align")
        encoded = self.tokenizer(self.fitted_queries(queries), list(passages), truncation="only_second",
                                 max_length=self.max_length, padding=True, return_tensors="pt",
                                 return_token_type_ids=self.feeds_token_types)
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if self.feeds_token_types:
            inputs["token_type_ids"] = encoded["token_type_ids"]
        return inputs

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, Any]:
        return {"pairs": self.pairs(group_queries(queries, passages), passages)}


def group_queries(queries: Sequence[str], passages: Sequence[str]) -> list[str]:
    """Each query repeated once per passage of its own group (``passages`` query-major, equal groups)."""
    num_queries, num_passages = len(queries), len(passages)
    if num_queries == 0 or num_passages == 0 or num_passages % num_queries:
        raise LeadkdError(f"a cross-encoder needs the same number of candidates for every query, listed "
                          f"query-major: got {num_passages} passages for {num_queries} queries")
    group = num_passages // num_queries
    return [query for query in queries for _ in range(group)]
