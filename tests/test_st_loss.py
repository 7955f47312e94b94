"""LEADLoss (leadkd.integrations.sentence_transformers): the same loss as leadkd's own trainer on one batch,
a short SentenceTransformerTrainer run that helps, and a saved folder that is a plain ST model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
    inputs = text_collator(model)(rows)
    return BaseTrainer.collect_features(None, inputs)


def leadkd_loss(student, teacher, train_teacher, pairs, **loss_settings):
    """The loss leadkd's trainer backpropagates for this batch: its Distillation objective on a GroupBatch."""
    from leadkd.config import LossConfig
    from leadkd.data.batches import GroupBatch
    from leadkd.distill.build import EncodeForward, Trained
    from leadkd.distill.objectives import Distillation

    group = 1 + len(NEGATIVES[0])
    passages = [text for positive, negatives in zip(POSITIVES, NEGATIVES, strict=True)
                for text in [positive, *negatives]]
    ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(passages))}
    batch = GroupBatch(query_ids=[f"q{i}" for i in range(len(QUERIES))], queries=QUERIES,
                       passage_ids=[ids[text] for text in passages], passages=passages,
                       labels=torch.arange(len(QUERIES)) * group, group_size=group,
                       positive_ids=[(ids[text],) for text in POSITIVES])
    config = LossConfig(**loss_settings)
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # only marks "trains"
    raw = config.raw_last_layer
    objective = Distillation(Trained("student", student, EncodeForward(student, raw), dummy),
                             Trained("teacher", teacher, EncodeForward(teacher, raw), dummy if train_teacher else None),
                             config, torch.device("cpu"))
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
    features, labels = st_features(student, [QUERIES, POSITIVES, *map(list, zip(*NEGATIVES, strict=True))])
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


@pytest.mark.parametrize("kind,settings", [("CrossEncoder", {}), ("ColBERT", {}),
                                           ("ColBERT", {"colbert_last_layer": "final", "in_batch_negatives": False})])
def test_loss_equals_leadkd_trainers_loss_with_other_teacher_kinds(folders, kind, settings):
    """A cross-encoder teacher scores each query's own group (the student's scores are cut to it); a ColBERT
    teacher the whole batch, its last layer raw or final."""
    import leadkd.models
    from leadkd.integrations.sentence_transformers import LEADLoss
    from leadkd.models import DualEncoder

    student_folder, teacher_folder = folders
    teacher = getattr(leadkd.models, kind).from_pretrained(teacher_folder)
    student = st_student(student_folder)
    pairs = [(0, 1), (2, 3)]
    loss = LEADLoss(student, teacher, strategy="map", pairs=pairs, train_teacher=True, **settings)
    features, labels = st_features(student, [QUERIES, POSITIVES, *map(list, zip(*NEGATIVES, strict=True))])
    ours = loss(features, labels)
    theirs = leadkd_loss(DualEncoder.from_pretrained(student_folder, pooling="cls"), teacher, True, pairs, **settings)
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


def test_a_sentence_transformers_cross_encoder_teacher_keeps_its_trained_head(folders, tmp_path):
    """An in-memory ST CrossEncoder teaches with its own head: its last-layer scores are predict's logits."""
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from leadkd.integrations.sentence_transformers import LEADLoss, as_leadkd_teacher
    from leadkd.models import CrossEncoder, load_model

    student_folder, _ = folders
    teacher_folder = make_tiny_bert_folder(tmp_path / "bert", layers=2, seed=4, dropout=0.0, init_range=0.5)
    st_teacher = STCrossEncoder(str(teacher_folder), num_labels=1, max_length=32, device="cpu")
    with torch.no_grad():  # a "trained" head: scores far apart, so a fresh head in its place would show
        st_teacher.model.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    adapted = as_leadkd_teacher(st_teacher)
    assert isinstance(adapted, CrossEncoder) and adapted.options.head == "sequence_classification"
    logits = st_teacher.predict(list(zip(QUERIES, POSITIVES, strict=True)), activation_fn=torch.nn.Identity())
    with torch.no_grad():
        ours = adapted.layer_scores(QUERIES, POSITIVES)[-1, :, 0]  # each query's one candidate
    assert float(torch.as_tensor(logits).std()) > 0.05
    assert torch.allclose(ours, torch.as_tensor(logits, dtype=torch.float32), atol=1e-5)
    st_teacher.save_pretrained(str(tmp_path / "ce"))
    assert load_model(tmp_path / "ce").kind == "cross_encoder"  # the saved folder is found a reranker too
    student = st_student(student_folder)
    features, labels = st_features(student, [QUERIES, POSITIVES, *map(list, zip(*NEGATIVES, strict=True))])
    assert torch.isfinite(LEADLoss(student, st_teacher, strategy="map", pairs=[(0, 0), (2, 1)])(features, labels))


def test_missing_raw_texts_is_one_clear_error(folders):
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from leadkd.integrations.sentence_transformers import LEADLoss
    from leadkd.models import DualEncoder
    from leadkd.runtime.errors import LeadkdError

    student_folder, teacher_folder = folders
    student = st_student(student_folder)
    loss = LEADLoss(student, DualEncoder.from_pretrained(teacher_folder), k=1)
    rows = [{"query": q, "positive": p} for q, p in zip(QUERIES, POSITIVES, strict=True)]
    from sentence_transformers.base.trainer import BaseTrainer
    features, labels = BaseTrainer.collect_features(None, SentenceTransformerDataCollator(student.preprocess)(rows))
    with pytest.raises(LeadkdError, match="text_collator"):
        loss(features, labels)


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_integration_leaves_the_trainer_and_config_alone():
    code = ("import sys, leadkd.integrations.sentence_transformers as m; "
            "bad = [n for n in ('leadkd.distill.trainer', 'leadkd.config.jobs', 'leadkd.distill.objectives') "
            "if n in sys.modules]; print(bad); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- a real run through ST's trainer

TRAIN_QUERIES, DEV_QUERIES, SLICE_PASSAGES = 64, 50, 300


def scifact_slice(source, target):
    """A BEIR folder: the passages judged for the first train and dev queries, then unjudged fillers."""
    import json

    def qrels(split, count):
        rows = {}
        for line in (source / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]:
            qid, doc_id, rel = line.split("\t")
            rows.setdefault(qid, {})[doc_id] = int(rel)
        return {qid: rows[qid] for qid in list(rows)[:count]}

    train, dev = qrels("train-nodev", TRAIN_QUERIES), qrels("dev", DEV_QUERIES)
    judged = {doc for split in (train, dev) for docs in split.values() for doc in docs}
    kept, fillers = [], []
    for line in (source / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True):
        doc_id = json.loads(line)["_id"]
        if doc_id in judged:
            kept.append(line)
        elif len(fillers) < SLICE_PASSAGES:
            fillers.append(line)
    target.mkdir(parents=True)
    (target / "corpus.jsonl").write_text("".join(kept + fillers[:max(0, SLICE_PASSAGES - len(kept))]))
    lines = {json.loads(line)["_id"]: line for line in (source / "queries.jsonl").read_text().splitlines(True)}
    (target / "queries.jsonl").write_text("".join(lines[qid] for qid in [*train, *dev]))
    (target / "qrels").mkdir()
    for split, judgments in (("train", train), ("dev", dev)):
        rows = "".join(f"{q}\t{d}\t{r}\n" for q, docs in judgments.items() for d, r in docs.items())
        (target / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return target


def hard_negative_rows(miner, folder):
    """(query, positive, negative_1) rows: each train query's first positive and the ``miner``'s best-ranked
    passage that is not judged for it (no BM25 needed)."""
    import numpy as np

    from leadkd.data.datasets import load_dataset

    dataset = load_dataset(folder, split="train")
    corpus, queries = dataset.corpus, dataset.queries
    passages = corpus.passages(range(len(corpus)))
    query_texts = queries.texts(range(len(queries)))
    scores = miner.encode_queries(query_texts) @ miner.encode_passages(passages).T
    rows = {"query": [], "positive": [], "negative_1": []}
    for i, scores_i in enumerate(scores):
        judged = dataset.qrels[queries.id_at(i)]
        negative = next(j for j in np.argsort(-scores_i) if corpus.id_at(int(j)) not in judged)
        rows["query"].append(query_texts[i])
        rows["positive"].append(corpus.passage(corpus.index(next(iter(judged)))))
        rows["negative_1"].append(passages[int(negative)])
    return rows


def cut_minilm_student(teacher, folder):
    """A 2-block student (blocks 0 and 5 of the teacher), saved by leadkd as a dual-encoder / ST folder."""
    from leadkd.models import DualEncoder
    from leadkd.models.surgery import keep_layers

    DualEncoder(keep_layers(teacher.backbone, [0, 5]), teacher.tokenizer,
                **{**teacher.settings(), "max_query_length": 96}).save_pretrained(folder)
    return folder


def dev_ndcg(folder, data):
    from leadkd.models import DualEncoder
    from leadkd.retrieval.pipeline import evaluate_retriever

    return evaluate_retriever(DualEncoder.from_pretrained(folder), str(data), "dev")["nDCG@10"]


def check_saved_st_folder(student, saved):
    """(c): the saved model is a plain sentence-transformers folder that encodes as the trained model."""
    from sentence_transformers import SentenceTransformer

    reloaded = SentenceTransformer(str(saved), device="cpu")
    vectors = reloaded.encode(["a query about cells"], convert_to_tensor=True)
    assert vectors.shape == (1, 384)
    assert torch.allclose(vectors, student.encode(["a query about cells"], convert_to_tensor=True), atol=1e-5)


STEPS, BATCH, LR = 20, 8, 1e-4


@pytest.mark.slow
def test_twenty_steps_of_the_trainers_compute_loss_improve_dev_ndcg(data_dir, tmp_path):
    """The trainer's own per-step path - text_collator, then SentenceTransformerTrainer.compute_loss (which runs
    collect_features and the loss) - for 20 AdamW steps; runs without the trainer's `datasets`/`accelerate`."""
    import random
    import types

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.base.trainer import BaseTrainer

    from leadkd.integrations.sentence_transformers import LEADLoss, text_collator
    from leadkd.models import DualEncoder
    from leadkd.models.base import DEFAULT_MODEL

    torch.manual_seed(0)
    data = scifact_slice(data_dir / "scifact", tmp_path / "slice")
    teacher = DualEncoder.from_pretrained(DEFAULT_MODEL, max_passage_length=96, similarity_scale=20.0)
    start = cut_minilm_student(teacher, tmp_path / "student-start")
    before = dev_ndcg(start, data)

    student = SentenceTransformer(str(start), device="cpu")
    columns = hard_negative_rows(DualEncoder.from_pretrained(start), data)  # cheaper than the teacher
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    loss = LEADLoss(student, teacher, k=2, similarity_scale=20.0)
    trainer = types.SimpleNamespace(loss=loss, model=student, model_wrapped=student,
                                    collect_features=lambda inputs: BaseTrainer.collect_features(None, inputs))
    collate = text_collator(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 2) * (1 - step / STEPS))
    order = random.Random(0).sample(range(len(rows)), len(rows))
    student.train()
    for step in range(STEPS):
        at = step * BATCH % (len(rows) - BATCH + 1)
        inputs = collate([rows[i] for i in order[at:at + BATCH]])
        value = SentenceTransformerTrainer.compute_loss(trainer, student, inputs)
        value.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert loss.calls == STEPS and loss.schedule._draw_index == (STEPS - 1) // 10
    student.eval()
    saved = tmp_path / "student-trained"
    student.save_pretrained(str(saved))
    after = dev_ndcg(saved, data)
    print(f"dev nDCG@10 {before:.4f} -> {after:.4f}")
    assert after > before + 0.01, (before, after)
    check_saved_st_folder(student, saved)


@pytest.mark.slow
def test_twenty_sentence_transformer_trainer_steps_improve_dev_ndcg(data_dir, tmp_path):
    """The same through SentenceTransformerTrainer itself (needs its `datasets` and `accelerate` extras)."""
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from leadkd.integrations.sentence_transformers import LEADLoss, text_collator
    from leadkd.models import DualEncoder
    from leadkd.models.base import DEFAULT_MODEL

    data = scifact_slice(data_dir / "scifact", tmp_path / "slice")
    teacher = DualEncoder.from_pretrained(DEFAULT_MODEL, max_passage_length=96, similarity_scale=20.0)
    start = cut_minilm_student(teacher, tmp_path / "student-start")
    before = dev_ndcg(start, data)

    student = SentenceTransformer(str(start), device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
        warmup_steps=2, eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_drop_last=True)
    loss = LEADLoss(student, teacher, k=2, similarity_scale=20.0)
    train = Dataset.from_dict(hard_negative_rows(DualEncoder.from_pretrained(start), data))
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=train, loss=loss,
                                         data_collator=text_collator(student, args))
    trainer.train()
    saved = tmp_path / "student-trained"
    student.save_pretrained(str(saved))
    after = dev_ndcg(saved, data)
    assert after > before + 0.01, (before, after)
    check_saved_st_folder(student, saved)


def documented_example() -> str:
    """The Python block of docs/sentence-transformers.md's example, as written there."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "sentence-transformers.md").read_text(encoding="utf-8")
    block = text.split("## Example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 15
    return block


@pytest.mark.slow
def test_the_documented_example_runs(tiny_bert, tmp_path, monkeypatch):
    """The docs' example as is, but for the student's path and a 2-step run (needs the trainer's extras)."""
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import SentenceTransformer

    code = documented_example()
    for old, new in (('"path/to/small-student"', repr(str(tiny_bert))), ("max_steps=100", "max_steps=2"),
                     ("per_device_train_batch_size=16", ("per_device_train_batch_size=1, use_cpu=True, "
                                                         "report_to='none'"))):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/sentence-transformers.md", "exec"), {})
    assert SentenceTransformer(str(tmp_path / "out" / "student"), device="cpu").encode(["cells"]).shape[0] == 1


def test_the_readme_shows_the_same_example():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert documented_example() in readme


def test_the_documented_example_fits_the_api():
    """Where the trainer's extras are missing, at least the example's leadkd names exist and it is short."""
    import ast

    from leadkd.integrations import sentence_transformers as integration

    tree = ast.parse(documented_example())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "leadkd.integrations.sentence_transformers" for alias in node.names}
    assert names == {"LEADLoss", "text_collator"} and all(hasattr(integration, name) for name in names)


def test_the_step_callback_sets_the_layer_step_from_the_trainers(folders):
    import types

    from leadkd.distill.layers import LayerSchedule
    from leadkd.integrations.sentence_transformers import LEADLoss
    from leadkd.models import DualEncoder

    student_folder, teacher_folder = folders
    loss = LEADLoss(st_student(student_folder), DualEncoder.from_pretrained(teacher_folder), k=2, seed=3,
                    resample_every=2, gradient_accumulation_steps=4)
    loss.step_callback().on_step_begin(None, types.SimpleNamespace(global_step=7), None)
    assert loss.current_pairs(training=True) == LayerSchedule("random", 3, 4, k=2, seed=3,
                                                              resample_interval=2).pairs_for_step(7)
    assert loss.calls == 29


def test_the_collator_keeps_raw_texts_without_prompts_or_labels(folders):
    import types

    from leadkd.integrations.sentence_transformers import text_collator

    student = st_student(folders[0])
    rows = [{"query": q, "positive": p, "label": 1.0} for q, p in zip(QUERIES, POSITIVES, strict=True)]
    plain = text_collator(student)(rows)
    prompted = text_collator(student, types.SimpleNamespace(prompts={"query": "the a "}, router_mapping={}))(rows)
    assert plain["query_text"] == prompted["query_text"] == QUERIES and plain["positive_text"] == POSITIVES
    assert "label_text" not in plain and plain["label"].tolist() == [1.0] * len(QUERIES)
    assert prompted["query_input_ids"].shape[1] == plain["query_input_ids"].shape[1] + 2  # the prompt's two words
