"""LEAD's losses against naive references written independently here (math module, Python loops)."""

from __future__ import annotations

import math

import pytest
import torch

from leadkd.distill.losses import (
    HiddenStateMSE,
    check_same_tokenizer,
    contrastive_loss,
    duplicate_positive_mask,
    group_labels,
    kl_distillation,
    layer_distillation_loss,
    lead_total_loss,
    margin_mse_loss,
    mask_candidates,
    own_group_scores,
    response_kl_loss,
)
from leadkd.runtime.errors import LeadkdError

# --------------------------------------------------------------------------- naive references


def py_log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    row = [x / tau for x in row]
    top = max(row)
    log_sum = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_sum for x in row]


def py_kl(target: list[list[float]], inputs: list[list[float]], tau: float = 1.0) -> float:
    """(1/Q) sum_q sum_c p log(p / q), p = softmax(target/tau), q = softmax(input)."""
    total = 0.0
    for t_row, i_row in zip(target, inputs, strict=True):
        log_p, log_q = py_log_softmax(t_row, tau), py_log_softmax(i_row)
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
    return total / len(target)


def py_ce(rows: list[list[float]], labels: list[int]) -> float:
    return -sum(py_log_softmax(row)[label] for row, label in zip(rows, labels, strict=True)) / len(rows)


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().tolist()


def rand(*shape: int, seed: int = 0, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(grad)


# --------------------------------------------------------------------------- contrastive and KL


def test_contrastive_matches_naive_cross_entropy():
    scores, labels = rand(4, 6), torch.tensor([0, 3, 5, 1])
    assert contrastive_loss(scores, labels).item() == pytest.approx(py_ce(rows(scores), [0, 3, 5, 1]), rel=1e-12)


def test_contrastive_per_layer_gives_one_loss_per_layer():
    scores, labels = rand(3, 4, 6), torch.tensor([0, 3, 5, 1])
    per_layer = contrastive_loss(scores, labels)
    assert per_layer.shape == (3,)
    for layer in range(3):
        assert per_layer[layer].item() == pytest.approx(py_ce(rows(scores[layer]), [0, 3, 5, 1]), rel=1e-12)


def test_kl_direction_hand_case():
    # target softmax([0, ln 3]) = [1/4, 3/4], input softmax([0, 0]) = [1/2, 1/2]
    # KL(target||input) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812..., the reverse is 0.143841...
    target = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    inputs = torch.zeros(1, 2, dtype=torch.float64)
    assert kl_distillation(target, inputs).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert kl_distillation(target, inputs).item() == pytest.approx(0.1308120, abs=1e-6)
    assert kl_distillation(inputs, target).item() == pytest.approx(0.1438410, abs=1e-6)


def test_temperature_softens_only_the_target():
    # target [0, 2 ln 3] at tau=2 is softmax([0, ln 3]) = [1/4, 3/4]: same KL as the hand case
    target = torch.tensor([[0.0, 2 * math.log(3.0)]], dtype=torch.float64)
    assert kl_distillation(target, torch.zeros(1, 2, dtype=torch.float64), 2.0).item() == pytest.approx(0.1308120,
                                                                                                        abs=1e-6)
    # uniform target; input [0, 2 ln 3] untempered is [1/10, 9/10]: KL = 1/2 ln 5 + 1/2 ln(5/9) = 0.510826
    # (had tau also touched the input it would be [1/4, 3/4] and KL 0.143841)
    inputs = torch.tensor([[0.0, 2 * math.log(3.0)]], dtype=torch.float64)
    assert kl_distillation(torch.zeros(1, 2, dtype=torch.float64), inputs, 2.0).item() == pytest.approx(0.510826,
                                                                                                        abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_kl_is_batchmean_over_queries(tau):
    target, inputs = rand(5, 7, seed=1), rand(5, 7, seed=2)
    assert kl_distillation(target, inputs, tau).item() == pytest.approx(py_kl(rows(target), rows(inputs), tau),
                                                                        rel=1e-12)


def test_kl_ignores_masked_candidates_without_nan():
    target = torch.tensor([[1.0, 0.0, float("-inf")]], requires_grad=True)
    inputs = torch.tensor([[0.5, 0.0, float("-inf")]], requires_grad=True)
    loss = kl_distillation(target, inputs)
    loss.backward()
    assert loss.item() == pytest.approx(py_kl([[1.0, 0.0]], [[0.5, 0.0]]), rel=1e-5)
    assert torch.isfinite(target.grad).all() and torch.isfinite(inputs.grad).all()


def test_half_precision_scores_are_computed_in_float32():
    target, inputs = rand(3, 5, seed=1).bfloat16(), rand(3, 5, seed=2).bfloat16()
    loss = kl_distillation(target, inputs)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(py_kl(rows(target), rows(inputs)), rel=1e-5)


def test_temperature_must_be_positive():
    with pytest.raises(LeadkdError, match="temperature"):
        kl_distillation(rand(2, 3), rand(2, 3), 0.0)


# --------------------------------------------------------------------------- response KL and MarginMSE


def test_response_kl_one_way_and_symmetric():
    teacher, student = rand(4, 6, seed=3), rand(4, 6, seed=4)
    one_way = py_kl(rows(teacher), rows(student), 2.0)
    back = py_kl(rows(student), rows(teacher), 2.0)
    assert response_kl_loss(teacher, student, 2.0).item() == pytest.approx(one_way, rel=1e-12)
    assert response_kl_loss(teacher, student, 2.0, symmetric=True).item() == pytest.approx(one_way + back, rel=1e-12)


def test_response_kl_gradients():
    teacher, student = rand(3, 5, seed=5, grad=True), rand(3, 5, seed=6, grad=True)
    response_kl_loss(teacher, student).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0  # targets not detached by default

    teacher, student = rand(3, 5, seed=5, grad=True), rand(3, 5, seed=6, grad=True)
    response_kl_loss(teacher, student, detach_teacher_targets=True).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0

    teacher, student = rand(3, 5, seed=5, grad=True), rand(3, 5, seed=6, grad=True)
    response_kl_loss(teacher, student, symmetric=True, detach_teacher_targets=True).backward()
    assert teacher.grad.abs().sum() > 0  # the reverse term trains the teacher as its input


def test_margin_mse_hand_case():
    # teacher margins [3-1, 3-0] = [2, 3]; student [1-0, 1-0] = [1, 1]; mean of [1, 4] = 2.5
    teacher = torch.tensor([[3.0, 1.0, 0.0]])
    student = torch.tensor([[1.0, 0.0, 0.0]])
    assert margin_mse_loss(teacher, student, torch.tensor([0])).item() == pytest.approx(2.5)


def test_margin_mse_matches_naive_loops():
    teacher, student, labels = rand(4, 5, seed=7), rand(4, 5, seed=8), [2, 0, 4, 1]
    total, count = 0.0, 0
    for t_row, s_row, label in zip(rows(teacher), rows(student), labels, strict=True):
        for j in range(5):
            if j != label:
                total += ((s_row[label] - s_row[j]) - (t_row[label] - t_row[j])) ** 2
                count += 1
    assert margin_mse_loss(teacher, student, torch.tensor(labels)).item() == pytest.approx(total / count, rel=1e-12)


def test_margin_mse_needs_a_negative():
    with pytest.raises(LeadkdError, match="negative"):
        margin_mse_loss(rand(2, 1), rand(2, 1), torch.tensor([0, 0]))


# --------------------------------------------------------------------------- the layer loss


def naive_layer_loss(teacher, student, labels, pairs, layer_tau, tau, reweight, weight):
    kls = [py_kl(rows(teacher[t]), rows(student[s]), tau) for s, t in pairs]
    ces = [py_ce(rows(teacher[t]), labels) for _, t in pairs]
    if not reweight:
        return weight * sum(kls), [weight] * len(pairs)
    exps = [math.exp(-ce / layer_tau) for ce in ces]
    weights = [e / sum(exps) for e in exps]
    return sum(w * d for w, d in zip(weights, kls, strict=True)), weights


@pytest.mark.parametrize("reweight,weight,layer_tau,tau", [(True, 1.0, 10.0, 1.0), (True, 3.0, 0.7, 2.0),
                                                            (False, 1.0, 10.0, 1.0), (False, 0.5, 10.0, 0.5)])
def test_layer_loss_matches_naive(reweight, weight, layer_tau, tau):
    teacher, student, labels = rand(12, 3, 8, seed=9), rand(6, 3, 8, seed=10), [0, 4, 7]
    pairs = [(0, 1), (2, 5), (5, 11)]
    loss, weights = layer_distillation_loss(teacher, student, torch.tensor(labels), pairs, layer_temperature=layer_tau,
                                            temperature=tau, reweight=reweight, weight=weight)
    expected_loss, expected_weights = naive_layer_loss(teacher, student, labels, pairs, layer_tau, tau, reweight,
                                                       weight)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert weights.tolist() == pytest.approx(expected_weights, rel=1e-12)


def test_layer_weights_hand_case():
    # teacher layer 0: [0, 0] -> CE ln 2; layer 1: [ln 3, 0] -> p(pos) = 3/4, CE ln(4/3)
    # w ∝ exp(-CE / 1) = [1/2, 3/4] -> [0.4, 0.6]
    teacher = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]], dtype=torch.float64)
    student = torch.zeros(2, 1, 2, dtype=torch.float64)
    labels = torch.tensor([0])
    _, weights = layer_distillation_loss(teacher, student, labels, [(0, 0), (1, 1)], layer_temperature=1.0)
    assert weights.tolist() == pytest.approx([0.4, 0.6])
    _, weights = layer_distillation_loss(teacher, student, labels, [(0, 0), (1, 1)])  # default tau_l = 10
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[1] > weights[0]  # the layer that ranks the positive better gets more weight


def test_layer_weights_use_the_untempered_teacher():
    teacher, student, labels = rand(4, 3, 5, seed=11), rand(4, 3, 5, seed=12), torch.tensor([0, 1, 2])
    pairs = [(0, 0), (3, 3)]
    _, w1 = layer_distillation_loss(teacher, student, labels, pairs, temperature=1.0)
    _, w5 = layer_distillation_loss(teacher, student, labels, pairs, temperature=5.0)
    assert torch.equal(w1, w5)


def test_reweighting_ignores_the_layer_weight():
    teacher, student, labels = rand(4, 3, 5, seed=11), rand(4, 3, 5, seed=12), torch.tensor([0, 1, 2])
    a, _ = layer_distillation_loss(teacher, student, labels, [(0, 1), (2, 3)], weight=1.0)
    b, _ = layer_distillation_loss(teacher, student, labels, [(0, 1), (2, 3)], weight=7.0)
    assert a.item() == b.item()


def test_layer_loss_gradient_reaches_teacher_only_when_targets_are_kept():
    labels, pairs = torch.tensor([0, 1]), [(0, 1), (2, 3)]
    teacher, student = rand(4, 2, 5, seed=13, grad=True), rand(3, 2, 5, seed=14, grad=True)
    layer_distillation_loss(teacher, student, labels, pairs)[0].backward()
    assert teacher.grad[[1, 3]].abs().sum() > 0 and teacher.grad[[0, 2]].abs().sum() == 0
    assert student.grad[[0, 2]].abs().sum() > 0 and student.grad[1].abs().sum() == 0

    teacher, student = rand(4, 2, 5, seed=13, grad=True), rand(3, 2, 5, seed=14, grad=True)
    layer_distillation_loss(teacher, student, labels, pairs, detach_teacher_targets=True)[0].backward()
    # the weights are functions of the teacher's scores, yet no gradient reaches it: w is a constant
    assert teacher.grad is None
    assert student.grad[[0, 2]].abs().sum() > 0


def test_layer_weights_carry_no_gradient():
    labels, pairs = torch.tensor([0, 1]), [(0, 1), (2, 3)]
    teacher, student = rand(4, 2, 5, seed=15, grad=True), rand(3, 2, 5, seed=16, grad=True)
    loss, weights = layer_distillation_loss(teacher, student, labels, pairs)
    assert not weights.requires_grad
    loss.backward()
    # the same gradient as sum_k const_k * D_k with the weights frozen by hand
    t2, s2 = teacher.detach().clone().requires_grad_(), student.detach().clone().requires_grad_()
    frozen = [float(w) for w in weights]
    sum(w * kl_distillation(t2[t], s2[s]) for w, (s, t) in zip(frozen, pairs, strict=True)).backward()
    assert torch.allclose(teacher.grad, t2.grad) and torch.allclose(student.grad, s2.grad)


def test_layer_loss_validates_pairs_and_shapes():
    teacher, student, labels = rand(12, 2, 4), rand(6, 2, 4), torch.tensor([0, 1])
    with pytest.raises(LeadkdError, match=r"\(student 6, teacher 3\).*6 layers.*12"):
        layer_distillation_loss(teacher, student, labels, [(6, 3)])
    with pytest.raises(LeadkdError, match=r"\(student 0, teacher 12\)"):
        layer_distillation_loss(teacher, student, labels, [(0, 12)])
    with pytest.raises(LeadkdError, match="pair"):
        layer_distillation_loss(teacher, student, labels, [(-1, 3)])
    with pytest.raises(LeadkdError, match="no layer pairs"):
        layer_distillation_loss(teacher, student, labels, [])
    with pytest.raises(LeadkdError, match="same queries and candidates"):
        layer_distillation_loss(teacher, rand(6, 2, 5), labels, [(0, 0)])
    with pytest.raises(LeadkdError, match="num_layers, Q, C"):
        layer_distillation_loss(teacher[0], student, labels, [(0, 0)])
    with pytest.raises(LeadkdError, match="labels"):
        layer_distillation_loss(teacher, student, torch.tensor([0, 1, 2]), [(0, 0)])
    with pytest.raises(LeadkdError, match="labels must lie"):
        layer_distillation_loss(teacher, student, torch.tensor([0, 4]), [(0, 0)])


# --------------------------------------------------------------------------- the total


def test_total_is_the_sum_of_its_terms_when_the_teacher_trains():
    teacher, student, labels = rand(4, 3, 6, seed=17), rand(2, 3, 6, seed=18), [0, 2, 4]
    pairs = [(0, 1), (1, 3)]
    terms = lead_total_loss(teacher, student, torch.tensor(labels), pairs, student_weight=0.5, teacher_weight=2.0,
                            response_weight=3.0)
    s_ce, t_ce = py_ce(rows(student[-1]), labels), py_ce(rows(teacher[-1]), labels)
    response = py_kl(rows(teacher[-1]), rows(student[-1])) + py_kl(rows(student[-1]), rows(teacher[-1]))
    layer, weights = naive_layer_loss(teacher, student, labels, pairs, 10.0, 1.0, True, 1.0)
    assert terms["student_ce"].item() == pytest.approx(s_ce, rel=1e-12)
    assert terms["teacher_ce"].item() == pytest.approx(t_ce, rel=1e-12)
    assert terms["response_kl"].item() == pytest.approx(response, rel=1e-12)
    assert terms["layer_kl"].item() == pytest.approx(layer, rel=1e-12)
    assert terms["layer_weights"].tolist() == pytest.approx(weights, rel=1e-12)
    assert terms["loss"].item() == pytest.approx(0.5 * s_ce + 2.0 * t_ce + 3.0 * response + layer, rel=1e-12)


def test_total_with_a_frozen_teacher_and_no_layers():
    teacher, student, labels = rand(4, 3, 6, seed=17), rand(2, 3, 6, seed=18, grad=True), [0, 2, 4]
    terms = lead_total_loss(teacher, student, torch.tensor(labels), None, train_teacher=False)
    s_ce = py_ce(rows(student[-1]), labels)
    one_way = py_kl(rows(teacher[-1]), rows(student[-1]))
    assert terms["response_kl"].item() == pytest.approx(one_way, rel=1e-12)
    assert terms["layer_kl"].item() == 0.0 and terms["layer_weights"].numel() == 0
    assert terms["loss"].item() == pytest.approx(s_ce + one_way, rel=1e-12)
    assert not terms["teacher_ce"].requires_grad
    terms["loss"].backward()
    assert student.grad.abs().sum() > 0


def test_total_unweighted_layer_term_uses_layer_weight():
    teacher, student, labels = rand(4, 3, 6, seed=19), rand(2, 3, 6, seed=20), torch.tensor([0, 2, 4])
    pairs = [(0, 1), (1, 3)]
    terms = lead_total_loss(teacher, student, labels, pairs, reweight=False, layer_weight=0.25)
    expected, _ = layer_distillation_loss(teacher, student, labels, pairs, reweight=False, weight=0.25)
    assert terms["layer_kl"].item() == pytest.approx(expected.item(), rel=1e-12)


# --------------------------------------------------------------------------- candidate layouts


def test_group_labels_for_both_layouts():
    assert group_labels(3, 4).tolist() == [0, 4, 8]
    assert group_labels(3, 4, query_offset=2).tolist() == [8, 12, 16]
    assert group_labels(3, 4, in_batch=False).tolist() == [0, 0, 0]


def test_own_group_scores_cut_each_query_to_its_block():
    queries, group = 3, 4
    scores = rand(2, queries, queries * group, seed=21)
    cut = own_group_scores(scores, group)
    assert cut.shape == (2, queries, group)
    for layer in range(2):
        for q in range(queries):
            for j in range(group):
                assert cut[layer, q, j].item() == scores[layer, q, q * group + j].item()
    # a process's local queries 2..3 inside 4 gathered groups
    gathered = rand(2, 4 * group, seed=22)
    local = own_group_scores(gathered, group, query_offset=2)
    assert torch.equal(local[0], gathered[0, 8:12]) and torch.equal(local[1], gathered[1, 12:16])


def test_own_group_then_label_zero_is_the_ce_rule():
    queries, group = 2, 3
    scores = rand(queries, queries * group, seed=23)
    whole = contrastive_loss(scores, group_labels(queries, group))
    own = contrastive_loss(own_group_scores(scores, group), group_labels(queries, group, in_batch=False))
    naive_own = py_ce([rows(scores)[q][q * group:(q + 1) * group] for q in range(queries)], [0, 0])
    assert own.item() == pytest.approx(naive_own, rel=1e-12)
    assert own.item() < whole.item()  # fewer negatives in the softmax


def test_own_group_scores_rejects_a_bad_layout():
    with pytest.raises(LeadkdError, match="groups of 4"):
        own_group_scores(rand(3, 10), 4)
    with pytest.raises(LeadkdError, match="groups of 4"):
        own_group_scores(rand(3, 8), 4)


# --------------------------------------------------------------------------- the hidden-state baseline


def test_hidden_state_mse_token_level_matches_naive():
    torch.manual_seed(0)
    module = HiddenStateMSE(student_dim=3, teacher_dim=5, student_layers=2)
    student = [torch.randn(2, 4, 3) for _ in range(2)]
    teacher = [torch.randn(2, 4, 5) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = module(student, teacher, [(0, 1), (1, 2)], student_mask=mask, teacher_mask=mask)
    per_pair = []
    for s, t in [(0, 1), (1, 2)]:
        proj = module.projections[s](student[s]).detach()
        total, count = 0.0, 0
        for n in range(2):
            for tok in range(4):
                if mask[n, tok]:
                    total += sum((proj[n, tok, d].item() - teacher[t][n, tok, d].item()) ** 2 for d in range(5)) / 5
                    count += 1
        per_pair.append(total / count)
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())


def test_hidden_state_mse_shared_projection_and_pooled_variant():
    torch.manual_seed(1)
    shared = HiddenStateMSE(4, 6, student_layers=3, shared_projection=True)
    assert len(shared.projections) == 1 and len(HiddenStateMSE(4, 6, student_layers=3).projections) == 3
    # pooled: token counts may differ (each side has its own tokenizer); only the texts must line up
    pooled = HiddenStateMSE(4, 6, student_layers=1, pooling="cls")
    student, teacher = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 9, 6)
    loss = pooled(student, teacher, [(0, 0)])
    expected = (pooled.projections[0](student[0, :, 0]) - teacher[0, :, 0]).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    vectors = pooled(student[:, :, 0], teacher[:, :, 0], [(0, 0)])  # already pooled [N, d] inputs
    assert vectors.item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_state_mse_refuses_unaligned_tokens():
    module = HiddenStateMSE(4, 6, student_layers=1)
    with pytest.raises(LeadkdError, match="shared tokenizer"):
        module(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 6), [(0, 0)])
    with pytest.raises(LeadkdError, match="projections for 1 student layers, but 2"):
        module(torch.randn(2, 2, 3, 4), torch.randn(1, 2, 3, 6), [(0, 0)])
    with pytest.raises(LeadkdError, match="share one tokenizer"):
        module(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 6), [(0, 0)],
               student_mask=torch.ones(2, 3), teacher_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))


def test_check_same_tokenizer():
    from conftest import TINY_WORDS, build_tiny_tokenizer

    same_a, same_b = build_tiny_tokenizer(TINY_WORDS), build_tiny_tokenizer(TINY_WORDS)
    check_same_tokenizer(same_a, same_b)
    other = build_tiny_tokenizer([w.upper() for w in TINY_WORDS[::2]] + ["alpha"], lowercase=False)
    with pytest.raises(LeadkdError, match="share one tokenizer.*vocabularies differ.*layer-score loss instead"):
        check_same_tokenizer(same_a, other)
    cased = build_tiny_tokenizer(TINY_WORDS, lowercase=False)  # same vocabulary, no lower-casing
    with pytest.raises(LeadkdError, match="split the same text differently"):
        check_same_tokenizer(same_a, cased)


def test_total_response_choices():
    teacher, student, labels = rand(3, 3, 6, seed=24), rand(2, 3, 6, seed=25), torch.tensor([0, 2, 4])
    margin = lead_total_loss(teacher, student, labels, None, response="margin_mse")
    assert margin["response_kl"].item() == pytest.approx(margin_mse_loss(teacher[-1], student[-1], labels).item())
    none = lead_total_loss(teacher, student, labels, None, response="none")
    assert none["response_kl"].item() == 0.0
    assert none["loss"].item() == pytest.approx((none["student_ce"] + none["teacher_ce"]).item(), rel=1e-12)
    with pytest.raises(LeadkdError, match="unknown response loss 'mse'"):
        lead_total_loss(teacher, student, labels, None, response="mse")


# --------------------------------------------------------------------------- duplicate positives

def perfect_scores(positive_ids: list[tuple[str, ...]], candidate_ids: list[str], margin: float = 20.0) -> torch.Tensor:
    """A perfect retriever: every judged positive of q scores ``margin`` above everything else."""
    return torch.tensor([[margin if c in positives else 0.0 for c in candidate_ids] for positives in positive_ids],
                        dtype=torch.float64)


# Two groups of 3: query a's positive p_a is also a hard negative of query b, and b has two positives,
# p_b (sampled) and p_a2 (judged, in a's group as a negative).
DUP_POSITIVES = [("p_a",), ("p_b", "p_a2")]
DUP_CANDIDATES = ["p_a", "n1", "p_a2", "p_b", "p_a", "n2"]
DUP_LABELS = torch.tensor([0, 3])


def test_duplicate_positive_mask_marks_every_copy_but_the_label():
    mask = duplicate_positive_mask(DUP_POSITIVES, DUP_CANDIDATES, DUP_LABELS)
    expected = [[False, False, False, False, True, False],   # a: the second p_a
                [False, False, True, False, False, False]]   # b: its other judged positive p_a2
    assert mask.tolist() == expected
    none = duplicate_positive_mask([("x",), ("y",)], ["x", "n", "y", "m"], torch.tensor([0, 2]))
    assert not none.any()


def test_a_perfect_model_reaches_zero_loss_only_with_duplicates_masked():
    """Unmasked, query a's copy of its positive scores as high as the positive: P <= 1/2, CE >= log 2."""
    scores = perfect_scores(DUP_POSITIVES, DUP_CANDIDATES).expand(2, -1, -1)  # [L, Q, C]
    mask = duplicate_positive_mask(DUP_POSITIVES, DUP_CANDIDATES, DUP_LABELS)
    kwargs = {"train_teacher": True, "labels": DUP_LABELS, "pairs": [(0, 0)]}
    plain = lead_total_loss(scores, scores, **kwargs)
    masked = lead_total_loss(scores, scores, candidate_mask=mask, **kwargs)
    # naive: each query's CE over the candidates it keeps
    kept = [[c for c, m in zip(row, mrow, strict=True) if not m]
            for row, mrow in zip(rows(scores[-1]), mask.tolist(), strict=True)]
    assert masked["student_ce"].item() == pytest.approx(py_ce(kept, [0, 2]), abs=1e-12)
    assert masked["loss"].item() < 1e-6
    assert plain["student_ce"].item() >= (math.log(2) + math.log(2)) / 2 - 1e-6  # both queries lose a half
    for term in ("response_kl", "layer_kl"):
        assert masked[term].item() == pytest.approx(0.0, abs=1e-12)


def test_masked_candidates_get_no_gradient_and_margin_mse_skips_them():
    student, teacher = rand(2, 6, seed=1, grad=True), rand(2, 6, seed=2)
    mask = duplicate_positive_mask(DUP_POSITIVES, DUP_CANDIDATES, DUP_LABELS)
    terms = lead_total_loss(teacher.expand(1, -1, -1), student.expand(1, -1, -1), DUP_LABELS, [(0, 0)],
                            train_teacher=False, candidate_mask=mask)
    terms["loss"].backward()
    assert torch.isfinite(student.grad).all() and (student.grad[mask] == 0).all()
    assert (student.grad[~mask] != 0).any()
    margin = margin_mse_loss(teacher, student, DUP_LABELS, candidate_mask=mask)
    naive, count = 0.0, 0
    for q, label in enumerate(DUP_LABELS.tolist()):
        for c in range(6):
            if c != label and not mask[q, c]:
                s_margin = student[q, label].item() - student[q, c].item()
                t_margin = teacher[q, label].item() - teacher[q, c].item()
                naive, count = naive + (s_margin - t_margin) ** 2, count + 1
    assert margin.item() == pytest.approx(naive / count, rel=1e-12)
    with pytest.raises(LeadkdError, match="does not fit"):
        mask_candidates(student, mask[:, :3])
