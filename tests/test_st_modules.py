"""sentence-transformers module pipelines: Dense projections and Normalize followed exactly, the rest refused.

Every model here is built with sentence-transformers' own API and compared with its own ``encode``;
the per-layer vectors are compared with a pooling of the Hugging Face hidden states written below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm, Normalize, Pooling, Transformer  # noqa: E402

from conftest import make_tiny_bert_folder  # noqa: E402
from leadkd.models import loading  # noqa: E402
from leadkd.models.dual_encoder import DualEncoder  # noqa: E402
from leadkd.runtime.errors import LeadkdError  # noqa: E402

QUERIES = ["cancer risk", "gene dna", "brain blood heart"]
PASSAGES = ["the cell shows high levels of protein", "a vaccine for the virus in mouse and human",
            "drug dose trial", "cells " * 40]  # the last is cut at the length limit by both
PROMPTS = {"query": "the ", "document": "a "}
MAX_LENGTH = 12


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_tiny_bert_folder(tmp_path_factory.mktemp("st_bert") / "bert", layers=3, hidden=32, seed=3,
                                 init_range=0.2)


def build_st(bert: Path, target: Path, dense: list[tuple[int, int, bool, nn.Module]], normalize: bool = True,
             pooling: str = "mean", extra: list[nn.Module] = (), seed: int = 0, **save) -> Path:
    """A sentence-transformers model saved to ``target``: Transformer, Pooling, Dense..., [extra], [Normalize]."""
    transformer = Transformer(str(bert), max_seq_length=MAX_LENGTH)
    modules: list[nn.Module] = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    torch.manual_seed(seed)
    for in_features, out_features, bias, activation in dense:
        projection = Dense(in_features, out_features, bias=bias, activation_function=activation)
        with torch.no_grad():  # weights wide enough that a wrong activation or order shows
            projection.linear.weight.normal_(0, 0.5)
            if bias:
                projection.linear.bias.normal_(0, 0.5)
        modules.append(projection)
    modules.extend(extra)
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=PROMPTS)
    model.save(str(target), **save)
    return target


def st_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode_query(QUERIES), model.encode_document(PASSAGES)


def assert_same_as_st(de: DualEncoder, folder: Path) -> None:
    queries, passages = st_embeddings(folder)
    assert de.encode_queries(QUERIES).shape == queries.shape
    np.testing.assert_allclose(de.encode_queries(QUERIES), queries, atol=1e-5)
    np.testing.assert_allclose(de.encode_passages(PASSAGES), passages, atol=1e-5)


TANH_32_16 = [(32, 16, True, nn.Tanh())]
TWO_DENSE = [(32, 48, True, nn.Tanh()), (48, 16, True, nn.Identity())]


@pytest.mark.parametrize("dense, normalize, pooling", [
    (TANH_32_16, True, "mean"),
    (TANH_32_16, False, "cls"),
    (TWO_DENSE, True, "mean"),              # two projections in a row, the first widening
    ([(32, 24, False, nn.Tanh())], True, "cls"),   # Dense without bias
    ([(32, 40, True, nn.ReLU())], False, "mean"),  # wider than the encoder, another activation
])
def test_leadkd_reproduces_sentence_transformers(bert, tmp_path, dense, normalize, pooling):
    folder = build_st(bert, tmp_path / "st", dense, normalize=normalize, pooling=pooling)
    de = DualEncoder.from_pretrained(folder)
    assert (de.pooling, de.normalize, de.query_prefix, de.passage_prefix, de.max_passage_length) == \
        (pooling, normalize, "the ", "a ", MAX_LENGTH)
    assert [layer.out_features for layer in de.dense] == [spec[1] for spec in dense]
    assert de.embedding_size == dense[-1][1] and de.hidden_size == 32
    assert_same_as_st(de, folder)
    # the generic entry point too
    assert_same_as_st(loading.load_model(folder), folder)


def test_pickled_dense_weights_need_the_opt_in(bert, tmp_path):
    folder = build_st(bert, tmp_path / "st", TANH_32_16, safe_serialization=False)
    assert (folder / "2_Dense" / "pytorch_model.bin").is_file()
    with pytest.raises(LeadkdError, match="pickle"):
        DualEncoder.from_pretrained(folder)
    assert_same_as_st(DualEncoder.from_pretrained(folder, use_safetensors=False), folder)


def naive_layer_vectors(folder: Path, texts: list[str], prefix: str, limit: int, normalize: bool) -> np.ndarray:
    """``[L, N, hidden]``: mean over each text's real tokens of every block's output, from HF directly."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    for text in texts:
        ids = tokenizer(prefix + text, truncation=True, max_length=limit, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        per_layer = []
        for hidden in states:
            vector = sum(hidden[0, t] for t in range(ids.shape[1])) / ids.shape[1]
            if normalize:
                vector = vector / vector.norm()
            per_layer.append(vector.numpy())
        out.append(per_layer)
    return np.transpose(np.array(out), (1, 0, 2))


@pytest.mark.parametrize("dense", [TANH_32_16, [(32, 40, True, nn.Tanh())]])
def test_intermediate_layers_are_pooled_hidden_states_and_the_last_is_the_embedding(bert, tmp_path, dense):
    folder = build_st(bert, tmp_path / "st", dense, normalize=True)
    de = DualEncoder.from_pretrained(folder)
    width = max(32, dense[-1][1])
    assert de.layer_width == width
    layered = de.encode_passages(PASSAGES, layers=[0, 1, 2])
    assert layered.shape == (3, len(PASSAGES), width)
    naive = naive_layer_vectors(folder, PASSAGES, "a ", MAX_LENGTH, normalize=True)
    np.testing.assert_allclose(layered[:2, :, :32], naive[:2], atol=1e-5)   # no projection before the last
    np.testing.assert_allclose(layered[:2, :, 32:], 0.0)                     # zero padding when it is wider
    _, st_passages = st_embeddings(folder)
    np.testing.assert_allclose(layered[2, :, :dense[-1][1]], st_passages, atol=1e-5)
    np.testing.assert_allclose(layered[2, :, dense[-1][1]:], 0.0)
    # the training view agrees, and its last slice scores like the final embeddings do
    with torch.no_grad():
        trained = de.layer_embeddings(PASSAGES, "passage").numpy()
        scores = de.layer_scores(QUERIES, PASSAGES).numpy()
    np.testing.assert_allclose(trained, layered, atol=1e-5)
    st_queries, _ = st_embeddings(folder)
    np.testing.assert_allclose(scores[-1], st_queries @ st_passages.T, atol=1e-5)
    q_naive = naive_layer_vectors(folder, QUERIES, "the ", de.max_query_length, normalize=True)
    np.testing.assert_allclose(scores[0], q_naive[0] @ naive[0].T, atol=1e-5)


@pytest.mark.parametrize("dense, normalize", [(TWO_DENSE, True), ([(32, 24, False, nn.Tanh())], False)])
def test_saved_folder_rebuilds_the_same_encoder(bert, tmp_path, dense, normalize):
    folder = build_st(bert, tmp_path / "st", dense, normalize=normalize)
    de = DualEncoder.from_pretrained(folder)
    saved = tmp_path / "saved"
    de.save_pretrained(saved)
    modules = json.loads((saved / "modules.json").read_text())
    expected = ["Transformer", "Pooling"] + ["Dense"] * len(dense) + (["Normalize"] if normalize else [])
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == expected
    for module in modules[2:2 + len(dense)]:
        assert (saved / module["path"] / "model.safetensors").is_file()
        assert not (saved / module["path"] / "pytorch_model.bin").exists()
    original = st_embeddings(folder)
    rebuilt = st_embeddings(saved)
    np.testing.assert_allclose(rebuilt[0], original[0], atol=1e-5)
    np.testing.assert_allclose(rebuilt[1], original[1], atol=1e-5)
    again = loading.load_model(saved)
    assert len(again.dense) == len(dense)
    assert_same_as_st(again, folder)


def test_unsupported_module_is_refused_in_one_line(bert, tmp_path):
    folder = build_st(bert, tmp_path / "st", TANH_32_16, extra=[LayerNorm(16)])
    with pytest.raises(LeadkdError) as info:
        DualEncoder.from_pretrained(folder)
    message = str(info.value)
    assert "modules.json" in message and "module 3" in message and "LayerNorm" in message and "\n" not in message
    with pytest.raises(LeadkdError, match="LayerNorm"):
        loading.load_model(folder)


def test_made_up_and_misplaced_modules_are_refused(bert, tmp_path):
    folder = build_st(bert, tmp_path / "st", TANH_32_16, normalize=True)
    modules = json.loads((folder / "modules.json").read_text())
    made_up = [*modules[:2], {"idx": 2, "name": "2", "path": "2_Whatever", "type": "my_package.MagicPooling"},
               *modules[2:]]
    (folder / "modules.json").write_text(json.dumps(made_up))
    with pytest.raises(LeadkdError, match=r"modules.json: module 2 \('my_package.MagicPooling'\) is not supported"):
        loading.read_st_settings(str(folder))
    normalize_first = [modules[0], modules[1], modules[3], modules[2]]
    (folder / "modules.json").write_text(json.dumps(normalize_first))
    with pytest.raises(LeadkdError, match=r"module 2 \(Dense\) comes after Normalize"):
        DualEncoder.from_pretrained(folder)


def test_dense_that_does_not_fit_is_refused(bert, tmp_path):
    folder = build_st(bert, tmp_path / "st", TANH_32_16)
    config = json.loads((folder / "2_Dense" / "config.json").read_text())
    (folder / "2_Dense" / "config.json").write_text(json.dumps({**config, "out_features": 8}))
    with pytest.raises(LeadkdError, match="2_Dense.*do not match its config.json"):
        DualEncoder.from_pretrained(folder)
    (folder / "2_Dense" / "config.json").write_text(json.dumps({**config, "in_features": 20}))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "2_Dense" / "model.safetensors"))
    save_file({**weights, "linear.weight": weights["linear.weight"][:, :20].contiguous()},
              str(folder / "2_Dense" / "model.safetensors"))
    with pytest.raises(LeadkdError, match="modules.json: Dense projection 0 takes 20 features but gets 32"):
        DualEncoder.from_pretrained(folder)
    (folder / "2_Dense" / "config.json").write_text(json.dumps({**config, "activation_function": "os.system"}))
    with pytest.raises(LeadkdError, match="activation_function 'os.system' is not a torch.nn module"):
        DualEncoder.from_pretrained(folder)


def test_students_cut_from_a_projected_teacher_have_no_projection_unless_asked(bert, tmp_path):
    from leadkd.config import ModelConfig

    teacher = DualEncoder.from_pretrained(build_st(bert, tmp_path / "st", TANH_32_16))
    student = DualEncoder.from_blocks(teacher, [0, 2], ModelConfig())
    assert len(student.dense) == 0 and student.embedding_size == 32 and student.normalize
    kept = DualEncoder.from_blocks(teacher, [0, 2], ModelConfig(), keep_dense=True)
    assert len(kept.dense) == 1 and kept.dense[0] is not teacher.dense[0]
    torch.testing.assert_close(kept.dense[0].linear.weight, teacher.dense[0].linear.weight)


# -- distillation with a projected teacher ------------------------------------------------------------------

@pytest.fixture(scope="module")
def distill_setup(tmp_path_factory) -> dict[str, Path]:
    from conftest import make_tiny_beir, make_tiny_groups

    root = tmp_path_factory.mktemp("st_distill")
    base = make_tiny_bert_folder(root / "bert", layers=4, seed=5)
    # wider than the encoder: the cached and gathered per-layer tensors are zero-padded to 48
    teacher = build_st(base, root / "teacher", [(32, 48, True, nn.Tanh())], normalize=True)
    return {"teacher": teacher, "data": make_tiny_beir(root / "data"),
            "groups": make_tiny_groups(root / "groups.jsonl")}


@pytest.mark.parametrize("mode", ["frozen", "cached", "joint"])
def test_distillation_with_a_projected_teacher_runs(distill_setup, tmp_path, mode):
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    values = {
        "teacher.path": str(distill_setup["teacher"]), "teacher.max_query_length": 12,
        "teacher.max_passage_length": 12, "student.init": "teacher_layers=[0,3]",
        "student.max_query_length": 12, "student.max_passage_length": 12,
        "data.corpus": str(distill_setup["data"]), "data.train_groups": str(distill_setup["groups"]),
        "data.num_negatives": 3, "optim.steps": 3, "optim.batch_size": 4, "optim.lr": 1e-3, "layers.k": 2,
        "checkpoint.every": 3, "eval.split": None, "log_every": 1, "output_dir": str(tmp_path / "run"),
        "teacher.train": mode == "joint", "teacher.cache": mode == "cached",
    }
    config = load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()], kind="distill")
    run_job(config, log=lambda message: None)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 3 and all(np.isfinite(losses))
    student = loading.load_model(out / "final")
    assert len(student.dense) == 0 and student.num_layers == 2
    if mode == "cached":
        meta = json.loads(next((out / "teacher-cache").rglob("meta.json")).read_text())
        assert meta["dim"] == 48
    if mode == "joint":  # the trained teacher keeps its projection, in sentence-transformers' layout
        teacher = loading.load_model(out / "final-teacher")
        assert [layer.out_features for layer in teacher.dense] == [48]
        assert_same_as_st(teacher, out / "final-teacher")


def test_retrieval_with_a_narrowing_projection_uses_the_embedding_width(distill_setup, tmp_path):
    """Indexes hold the final embedding's width; per-layer evaluation and mining with the quickstart's
    precomputed per-layer corpus vectors run when the projection narrows (32 -> 16)."""
    from leadkd.data.datasets import load_dataset
    from leadkd.retrieval.mine import mine_hard_negatives
    from leadkd.retrieval.pipeline import encode_corpus, evaluate_layers

    base = make_tiny_bert_folder(tmp_path / "bert", layers=2, seed=2)
    de = DualEncoder.from_pretrained(build_st(base, tmp_path / "st", TANH_32_16))
    dataset = load_dataset(str(distill_setup["data"]), split="train")
    assert encode_corpus(de, dataset.corpus, show_progress=False).vectors.shape == (len(dataset.corpus), 16)
    layered = de.encode_passages(dataset.corpus.passages(range(len(dataset.corpus))), layers=[0, 1])
    rows = evaluate_layers(de, dataset, corpus_vectors=layered)
    assert len(rows) == 2 and rows[-1] == pytest.approx(evaluate_layers(de, dataset)[-1])
    groups, _ = mine_hard_negatives(de, dataset, depth=10, rank_range=(1, 10), negatives=3,
                                    corpus_embeddings=layered[-1][:, :de.embedding_size])
    assert len(groups) > 0
