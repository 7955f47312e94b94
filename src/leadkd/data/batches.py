"""Training groups sampled into batches of text: one step's queries, positives and negatives.

Batches carry text: teacher and student each tokenise their own view of the same passages, which is what
makes the distillation "liberal". With ``tokenizers`` those views are made in the loader (in its worker
processes, ahead of the step) and travel with the batch as ``inputs``. Every random choice is keyed by seed, epoch
and item, so a resumed or multi-process run draws exactly what one uninterrupted process would.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..runtime.errors import LeadkdError
from .groups import TrainingGroups


@dataclass
class GroupSample:
    """One group as sampled for a step: the query and ``1 + n`` passages, the positive first."""

    query_id: str
    query: str
    passage_ids: list[str]
    passages: list[str]
    teacher_scores: np.ndarray | None = None
    positive_ids: tuple[str, ...] = ()  # every judged positive of the query, not only the one sampled
    group: int = -1  # the group's row in the groups file
    #: each passage's position in the group's ``positives + negatives`` (a teacher score file's columns)
    columns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def sample_group(groups: TrainingGroups, g: int, negatives: int, rng: np.random.Generator,
                 random_positive: bool = False, negative_pool: int | None = None) -> GroupSample:
    """The paper's TraditionDataset item: first (or a random) positive, then ``negatives`` shuffled negatives.

    The negatives are shuffled and the first ``negatives`` taken; a group with fewer cycles through its
    shuffled list (each negative then appears ``floor`` or ``ceil`` of ``negatives / available`` times).
    ``negative_pool`` draws only from the group's first that many mined negatives (those a teacher score
    file holds).
    """
    pos, neg = groups.positive_keys(g), groups.negative_keys(g)
    if negative_pool is not None:
        neg = neg[:negative_pool]
    p = int(rng.integers(len(pos))) if random_positive else 0
    if negatives > 0:
        if len(neg) == 0:
            raise LeadkdError(f"group {g} (query {groups.query_id(g)!r}) has no negatives to sample")
        order = np.resize(rng.permutation(len(neg)), negatives)
    else:
        order = np.zeros(0, dtype=np.int64)
    keys = [int(pos[p])] + [int(neg[j]) for j in order]
    scores = groups.teacher_scores(g)
    if scores is not None:
        scores = np.concatenate([scores[p:p + 1], scores[len(pos) + order]]).astype(np.float32)
    return GroupSample(groups.query_id(g), groups.query_text(g), [groups.passage_id(k) for k in keys],
                       [groups.passage(k) for k in keys], scores, tuple(groups.passage_id(k) for k in pos), g,
                       np.concatenate([[p], len(pos) + order]).astype(np.int64))


class GroupDataset(Dataset):
    """Groups as a map-style dataset whose items are :class:`GroupSample` of ``1 + negatives`` passages.

    An item's randomness depends only on ``(seed, epoch, group)``, never on worker or visit order, so a
    resumed run (or any number of DataLoader workers) draws the same negatives. Pass the epoch either by
    :meth:`set_epoch` or, robust to persistent workers, as keys ``(epoch, index)`` from :class:`EpochSampler`.
    Groups without negatives are left out when ``negatives > 0``, as in the paper (``skipped`` counts them).
    """

    def __init__(self, groups: TrainingGroups, negatives: int, seed: int = 0, random_positive: bool = False,
                 negative_pool: int | None = None):
        if negatives < 0:
            raise LeadkdError(f"negatives must be >= 0, got {negatives}")
        if seed < 0:
            raise LeadkdError(f"seed must be >= 0, got {seed}")
        self.groups = groups
        self.negatives = negatives
        self.seed = seed
        self.random_positive = random_positive
        self.negative_pool = negative_pool
        self.epoch = 0
        counts = groups.num_negatives() if negative_pool is None else np.minimum(groups.num_negatives(), negative_pool)
        self._rows = np.flatnonzero(counts > 0) if negatives > 0 else np.arange(len(groups))
        self.skipped = len(groups) - len(self._rows)
        if len(self._rows) == 0:
            raise LeadkdError(f"none of the {len(groups)} training groups has a negative to sample")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: int | tuple[int, int]) -> GroupSample:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        g = int(self._rows[index])
        rng = np.random.default_rng([self.seed, int(epoch), g])
        return sample_group(self.groups, g, self.negatives, rng, self.random_positive, self.negative_pool)


@dataclass
class GroupBatch:
    """B groups flattened query-major: passages ``[i*(1+n) : (i+1)*(1+n)]`` are query i's positive then negatives.

    ``labels[i] = i * group_size`` is query i's positive among all ``B * group_size`` passages (whole-batch
    candidates); for own-group scoring (cross-encoder) the positive is column 0. ``positive_ids[i]``: every
    judged positive of query i, so a positive of i that sits in another group is not taken for a negative.
    ``groups[i]`` is query i's row in the groups file and ``columns[i]`` its passages' positions in that
    group's ``positives + negatives``: where a teacher score file holds their scores.
    """

    query_ids: list[str]
    queries: list[str]
    passage_ids: list[str]
    passages: list[str]
    labels: torch.Tensor
    group_size: int
    teacher_scores: torch.Tensor | None = None
    positive_ids: list[tuple[str, ...]] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    columns: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    #: each model's tokenisation of this batch, by model name, made ahead by :class:`TokenizingCollate`
    #: (packed into one buffer on its way from a worker: read it through :meth:`model_inputs`)
    inputs: Any = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def negatives(self) -> int:
        return self.group_size - 1

    def to(self, device: str | torch.device) -> GroupBatch:
        teacher = None if self.teacher_scores is None else self.teacher_scores.to(device)
        return GroupBatch(self.query_ids, self.queries, self.passage_ids, self.passages, self.labels.to(device),
                          self.group_size, teacher, self.positive_ids, self.groups, self.columns, self.inputs)

    def model_inputs(self, name: str) -> Any:
        """Model ``name``'s tokenised view of this batch, or None where the loader made none for it."""
        inputs = self.inputs.unpacked() if isinstance(self.inputs, Packed) else self.inputs
        return inputs.get(name)

    def pin_memory(self) -> GroupBatch:
        """The DataLoader's ``pin_memory=True`` hook: the tokenised inputs in page-locked memory (one buffer),
        so each model's copy to the GPU (``non_blocking``) overlaps the work queued before it."""
        if not isinstance(self.inputs, Packed):
            return self
        return dataclasses.replace(self, inputs=Packed(self.inputs.flat.pin_memory(), self.inputs.skeleton))


@dataclass(frozen=True)
class Packed:
    """Every integer tensor of a nested dict of model inputs in one flat buffer, and the dict with
    ``(offset, shape)`` in their places: a batch made in a DataLoader worker crosses to the training process
    as one shared-memory tensor, not one per tensor (each costs ~0.5 ms of the training process's time)."""

    flat: torch.Tensor
    skeleton: Any

    @classmethod
    def of(cls, tree: Any) -> Packed:
        tensors: list[torch.Tensor] = []

        def place(value: Any, offset: list[int]) -> Any:
            if isinstance(value, torch.Tensor):
                tensors.append(value.reshape(-1).to(torch.int64))
                spot = (offset[0], tuple(value.shape))
                offset[0] += value.numel()
                return spot
            if isinstance(value, dict):
                return {key: place(item, offset) for key, item in value.items()}
            return value

        skeleton = place(tree, [0])
        flat = torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.int64)
        return cls(flat, skeleton)

    def unpacked(self) -> Any:
        """The dict again, each tensor a view of the flat buffer (no copy)."""
        def take(value: Any) -> Any:
            if isinstance(value, tuple):
                offset, shape = value
                size = int(np.prod(shape)) if shape else 1
                return self.flat[offset:offset + size].view(shape)
            if isinstance(value, dict):
                return {key: take(item) for key, item in value.items()}
            return value

        return take(self.skeleton)


@dataclass(frozen=True)
class TokenizingCollate:
    """:func:`collate_groups`, then each model's own tokenisation of the batch's text (``tokenizers``: model
    name -> ``(queries, passages) -> inputs``, e.g. a model's ``batch_tokenizer()``), packed into one buffer
    (:class:`Packed`). As a DataLoader's ``collate_fn`` with workers, that host work runs in the worker
    processes, ahead of the step."""

    tokenizers: dict[str, Callable[[list[str], list[str]], Any]]

    def __call__(self, samples: Sequence[GroupSample]) -> GroupBatch:
        batch = collate_groups(samples)
        batch.inputs = Packed.of({name: tokenize(batch.queries, batch.passages)
                                  for name, tokenize in self.tokenizers.items()})
        return batch


def collate_groups(samples: Sequence[GroupSample]) -> GroupBatch:
    """``DataLoader`` ``collate_fn``: samples of equal size into one :class:`GroupBatch`."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    size = len(samples[0].passages)
    if any(len(s.passages) != size for s in samples):
        raise ValueError("all groups of a batch must have the same number of passages")
    with_scores = [s.teacher_scores is not None for s in samples]
    if any(with_scores) and not all(with_scores):
        raise ValueError("teacher scores are present for some groups of the batch but not all")
    # With all(with_scores), every sample's teacher_scores is an array (mypy cannot see it through the list).
    teacher = (torch.from_numpy(np.stack(cast("list[np.ndarray]", [s.teacher_scores for s in samples])))
               if all(with_scores) else None)
    return GroupBatch(
        query_ids=[s.query_id for s in samples],
        queries=[s.query for s in samples],
        passage_ids=[p for s in samples for p in s.passage_ids],
        passages=[p for s in samples for p in s.passages],
        labels=torch.arange(len(samples), dtype=torch.long) * size,
        group_size=size,
        teacher_scores=teacher,
        positive_ids=[s.positive_ids or (s.passage_ids[0],) for s in samples],
        groups=[s.group for s in samples],
        columns=torch.from_numpy(np.stack([s.columns for s in samples])),
    )


class EpochSampler(Sampler):
    """Wraps a sampler (e.g. ``DistributedSampler``) to yield ``(epoch, index)`` keys for :class:`GroupDataset`.

    ``set_epoch`` reaches both the wrapped sampler's order and the dataset's negative draws; because the
    epoch travels with each key, it also reaches DataLoader workers that keep a stale dataset copy.
    """

    def __init__(self, sampler: Sampler, epoch: int = 0):
        self.sampler = sampler
        self.epoch = epoch
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.sampler:
            yield epoch, int(index)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def group_loader(dataset: GroupDataset, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, num_workers: int = 0,
                 tokenizers: dict[str, Callable[[list[str], list[str]], Any]] | None = None,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader of :class:`GroupBatch`: this rank's shard of a seeded shuffle, re-drawn per epoch.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch. Batches are a function of
    ``(seed, epoch, rank, world_size)`` only, so a resumed run can skip to its step and see the same data,
    whatever ``num_workers`` (each item's draws are keyed by its epoch and group, never by a worker).
    ``tokenizers``: each model's tokenisation, done in the collate (:class:`TokenizingCollate`); with
    workers, they stay alive across epochs (the epoch travels with each key).
    """
    if batch_size < 1:
        raise LeadkdError(f"batch size must be >= 1, got {batch_size}")
    base: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                       seed=seed, drop_last=drop_last)
    # Its own generator: a DataLoader iterator otherwise draws a seed from torch's global RNG, which would
    # shift dropout masks between a straight run and a resumed one.
    collate: Callable[[Sequence[GroupSample]], GroupBatch] = TokenizingCollate(tokenizers) if tokenizers \
        else collate_groups
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(base), collate_fn=collate,
                      drop_last=drop_last, num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      worker_init_fn=_single_threaded_tokenizers if num_workers else None)


def _single_threaded_tokenizers(worker_id: int) -> None:
    """In each loader worker: tokenise on one thread (the workers together are the parallelism), which also
    keeps the fast tokenizers' warning about a fork after parallel use quiet; the training process keeps
    its own setting for the tokenising it still does (dev evaluation)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
