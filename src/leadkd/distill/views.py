"""How each model kind turns a batch of texts into per-layer scores during training.

Training needs one step more than ``layer_scores``: with several processes, each one encodes its own
queries and passages, the passage side is gathered from every process (autograd-aware, so gradients
reach the process that owns each passage), and only then is everything scored. This module holds that
split — ``encode`` (what a DistributedDataParallel wrapper calls as ``forward``), ``gather``, ``score``
— once per kind, so the trainer itself never asks what kind of model it holds.

    dual encoder   encode → pooled vectors ``[L', N, d]``; gather passages; inner products
    ColBERT        encode → token states per layer + passage mask; gather both (padded); MaxSim
    cross-encoder  encode → scores ``[L', Q, G]`` of each query's own group; nothing to gather
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..models.colbert import maxsim_scores
from ..models.dual_encoder import pair_scores
from .losses import duplicate_positive_mask, group_labels, own_group_scores


@dataclass
class Encoded:
    """One model's view of a batch, for the layers it was asked for."""

    queries: object = None          # DE: [L', Q, d]; ColBERT: list of [Q, Tq, d_l]
    passages: object = None         # DE: [L', P, d]; ColBERT: list of [P, Tp, d_l]
    passage_mask: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # cross-encoder: [L', Q, G] directly
    scale: float = 1.0                  # dual encoder: its similarity scale (e.g. 20 for cosine models)
    states: tuple | None = None         # with_states: (query states, query mask, passage states, passage mask)


class EncodeForward(nn.Module):
    """Wraps a model so that one ``forward`` encodes a whole batch — the call DDP needs to see.

    What it returns covers the requested ``layers`` in the model's *layer view* (what LEAD's layer loss
    scores), then, with ``final``, one more slice: the model's ordinary score (what the ground-truth and
    response terms score). The two differ only for ColBERT's last layer: raw block output in the layer
    view, as in the paper's code (``raw_last_layer``; False scores it normalised/projected there too).
    """

    def __init__(self, model: nn.Module, raw_last_layer: bool = True):
        super().__init__()
        self.model = model
        self.raw_last_layer = raw_last_layer

    def forward(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int],
                with_states: bool = False, final: bool = False) -> Encoded:
        model, kind = self.model, self.model.kind
        if kind == "colbert":
            q_states, _ = model.query_layer_states(queries, layers, raw_last=self.raw_last_layer, final=final)
            p_states, p_mask = model.passage_layer_states(passages, layers, raw_last=self.raw_last_layer,
                                                          final=final)
            return Encoded(queries=q_states, passages=p_states, passage_mask=p_mask)
        layers = list(layers) + ([model.num_layers - 1] if final else [])  # the last layer is the score
        if kind == "dual_encoder" and with_states:  # token states too, for the hidden-state MSE baseline
            q_vectors, q_states, q_mask = model.layer_outputs(queries, "query", layers)
            p_vectors, p_states, p_mask = model.layer_outputs(passages, "passage", layers)
            return Encoded(queries=q_vectors, passages=p_vectors, scale=model.similarity_scale,
                           states=(q_states, q_mask, p_states, p_mask))
        if kind == "dual_encoder":
            return Encoded(queries=model.layer_embeddings(queries, "query", layers),
                           passages=model.layer_embeddings(passages, "passage", layers),
                           scale=model.similarity_scale)
        if kind == "cross_encoder":
            return Encoded(scores=model.layer_scores(queries, passages, layers))
        raise TypeError(f"no training view for model kind {kind!r}")


def gathers_candidates(kind: str) -> bool:
    """Whether a kind scores every query against the whole batch (DE, ColBERT) or its own group (CE)."""
    return kind != "cross_encoder"


def gather_passages(encoded: Encoded, kind: str, with_grad: bool) -> Encoded:
    """Passages of every process (this process's slice in its rank's place); queries stay local."""
    if not dist.is_distributed() or not gathers_candidates(kind):
        return encoded
    gather = dist.gather_with_grad if with_grad else _gather_no_grad
    if kind == "dual_encoder":
        passages = gather(encoded.passages.transpose(0, 1).contiguous()).transpose(0, 1)
        return Encoded(queries=encoded.queries, passages=passages, scale=encoded.scale)
    # ColBERT: sequence lengths differ per process, so pad to the longest before gathering; the mask
    # travels with the states (the paper's code gathered states but kept the local mask: spec §7.4-1).
    mask = dist.gather_padded(encoded.passage_mask.unsqueeze(-1).float(), pad_value=0.0, dim=1).squeeze(-1) > 0
    states = [dist.gather_padded(s if with_grad else s.detach(), pad_value=0.0, dim=1) for s in encoded.passages]
    return Encoded(queries=encoded.queries, passages=states, passage_mask=mask)


def _gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dist.gather_with_grad(tensor.detach())


def score(encoded: Encoded, kind: str) -> torch.Tensor:
    """``[L', Q, C]`` scores of the encoded (and gathered) batch."""
    if kind == "dual_encoder":
        return pair_scores(encoded.queries, encoded.passages, scale=encoded.scale)
    if kind == "colbert":
        return torch.stack([maxsim_scores(q, p, encoded.passage_mask)
                            for q, p in zip(encoded.queries, encoded.passages)])
    return encoded.scores


def duplicate_positives(batch, gathered: bool, own_group: bool = False, query_offset: int = 0) -> torch.Tensor | None:
    """``[B, C]`` mask of the copies of each local query's judged positives among its candidates, on the CPU,
    or None when there are none (see :func:`~leadkd.distill.losses.duplicate_positive_mask`).

    ``gathered``: the candidates are every process's passages (their ids, plain strings, are gathered
    here; no gradient involved), and the local queries' labels start at ``query_offset``. ``own_group``:
    cut to each query's own group, as the scores were.
    """
    size, count = batch.group_size, len(batch.queries)
    ids = list(batch.passage_ids)
    if gathered:
        ids = [pid for part in dist.all_gather_object(ids) for pid in part]
    mask = duplicate_positive_mask(batch.positive_ids, ids, group_labels(count, size, query_offset=query_offset))
    if own_group:
        mask = own_group_scores(mask, size, query_offset)
    return mask if bool(mask.any()) else None
