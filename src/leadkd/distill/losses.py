"""LEAD's losses as pure functions of score tensors.

Every retriever hands the trainer ``layer_scores -> [num_layers, Q, C]``: row q holds query q's scores
over its candidate set C(q), the last slice is the model's ordinary score. Everything here works on
such tensors (or their ``[Q, C]`` final slice), the label column of each query and the chosen
``(student_layer, teacher_layer)`` pairs. No function sees a model, a tokenizer or a width, which is
what lets teacher and student differ in all of them (the "liberal" in LEAD).

Conventions (spec §2.4): ``log P = log_softmax(scores)`` with no temperature; a *target* distribution
is ``softmax(scores / tau)``, so the temperature only ever touches the side used as the target. KL
terms are ``batchmean``: summed over queries and candidates, divided by the number of queries.
Half-precision scores are upcast to float32 inside each loss, so bf16/fp16 scores from autocast are safe.

The one exception is :class:`HiddenStateMSE`, the classical token-aligned feature baseline LEAD argues
against; it needs hidden states and one shared tokenizer, and says so when that is not the case.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from ..config.layer_strategy import Pair
from ..runtime.errors import ConfigError, LeadkdError

__all__ = [
    "contrastive_loss", "kl_distillation", "response_kl_loss", "margin_mse_loss", "layer_distillation_loss",
    "lead_total_loss", "group_labels", "own_group_scores", "duplicate_positive_mask", "mask_candidates",
    "HiddenStateMSE", "check_same_tokenizer",
]


# --------------------------------------------------------------------------- validation helpers

def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_labels(labels: Tensor, num_queries: int, num_candidates: int) -> None:
    """Shape always; values only on CPU, since reading a GPU tensor's values would stall the step."""
    if labels.dim() != 1 or labels.shape[0] != num_queries:
        raise LeadkdError(f"labels must have shape [{num_queries}] (one label column per query), "
                          f"got {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise LeadkdError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device.type == "cpu" and num_queries:
        values = labels.numpy()  # a host tensor's values, through numpy: this can never wait for a device
        if values.min() < 0 or values.max() >= num_candidates:
            raise LeadkdError(f"labels must lie in 0..{num_candidates - 1} (the candidate columns), "
                              f"got values {values.min()}..{values.max()}")


def _check_matrix(name: str, scores: Tensor) -> None:
    if scores.dim() != 2:
        raise LeadkdError(f"{name} must be a [Q, C] score matrix, got shape {list(scores.shape)}")


def _check_same_shape(teacher: Tensor, student: Tensor) -> None:
    if teacher.shape != student.shape:
        raise LeadkdError(f"teacher and student scores must cover the same queries and candidates: "
                          f"teacher {list(teacher.shape)}, student {list(student.shape)}")


def _check_pairs(pairs: Sequence[Pair], student_layers: int, teacher_layers: int) -> list[Pair]:
    if not pairs:
        raise LeadkdError("no layer pairs given; to train without the layer loss, leave it out instead")
    checked = []
    for pair in pairs:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            raise LeadkdError(f"layer pair {pair!r} is not a (student_layer, teacher_layer) pair of integers")
        student, teacher = pair
        if not (0 <= student < student_layers and 0 <= teacher < teacher_layers):
            raise LeadkdError(
                f"layer pair (student {student}, teacher {teacher}) is out of range: the student has "
                f"{student_layers} layers (0..{student_layers - 1}) and the teacher {teacher_layers} "
                f"(0..{teacher_layers - 1})")
        checked.append((student, teacher))
    return checked


# --------------------------------------------------------------------------- building blocks

def _fp(scores: Tensor) -> Tensor:
    """Half-precision scores in float32 (softmax over many candidates needs it); float64 stays float64."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def _kl_batchmean(target_scores: Tensor, input_scores: Tensor, temperature: float) -> Tensor:
    """KL(softmax(target/tau) || softmax(input)) per ``[Q, C]`` matrix, batchmean; shape ``[...]``.

    Written out rather than ``F.kl_div`` so that a stack ``[K, Q, C]`` gives one batchmean per slice,
    and so that a masked candidate (score -inf on the target side) adds 0 instead of NaN.
    """
    target_logp = torch.log_softmax(_fp(target_scores) / temperature, dim=-1)
    input_logp = torch.log_softmax(_fp(input_scores), dim=-1)
    target_p = target_logp.exp()
    log_ratio = torch.where(target_p > 0, target_logp - input_logp, 0.0)
    return (target_p * log_ratio).sum(dim=-1).mean(dim=-1)


def _cross_entropy(scores: Tensor, labels: Tensor) -> Tensor:
    """Mean over queries of -log_softmax(scores)[label], for ``[..., Q, C]``; shape ``[...]``."""
    logp = torch.log_softmax(_fp(scores), dim=-1)
    index = labels.to(device=scores.device, dtype=torch.long).view(*([1] * (scores.dim() - 2)), -1, 1)
    picked = logp.gather(-1, index.expand(*scores.shape[:-1], 1)).squeeze(-1)
    return -picked.mean(dim=-1)


# --------------------------------------------------------------------------- final-layer losses

def contrastive_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """Ground-truth cross-entropy: each query's softmax over its candidates against its label column.

    Args:
        scores: ``[Q, C]`` (a scalar loss comes back) or ``[L, Q, C]`` (one loss per layer, ``[L]``,
            handy for reporting every layer's own retrieval quality).
        labels: ``[Q]`` integer column of each query's positive (see :func:`group_labels`).
    """
    if scores.dim() not in (2, 3):
        raise LeadkdError(f"scores must be [Q, C] or [L, Q, C], got shape {list(scores.shape)}")
    _check_labels(labels, scores.shape[-2], scores.shape[-1])
    return _cross_entropy(scores, labels)


def kl_distillation(target_scores: Tensor, input_scores: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(target/tau) || softmax(input)), batchmean: the student's distribution learns the target's.

    The temperature softens the *target* only; the input side is never tempered (spec §2.4), so with
    ``tau > 1`` the student is asked to produce a flatter distribution, exactly as the paper's code does.
    Gradient flows into both sides unless the caller detaches the target.

    Args:
        target_scores, input_scores: ``[Q, C]`` (scalar result) or ``[..., Q, C]`` (one KL per matrix).
    """
    _check_positive("temperature", temperature)
    _check_same_shape(target_scores, input_scores)
    if target_scores.dim() < 2:
        raise LeadkdError(f"scores must be [Q, C], got shape {list(target_scores.shape)}")
    return _kl_batchmean(target_scores, input_scores, temperature)


def response_kl_loss(teacher: Tensor, student: Tensor, temperature: float = 1.0, symmetric: bool = False,
                     detach_teacher_targets: bool = False) -> Tensor:
    """Response (final-score) distillation: KL(teacher -> student), plus KL(student -> teacher) if symmetric.

    ``symmetric=True`` is what the paper's code does when the teacher is trained (spec §2.5-3): the
    teacher then also learns from the student. ``detach_teacher_targets`` stops gradient through the
    teacher *where it is the target*; in the reverse term the teacher is the input and always gets
    gradient, and the student's target side is left undetached, as in the paper's code.

    Args:
        teacher, student: final-layer scores ``[Q, C]`` over the same candidates.
    """
    _check_matrix("teacher scores", teacher)
    _check_matrix("student scores", student)
    _check_same_shape(teacher, student)
    _check_positive("temperature", temperature)
    target = teacher.detach() if detach_teacher_targets else teacher
    loss = _kl_batchmean(target, student, temperature)
    if symmetric:
        loss = loss + _kl_batchmean(student, teacher, temperature)
    return loss


def margin_mse_loss(teacher: Tensor, student: Tensor, labels: Tensor, detach_teacher_targets: bool = False,
                    candidate_mask: Tensor | None = None) -> Tensor:
    """MarginMSE (Hofstätter et al. 2020): match the student's positive-minus-negative margins to the teacher's.

    For each query, margin_j = score[label] - score[j] for every other candidate j (in-batch ones too);
    the loss is the mean squared difference of student and teacher margins over all Q·(C-1) pairs.
    Margins ignore a per-query shift, like a softmax, but are matched in raw score units, so the
    student must also copy the teacher's score scale.

    Args:
        teacher, student: ``[Q, C]`` scores over the same candidates; ``C >= 2``.
        labels: ``[Q]`` positive column of each query.
        candidate_mask: optional ``[Q, C]`` bool, True for candidates left out of query q's margins
            (see :func:`duplicate_positive_mask`); the scores there must still be finite.
    """
    _check_matrix("teacher scores", teacher)
    _check_matrix("student scores", student)
    _check_same_shape(teacher, student)
    num_queries, num_candidates = student.shape
    if num_candidates < 2:
        raise LeadkdError("MarginMSE needs at least one negative per query (C >= 2)")
    _check_labels(labels, num_queries, num_candidates)
    if detach_teacher_targets:
        teacher = teacher.detach()
    index = labels.to(device=student.device, dtype=torch.long).unsqueeze(1)

    def margins(scores: Tensor) -> Tensor:
        scores = _fp(scores)
        return scores.gather(1, index) - scores

    # The label column's margin is exactly 0 on both sides, so summing over all C columns and dividing
    # by C-1 is the mean over the negatives, without a boolean mask (which would sync a GPU).
    squared = (margins(student) - margins(teacher)).pow(2)
    if candidate_mask is None:
        return squared.sum() / (num_queries * (num_candidates - 1))
    kept = (~candidate_mask.to(device=squared.device, dtype=torch.bool)).to(squared.dtype)
    return (squared * kept).sum() / (kept.sum() - num_queries).clamp(min=1.0)


# --------------------------------------------------------------------------- LEAD's layer loss

def _layer_terms(teacher_scores: Tensor, student_scores: Tensor, labels: Tensor, pairs: Sequence[Pair],
                 temperature: float, detach_teacher_targets: bool) -> tuple[Tensor, Tensor]:
    """Per pair k: D_k = KL(teacher[a_k] -> student[b_k]) and the teacher layer's own CE ell_k (no grad)."""
    for name, scores in (("teacher", teacher_scores), ("student", student_scores)):
        if scores.dim() != 3:
            raise LeadkdError(f"{name} layer scores must be [num_layers, Q, C], got shape {list(scores.shape)}")
    if teacher_scores.shape[1:] != student_scores.shape[1:]:
        raise LeadkdError(f"teacher and student layer scores must cover the same queries and candidates: "
                          f"teacher [Q, C] = {list(teacher_scores.shape[1:])}, "
                          f"student [Q, C] = {list(student_scores.shape[1:])}")
    _check_labels(labels, teacher_scores.shape[1], teacher_scores.shape[2])
    checked = _check_pairs(pairs, student_scores.shape[0], teacher_scores.shape[0])
    _check_positive("temperature", temperature)

    teacher_sel = torch.stack([teacher_scores[t] for _, t in checked])   # [K, Q, C]
    student_sel = torch.stack([student_scores[s] for s, _ in checked])   # [K, Q, C]
    targets = teacher_sel.detach() if detach_teacher_targets else teacher_sel
    pair_kl = _kl_batchmean(targets, student_sel, temperature)           # [K]
    with torch.no_grad():  # ell only sets the weights, which are constants (spec §2.5-4)
        teacher_ce = _cross_entropy(teacher_sel.detach(), labels)        # [K], un-tempered
    return pair_kl, teacher_ce


def _pair_weights(teacher_ce: Tensor, layer_temperature: float, reweight: bool, weight: float) -> Tensor:
    """Per-pair multipliers: softmax(-ell / tau_l) when re-weighting, else ``weight`` for every pair."""
    if reweight:
        return torch.softmax(-teacher_ce / layer_temperature, dim=0)
    return torch.full_like(teacher_ce, float(weight))


def _weighted_layer_loss(teacher_scores: Tensor, student_scores: Tensor, labels: Tensor, pairs: Sequence[Pair],
                         layer_temperature: float, temperature: float, reweight: bool, weight: float,
                         detach_teacher_targets: bool, reduce_teacher_ce: Callable[[Tensor], Tensor] | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The layer loss with what a trainer logs: ``(loss, weights, per-pair KL, teacher layer CE)``."""
    _check_positive("layer_temperature", layer_temperature)
    pair_kl, teacher_ce = _layer_terms(teacher_scores, student_scores, labels, pairs, temperature,
                                       detach_teacher_targets)
    if reduce_teacher_ce is not None:
        teacher_ce = reduce_teacher_ce(teacher_ce)
    weights = _pair_weights(teacher_ce, layer_temperature, reweight, weight)
    return (weights * pair_kl).sum(), weights, pair_kl, teacher_ce


def layer_distillation_loss(
    teacher_scores: Tensor,
    student_scores: Tensor,
    labels: Tensor,
    pairs: Sequence[Pair],
    layer_temperature: float = 10.0,
    temperature: float = 1.0,
    reweight: bool = True,
    weight: float = 1.0,
    detach_teacher_targets: bool = False,
) -> tuple[Tensor, Tensor]:
    """LEAD's layer loss: each chosen student layer's score distribution learns its teacher layer's.

    For pair k = (b_k, a_k) (student layer, teacher layer):
        D_k    = KL(softmax(teacher[a_k] / tau) || softmax(student[b_k]))         batchmean
        ell_k  = cross-entropy of teacher layer a_k against the labels (no temperature)
        w      = softmax(-ell / layer_temperature)                                  no gradient
        loss   = sum_k w_k D_k                  if reweight (the paper's setting; ``weight`` is ignored,
                                                as the paper's code ignores its layer-loss weight then)
               = weight * sum_k D_k             otherwise (the ablation)
    Re-weighting favours teacher layers that already rank the positive well.

    Gradient: by default the teacher's targets are *not* detached, so a trained teacher's layers are
    also pulled toward the student's - the paper's code does this (spec §2.7, §7.4-4) and its numbers
    come from it. ``detach_teacher_targets=True`` stops that. The weights never carry gradient.

    Args:
        teacher_scores: ``[Lt, Q, C]`` teacher layer scores.
        student_scores: ``[Ls, Q, C]`` student layer scores over the same queries and candidates.
        labels: ``[Q]`` positive column of each query.
        pairs: ``(student_layer, teacher_layer)`` index pairs (see :mod:`leadkd.distill.layers`).

    Returns:
        ``(loss, weights)``: a scalar and the ``[K]`` per-pair multipliers, so that always
        ``loss == (weights * D).sum()``: the softmax weights (summing to 1) when re-weighting,
        else ``weight`` repeated K times (all ones by default).
    """
    loss, weights, _, _ = _weighted_layer_loss(teacher_scores, student_scores, labels, pairs, layer_temperature,
                                               temperature, reweight, weight, detach_teacher_targets)
    return loss, weights


def lead_total_loss(
    teacher_scores: Tensor,
    student_scores: Tensor,
    labels: Tensor,
    pairs: Sequence[Pair] | None,
    train_teacher: bool = True,
    response: str = "kl",
    temperature: float = 1.0,
    layer_temperature: float = 10.0,
    reweight: bool = True,
    student_weight: float = 1.0,
    teacher_weight: float = 1.0,
    response_weight: float = 1.0,
    layer_weight: float = 1.0,
    detach_teacher_targets: bool = False,
    reduce_layer_ce: Callable[[Tensor], Tensor] | None = None,
    candidate_mask: Tensor | None = None,
    student_ce_scores: Tensor | None = None,
    student_ce_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """The whole LEAD objective of spec §2.5, term by term, from both models' layer scores.

    loss = student_weight * CE(student final)
         + teacher_weight * CE(teacher final)                [only if train_teacher]
         + response_weight * (KL(T -> S) + KL(S -> T))        [reverse KL only if train_teacher]
         + layer loss (:func:`layer_distillation_loss`; ``layer_weight`` only acts with reweight=False)

    The final layer is the last slice of each tensor. ``pairs`` None or empty leaves the layer term out
    (response-only KD). ``response`` picks the response term: ``"kl"`` (LEAD), ``"margin_mse"`` (the
    MarginMSE baseline in place of the KL pair) or ``"none"``. Both tensors must share one candidate
    layout: for a cross-encoder teacher, cut the student's in-batch scores to each query's own group
    first (:func:`own_group_scores`).

    Returns a dict of tensors: ``loss`` (what to backpropagate), ``student_ce``, ``teacher_ce`` (always
    reported; detached and not in ``loss`` when the teacher is frozen), ``response_kl`` (the response
    term, whichever it is), ``layer_kl`` (the layer loss), and, detached for logging, ``layer_weights``,
    ``layer_pair_kl`` and ``teacher_layer_ce`` (``[K]`` each, empty without pairs).

    ``reduce_layer_ce`` maps this process's per-pair teacher CE to the value the weights are built from;
    in multi-process training it averages ell over processes (each process holds a slice of the queries),
    so every process uses the weights one process would compute on the whole batch.

    ``candidate_mask`` (``[Q, C]`` bool, see :func:`duplicate_positive_mask`) leaves candidates out of
    query q's distributions in both models, every layer and every term.

    ``student_ce_scores`` / ``student_ce_labels`` (``[Q, C']`` and ``[Q]``, masked by the caller) give the
    student's ground-truth term its own candidates, when the distillation terms compare over fewer (each
    query's own group, ``loss.teacher_candidates: own_group``): the student keeps its in-batch negatives.
    """
    for name, scores in (("teacher", teacher_scores), ("student", student_scores)):
        if scores.dim() != 3:
            raise LeadkdError(f"{name} layer scores must be [num_layers, Q, C], got shape {list(scores.shape)}")
    _check_same_shape(teacher_scores[-1], student_scores[-1])
    raw_finals = teacher_scores[-1], student_scores[-1]  # MarginMSE needs finite scores: it masks its own way
    if candidate_mask is not None:
        teacher_scores, student_scores = mask_candidates(teacher_scores, candidate_mask), mask_candidates(
            student_scores, candidate_mask)
    student_final, teacher_final = student_scores[-1], teacher_scores[-1]

    if student_ce_scores is None:
        student_ce = contrastive_loss(student_final, labels)
    else:
        if student_ce_labels is None:
            raise LeadkdError("student_ce_scores need their own student_ce_labels")
        student_ce = contrastive_loss(student_ce_scores, student_ce_labels)
    teacher_ce = contrastive_loss(teacher_final, labels)
    if not train_teacher:
        teacher_ce = teacher_ce.detach()
    if response == "kl":
        response_term = response_kl_loss(teacher_final, student_final, temperature=temperature,
                                         symmetric=train_teacher, detach_teacher_targets=detach_teacher_targets)
    elif response == "margin_mse":
        response_term = margin_mse_loss(*raw_finals, labels, detach_teacher_targets=detach_teacher_targets,
                                        candidate_mask=candidate_mask)
    elif response == "none":
        response_term = _fp(student_final).new_zeros(())
    else:
        raise ConfigError(f"unknown response loss {response!r}; choose 'kl', 'margin_mse' or 'none'")
    total = student_weight * student_ce + response_weight * response_term
    if train_teacher:
        total = total + teacher_weight * teacher_ce

    empty = _fp(student_final).new_zeros(0)
    if pairs:
        layer, weights, pair_kl, layer_ce = _weighted_layer_loss(
            teacher_scores, student_scores, labels, pairs, layer_temperature, temperature, reweight, layer_weight,
            detach_teacher_targets, reduce_layer_ce)
        total = total + layer
        pair_kl_log = pair_kl.detach()
    else:
        layer = _fp(student_final).new_zeros(())
        weights = layer_ce = pair_kl_log = empty
    return {
        "loss": total, "student_ce": student_ce, "teacher_ce": teacher_ce, "response_kl": response_term,
        "layer_kl": layer, "layer_weights": weights, "layer_pair_kl": pair_kl_log, "teacher_layer_ce": layer_ce,
    }


# --------------------------------------------------------------------------- candidate layouts (§2.3)

def group_labels(num_queries: int, group_size: int, in_batch: bool = True, query_offset: int = 0,
                 device: torch.device | str | None = None) -> Tensor:
    """Label column of each query's positive for the two candidate layouts of spec §2.3.

    Candidates are laid out query-major in groups of ``group_size`` (positive first, then its hard
    negatives). With ``in_batch`` (DE/ColBERT: every query sees the whole batch) query i's positive sits
    at column (query_offset + i) * group_size; ``query_offset`` places a process's local queries inside
    a gathered candidate list. Without it (cross-encoder: own group only) every label is 0.
    """
    if num_queries < 0 or group_size < 1 or query_offset < 0:
        raise LeadkdError(f"need num_queries >= 0, group_size >= 1 and query_offset >= 0, got "
                          f"{num_queries}, {group_size}, {query_offset}")
    if not in_batch:
        return torch.zeros(num_queries, dtype=torch.long, device=device)
    return (torch.arange(num_queries, device=device) + query_offset) * group_size


def own_group_scores(scores: Tensor, group_size: int, query_offset: int = 0) -> Tensor:
    """Cut in-batch scores ``[..., Q, N*G]`` down to each query's own group ``[..., Q, G]``.

    This is the cross-encoder rule (spec §2.3): a CE scores only a query's own candidates, so the
    student's scores must be cut to the same set - which also removes the student's in-batch negatives,
    as in the paper's code. Labels then are all 0 (``group_labels(..., in_batch=False)``).
    """
    if scores.dim() < 2 or group_size < 1:
        raise LeadkdError(f"need scores [..., Q, C] and group_size >= 1, got shape {list(scores.shape)} "
                          f"and group_size {group_size}")
    num_queries, num_candidates = scores.shape[-2:]
    if num_candidates % group_size or (query_offset + num_queries) * group_size > num_candidates:
        raise LeadkdError(f"{num_candidates} candidates are not groups of {group_size} covering queries "
                          f"{query_offset}..{query_offset + num_queries - 1}")
    starts = (torch.arange(num_queries, device=scores.device) + query_offset) * group_size
    index = starts.unsqueeze(1) + torch.arange(group_size, device=scores.device)    # [Q, G]
    return scores.gather(-1, index.expand(*scores.shape[:-1], group_size))


def duplicate_positive_mask(positive_ids: Sequence[Collection[str]], candidate_ids: Sequence[str],
                            labels: Tensor) -> Tensor:
    """``[Q, C]`` bool: True where candidate c is one of query q's judged positives, other than its label.

    In-batch candidates come from every query's group, so query i's positive (or another of its judged
    positives) can also sit in query j's group, as j's positive or a hard negative. Left in, that copy
    counts as a *negative* for i: its score equals the positive's, so even a perfect model keeps
    P(positive) <= 1/2 and its loss >= log 2. The paper's code has this flaw; masking the copies (score
    -inf in both models' distributions, :func:`mask_candidates`) removes it.

    Args:
        positive_ids: for each of the Q queries, the ids of all its judged positives.
        candidate_ids: the id of each of the C candidate columns (the gathered batch's passages).
        labels: ``[Q]`` label column of each query; never masked.
    """
    if len(positive_ids) != labels.shape[0]:
        raise LeadkdError(f"{len(positive_ids)} queries' positives for {labels.shape[0]} labels")
    columns: dict[str, list[int]] = {}
    for column, pid in enumerate(candidate_ids):
        columns.setdefault(pid, []).append(column)
    rows, cols = [], []
    for query, ids in enumerate(positive_ids):
        hits = {column for pid in set(ids) for column in columns.get(pid, ())}
        rows += [query] * len(hits)
        cols += sorted(hits)
    mask = torch.zeros(len(positive_ids), len(candidate_ids), dtype=torch.bool)
    mask[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = True
    mask[torch.arange(len(positive_ids)), labels.cpu().long()] = False
    return mask.to(labels.device)


def mask_candidates(scores: Tensor, candidate_mask: Tensor) -> Tensor:
    """``scores`` (``[..., Q, C]``) with masked candidates at -inf: they leave every softmax over C(q).

    The losses here handle -inf exactly: the masked candidate has probability 0 on both sides, adds 0 to
    every KL and cross-entropy and gets zero gradient. A query's label column must stay unmasked.
    """
    if candidate_mask.shape != scores.shape[-2:]:
        raise LeadkdError(f"candidate mask {list(candidate_mask.shape)} does not fit scores {list(scores.shape)}")
    return scores.masked_fill(candidate_mask.to(device=scores.device, dtype=torch.bool), float("-inf"))


# --------------------------------------------------------------------------- the feature baseline

_PROBE_TEXT = "Hello World, the DNA-test of 12.5 mg costs €3; ÜBER-café résumé!"


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Raise unless both tokenizers turn text into the same ids (same vocabulary, same splitting).

    Token-aligned hidden-state MSE compares position t of the teacher with position t of the student;
    that only means something when both read the same tokens.
    """
    hint = "; use LEAD's layer-score loss instead, which compares score distributions and needs no shared tokenizer"
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        common = len(set(teacher_vocab.items()) & set(student_vocab.items()))
        raise LeadkdError(f"hidden-state MSE needs teacher and student to share one tokenizer, but their "
                          f"vocabularies differ ({len(teacher_vocab)} teacher tokens, {len(student_vocab)} student "
                          f"tokens, {common} identical entries){hint}")
    if teacher_tokenizer(_PROBE_TEXT)["input_ids"] != student_tokenizer(_PROBE_TEXT)["input_ids"]:
        raise LeadkdError("hidden-state MSE needs teacher and student to share one tokenizer, but theirs split "
                          f"the same text differently (for example one lower-cases and the other does not){hint}")


class HiddenStateMSE(nn.Module):
    """Classical feature distillation: MSE between projected student hidden states and teacher ones.

    This is the baseline LEAD argues against (spec §2.8): it needs the teacher's hidden states, a
    learned projection student_dim -> teacher_dim, and - token-level - one shared tokenizer so that
    position t means the same token on both sides (check with :func:`check_same_tokenizer`).

    Projections: one ``Linear(student_dim, teacher_dim)`` per student layer (a fixed pairing gives one
    per pair; re-sampled pairs keep using the student layer's own), or a single shared one.

    Inputs of :meth:`forward`: ``student_hidden`` / ``teacher_hidden`` are per-layer sequences (a list
    such as ``block_outputs(...)`` or a stacked tensor) indexed by the pairs' layer numbers. Each entry
    is either
      * ``[N, T, d]`` token states: with ``pooling=None`` compared token by token (T and padding must
        match; masked positions are skipped); with ``pooling="cls"`` / ``"mean"`` first pooled per side
        with that side's own mask - pooled vectors need the same texts in the same order, not the same
        tokenizer;
      * ``[N, d]`` vectors the caller already pooled.
    The loss is the mean over pairs of the mean squared error per element of the teacher's width.
    """

    def __init__(self, student_dim: int, teacher_dim: int, student_layers: int, shared_projection: bool = False,
                 pooling: str | None = None):
        super().__init__()
        if pooling not in (None, "cls", "mean"):
            raise ConfigError(f"unknown pooling {pooling!r}; choose 'cls', 'mean' or None (token-level)")
        self.student_layers = student_layers
        self.shared_projection = shared_projection
        self.pooling = pooling
        count = 1 if shared_projection else student_layers
        self.projections = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(count))

    def _projection(self, student_layer: int) -> nn.Linear:
        # nn.ModuleList is not generic: its items are typed Module; each of these is a Linear
        return cast(nn.Linear, self.projections[0 if self.shared_projection else student_layer])

    def _pool(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        from ..models.base import pool

        assert self.pooling is not None  # only pooled comparisons pool
        if mask is None:
            mask = hidden.new_ones(hidden.shape[:2])
        return pool(hidden, mask, self.pooling)

    def forward(self, student_hidden: Sequence[Tensor] | Tensor, teacher_hidden: Sequence[Tensor] | Tensor,
                pairs: Sequence[Pair], student_mask: Tensor | None = None, teacher_mask: Tensor | None = None,
                detach_teacher_targets: bool = False) -> Tensor:
        if not self.shared_projection and len(student_hidden) != self.student_layers:
            raise LeadkdError(f"this HiddenStateMSE has projections for {self.student_layers} student layers, "
                              f"but {len(student_hidden)} student layers were given")
        checked = _check_pairs(pairs, len(student_hidden), len(teacher_hidden))
        token_mask = None
        if self.pooling is None and student_mask is not None and teacher_mask is not None:
            if student_mask.shape != teacher_mask.shape or not torch.equal(student_mask, teacher_mask):
                raise LeadkdError("token-level hidden-state MSE needs identical token positions on both sides, "
                                  "but the attention masks differ; teacher and student must share one tokenizer")
        if self.pooling is None:
            token_mask = student_mask if student_mask is not None else teacher_mask

        losses = []
        for student_layer, teacher_layer in checked:
            student, teacher = student_hidden[student_layer], teacher_hidden[teacher_layer]
            if detach_teacher_targets:
                teacher = teacher.detach()
            if self.pooling is not None and student.dim() == 3:
                student, teacher = self._pool(student, student_mask), self._pool(teacher, teacher_mask)
            if student.shape[:-1] != teacher.shape[:-1] or student.dim() not in (2, 3):
                raise LeadkdError(
                    f"hidden-state MSE compares position by position, but student layer {student_layer} has "
                    f"shape {list(student.shape)} and teacher layer {teacher_layer} {list(teacher.shape)}; "
                    "token-level states need one shared tokenizer and padding")
            projected = self._projection(student_layer)(student).float()
            squared = (projected - teacher.float()).pow(2).mean(dim=-1)   # per token / per vector
            if student.dim() == 3 and token_mask is not None:
                mask = token_mask.to(squared.dtype)
                losses.append((squared * mask).sum() / mask.sum().clamp(min=1.0))
            else:
                losses.append(squared.mean())
        return torch.stack(losses).mean()
