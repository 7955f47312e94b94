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
