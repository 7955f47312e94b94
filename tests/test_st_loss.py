"""LEADLoss (leadkd.integrations.sentence_transformers): the same loss as leadkd's own trainer on one batch,
a short SentenceTransformerTrainer run that helps, and a saved folder that is a plain ST model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_bert_folder

QUERIES = ["cancer risk of the gene", "virus vaccine dose", "brain cells and blood", "heart drug trial"]
POSITIVES = ["the gene shows high cancer risk", "a vaccine dose for the virus", "blood cells in the brain",
             "a trial of the heart drug"]
NEGATIVES = [["mouse protein levels", "human dna study"],
             ["the gene shows high cancer risk", "rna of the cell"],   # query 0's positive: a duplicate to mask
             ["low dose results", "treatment effect on patients"],
             ["increase of the levels", "decrease in risk"]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_loss")
    student = make_tiny_bert_folder(root / "student", layers=3, dropout=0.0)
    words = [w.upper() for w in "the a of and gene cancer virus vaccine brain heart drug blood cells".split()]
    teacher = make_tiny_bert_folder(root / "teacher", words=words + ["tumour"], layers=4, hidden=48, seed=1,
                                    lowercase=False, dropout=0.0)
    return student, teacher


def st_student(folder, normalize=False):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(folder))
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), "cls")]
    return SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu")


def st_features(model, columns):
    """What the trainer hands a loss: collate the rows with the text-keeping collator, then collect_features."""
    from sentence_transformers.base.trainer import BaseTrainer

    from leadkd.integrations.sentence_transformers import text_collator

    names = ["query", "positive"] + [f"negative_{i + 1}" for i in range(len(columns) - 2)]
    rows = [dict(zip(names, values)) for values in zip(*columns)]
    inputs = text_collator(model)(rows)
    return BaseTrainer.collect_features(None, inputs)


def leadkd_loss(student, teacher, train_teacher, pairs, **loss_settings):
    """The loss leadkd's trainer backpropagates for this batch: its Distillation objective on a GroupBatch."""
    from leadkd.config import LossConfig
    from leadkd.data.batches import GroupBatch
    from leadkd.distill.build import EncodeForward, Trained
    from leadkd.distill.objectives import Distillation

    group = 1 + len(NEGATIVES[0])
    passages = [text for positive, negatives in zip(POSITIVES, NEGATIVES) for text in [positive, *negatives]]
    ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(passages))}
    batch = GroupBatch(query_ids=[f"q{i}" for i in range(len(QUERIES))], queries=QUERIES,
                       passage_ids=[ids[text] for text in passages], passages=passages,
                       labels=torch.arange(len(QUERIES)) * group, group_size=group,
                       positive_ids=[(ids[text],) for text in POSITIVES])
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # only marks "trains"
    objective = Distillation(Trained("student", student, EncodeForward(student), dummy),
                             Trained("teacher", teacher, EncodeForward(teacher), dummy if train_teacher else None),
                             LossConfig(**loss_settings), torch.device("cpu"))
    return objective(batch, pairs)


CASES = {
    "frozen": dict(train_teacher=False, settings={}),
    "joint": dict(train_teacher=True, settings={}),
    "no-reweight-tau": dict(train_teacher=True, settings=dict(reweight=False, layer_weight=0.5, temperature=2.0,
                                                               response_weight=0.7, student_ce=0.3)),
    "no-dup-mask": dict(train_teacher=False, settings=dict(mask_duplicate_positives=False)),
    "margin-mse": dict(train_teacher=False, settings=dict(response="margin_mse")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_equals_leadkd_trainers_loss_with_a_dual_encoder_teacher(folders, case):
    from leadkd.distill.layers import LayerSchedule
    from leadkd.integrations.sentence_transformers import LEADLoss
    from leadkd.models import DualEncoder

    student_folder, teacher_folder = folders
    train_teacher, settings = CASES[case]["train_teacher"], CASES[case]["settings"]
    teacher = DualEncoder.from_pretrained(teacher_folder, pooling="mean")
    de_student = DualEncoder.from_pretrained(student_folder, pooling="cls")
    student = st_student(student_folder)
    loss = LEADLoss(student, teacher, k=2, strategy="random", seed=5, train_teacher=train_teacher, **settings)
    features, labels = st_features(student, [QUERIES, POSITIVES, *map(list, zip(*NEGATIVES))])
    ours = loss(features, labels)

    pairs = LayerSchedule("random", 3, 4, k=2, seed=5, resample_interval=10).pairs_for_step(0)
    assert loss.schedule.pairs == pairs
    theirs = leadkd_loss(de_student, teacher, train_teacher, pairs, **settings)
    assert float(theirs["loss"].detach()) > 0.1
    assert torch.allclose(ours, theirs["loss"], atol=1e-5, rtol=1e-5), (float(ours), float(theirs["loss"]))
    for name in ("student_ce", "response_kl", "layer_kl"):
        assert torch.allclose(loss.last_terms[name], theirs[name].detach(), atol=1e-5), name

    # the gradients reach the student's weights alike
    ours.backward()
    theirs["loss"].backward()
    ours_grad = student[0].auto_model.embeddings.word_embeddings.weight.grad
    theirs_grad = de_student.backbone.embeddings.word_embeddings.weight.grad
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-5)


def test_loss_equals_leadkd_trainers_loss_with_a_cross_encoder_teacher(folders):
    from leadkd.integrations.sentence_transformers import LEADLoss
    from leadkd.models import CrossEncoder, DualEncoder

    student_folder, teacher_folder = folders
    teacher = CrossEncoder.from_pretrained(teacher_folder)
    student = st_student(student_folder)
    loss = LEADLoss(student, teacher, strategy="map", pairs=[(0, 1), (2, 3)], train_teacher=True)
    features, labels = st_features(student, [QUERIES, POSITIVES, *map(list, zip(*NEGATIVES))])
    ours = loss(features, labels)
    theirs = leadkd_loss(DualEncoder.from_pretrained(student_folder, pooling="cls"), teacher, True, [(0, 1), (2, 3)])
    assert torch.allclose(ours, theirs["loss"], atol=1e-5), (float(ours), float(theirs["loss"]))


def test_a_sentence_transformers_teacher_is_adapted_in_memory(folders):
    """An ST bi-encoder teacher scores as the leadkd DualEncoder loaded from its folder."""
    from leadkd.integrations.sentence_transformers import as_leadkd_teacher
    from leadkd.models import DualEncoder

    student_folder, _ = folders
    st_teacher = st_student(student_folder, normalize=True)
    adapted = as_leadkd_teacher(st_teacher)
    assert isinstance(adapted, DualEncoder) and adapted.normalize and adapted.pooling == "cls"
    assert adapted.backbone is st_teacher[0].auto_model  # shared weights
    loaded = DualEncoder.from_pretrained(student_folder, pooling="cls", normalize=True)
    with torch.no_grad():
        assert torch.allclose(adapted.layer_scores(QUERIES, POSITIVES), loaded.layer_scores(QUERIES, POSITIVES),
                              atol=1e-5)


def test_missing_raw_texts_is_one_clear_error(folders):
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from leadkd.errors import LeadkdError
    from leadkd.integrations.sentence_transformers import LEADLoss
    from leadkd.models import DualEncoder

    student_folder, teacher_folder = folders
    student = st_student(student_folder)
    loss = LEADLoss(student, DualEncoder.from_pretrained(teacher_folder), k=1)
    rows = [{"query": q, "positive": p} for q, p in zip(QUERIES, POSITIVES)]
    from sentence_transformers.base.trainer import BaseTrainer
    features, labels = BaseTrainer.collect_features(None, SentenceTransformerDataCollator(student.preprocess)(rows))
    with pytest.raises(LeadkdError, match="text_collator"):
        loss(features, labels)


def test_importing_the_integration_leaves_the_trainer_and_config_alone():
    code = ("import sys, leadkd.integrations.sentence_transformers as m; "
            "bad = [n for n in ('leadkd.distill.trainer', 'leadkd.config', 'leadkd.distill.objectives') "
            "if n in sys.modules]; print(bad); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
