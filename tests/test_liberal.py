"""The "liberal" property: teacher and student share no tokenizer, vocabulary, width, depth or kind.

LEAD compares only distributions over the same candidates, so any teacher kind and any student give
aligned ``[L, Q, C]`` score tensors, a finite loss, and gradient that reaches the student.
"""

from __future__ import annotations

import pytest
import torch

from leadkd.distill.layers import select_layers
from leadkd.distill.losses import group_labels, layer_distillation_loss, lead_total_loss, own_group_scores
from leadkd.models.colbert import ColBERT
from leadkd.models.cross_encoder import CrossEncoder
from leadkd.models.dual_encoder import DualEncoder

QUERIES = ["protein risk in cancer", "DNA virus vaccine dose"]
GROUP = 3  # passages per query: the positive, then two negatives
PASSAGES = [
    "the protein increases cancer risk", "a heart study of patients", "blood drug trial results",
    "a virus vaccine and the dose of DNA", "mouse brain cells", "low levels of rna in human genes",
]


def load(kind: str, path):
    if kind == "dual_encoder":
        return DualEncoder.from_pretrained(path, max_query_length=16, max_passage_length=32)
    if kind == "colbert":
        return ColBERT.from_pretrained(path, dim=16, max_query_length=16, max_passage_length=32)
    return CrossEncoder.from_pretrained(path, max_length=48)


@pytest.mark.parametrize("teacher_kind", ["dual_encoder", "colbert", "cross_encoder"])
def test_different_tokenizers_widths_depths_and_kinds_align(tiny_bert, tiny_bert_other, teacher_kind):
    student = load("dual_encoder", tiny_bert)                 # 2 layers, width 32, lower-cased vocabulary
    teacher = load(teacher_kind, tiny_bert_other)             # 3 layers, width 48, cased, other words
    student.train()
    teacher.train()
    assert student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab()
    assert student.tokenizer("Protein")["input_ids"] != teacher.tokenizer("Protein")["input_ids"]

    student_scores = student.layer_scores(QUERIES, PASSAGES)  # [2, Q, Q*G]: the whole batch
    teacher_scores = teacher.layer_scores(QUERIES, PASSAGES)
    if teacher_kind == "cross_encoder":                       # own group only: [3, Q, G]
        assert teacher_scores.shape == (3, len(QUERIES), GROUP)
        student_scores = own_group_scores(student_scores, GROUP)
        labels = group_labels(len(QUERIES), GROUP, in_batch=False)
    else:
        assert teacher_scores.shape == (3, len(QUERIES), len(PASSAGES))
        labels = group_labels(len(QUERIES), GROUP)
    assert student_scores.shape[1:] == teacher_scores.shape[1:]

    pairs = select_layers("random", student.num_layers, teacher.num_layers, k=2,
                          generator=torch.Generator().manual_seed(0))
    terms = lead_total_loss(teacher_scores, student_scores, labels, pairs)
    assert torch.isfinite(terms["loss"]) and terms["layer_kl"].item() != 0
    terms["loss"].backward()
    student_grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in student_grads) and sum(g.abs().sum() for g in student_grads) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())  # joint training


def test_frozen_teacher_runs_without_a_graph_and_only_the_student_learns(tiny_bert, tiny_bert_other):
    student, teacher = load("dual_encoder", tiny_bert), load("colbert", tiny_bert_other)
    with torch.no_grad():
        teacher_scores = teacher.layer_scores(QUERIES, PASSAGES)
    assert not teacher_scores.requires_grad
    student_scores = student.layer_scores(QUERIES, PASSAGES)
    loss, weights = layer_distillation_loss(teacher_scores, student_scores, group_labels(2, GROUP), [(0, 1), (1, 2)])
    assert not weights.requires_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
