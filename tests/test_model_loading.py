"""Settings from leadkd/sentence-transformers metadata, save/load round trips, and load_model dispatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import leadkd.models as models_pkg
from leadkd.errors import LeadkdError
from leadkd.models import DualEncoder, load_model
from leadkd.models import loading
from leadkd.models.base import LEADKD_CONFIG

QUERIES = ["cancer risk", "dose of the drug", "dna"]
PASSAGES = ["the study shows high levels of protein in cells", "virus", "a trial of the drug and heart risk"]


def st_folder(base: Path, target: Path, pooling: dict, normalize: bool = False, bert_config: dict | None = None,
              st_config: dict | None = None) -> Path:
    """A copy of ``base`` with hand-written sentence-transformers metadata."""
    shutil.copytree(base, target)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (target / "modules.json").write_text(json.dumps(modules))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    if bert_config is not None:
        (target / "sentence_bert_config.json").write_text(json.dumps(bert_config))
    if st_config is not None:
        (target / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return target


def test_plain_hf_folder_gets_the_papers_defaults(tiny_bert):
    de = load_model(tiny_bert)
    assert isinstance(de, DualEncoder)
    assert de.settings() == {"pooling": "cls", "normalize": False, "query_prefix": "", "passage_prefix": "",
                             "max_query_length": 64, "max_passage_length": 128,  # 256 capped at 128 positions
                             "similarity_scale": 1.0}


def test_sentence_transformers_metadata_is_read(tiny_bert, tmp_path):
    folder = st_folder(tiny_bert, tmp_path / "st", {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True},
                       normalize=True, bert_config={"max_seq_length": 40, "do_lower_case": False},
                       st_config={"prompts": {"query": "q: ", "document": "d: "}, "default_prompt_name": None})
    de = DualEncoder.from_pretrained(folder)
    assert de.settings() == {"pooling": "mean", "normalize": True, "query_prefix": "q: ", "passage_prefix": "d: ",
                             "max_query_length": 64, "max_passage_length": 40, "similarity_scale": 1.0}
    # Explicit arguments win over the metadata.
    de = DualEncoder.from_pretrained(folder, pooling="cls", normalize=False, passage_prefix="", max_passage_length=9)
    assert (de.pooling, de.normalize, de.query_prefix, de.passage_prefix, de.max_passage_length) == \
        ("cls", False, "q: ", "", 9)


def test_new_style_st_metadata(tiny_bert, tmp_path):
    """sentence-transformers >= 6: ``pooling_mode`` string, limit in the tokenizer config, passage prompt names."""
    folder = st_folder(tiny_bert, tmp_path / "st6", {"pooling_mode": "cls", "include_prompt": True},
                       bert_config={"transformer_task": "feature-extraction"},
                       st_config={"prompts": {"passage": "p: "}})
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 100}))
    settings = loading.read_st_settings(str(folder))
    assert settings == {"normalize": False, "pooling": "cls", "max_passage_length": 100, "passage_prefix": "p: "}


@pytest.mark.parametrize("pooling, message", [
    ({"pooling_mode": "max"}, "pooling 'max' is not supported"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "combined pooling"),
    ({"pooling_mode": "mean", "include_prompt": False}, "include_prompt"),
])
def test_unsupported_st_pooling_names_the_file(tiny_bert, tmp_path, pooling, message):
    folder = st_folder(tiny_bert, tmp_path / "bad", pooling)
    with pytest.raises(LeadkdError, match=message) as info:
        DualEncoder.from_pretrained(folder)
    assert "1_Pooling" in str(info.value) and "\n" not in str(info.value)


def test_save_and_reload_round_trip(tiny_bert, tmp_path):
    de = DualEncoder.from_pretrained(tiny_bert, pooling="mean", normalize=True, query_prefix="q ",
                                     passage_prefix="p ", max_query_length=16, max_passage_length=48,
                                     similarity_scale=20.0)
    target = tmp_path / "saved"
    de.save_pretrained(target)
    saved = json.loads((target / LEADKD_CONFIG).read_text())
    assert saved["kind"] == "dual_encoder" and saved["leadkd_version"]
    assert {k: saved[k] for k in de.settings()} == de.settings()
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".saved*"))  # no temporary folder left behind

    again = load_model(target)
    assert isinstance(again, DualEncoder) and again.settings() == de.settings()
    np.testing.assert_allclose(again.encode_queries(QUERIES), de.encode_queries(QUERIES), atol=1e-6)
    np.testing.assert_allclose(again.encode_passages(PASSAGES), de.encode_passages(PASSAGES), atol=1e-6)
    assert load_model(target, pooling="cls").pooling == "cls"  # overrides reach from_pretrained

    # Saving again over the folder replaces it whole.
    DualEncoder.from_pretrained(target, normalize=False).save_pretrained(target)
    assert json.loads((target / LEADKD_CONFIG).read_text())["normalize"] is False


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_sentence_transformers_reproduces_saved_model(tiny_bert, tmp_path, pooling, normalize):
    st = pytest.importorskip("sentence_transformers")
    prefixes = {"query_prefix": "the ", "passage_prefix": "a "} if pooling == "mean" else {}
    de = DualEncoder.from_pretrained(tiny_bert, pooling=pooling, normalize=normalize, max_passage_length=12,
                                     **prefixes)
    de.save_pretrained(tmp_path / "m")
    theirs = st.SentenceTransformer(str(tmp_path / "m"), device="cpu")
    long_passage = "cells " * 40  # truncated at 12 tokens by both
    np.testing.assert_allclose(theirs.encode_document(PASSAGES + [long_passage]),
                               de.encode_passages(PASSAGES + [long_passage]), atol=1e-5)
    np.testing.assert_allclose(theirs.encode_query(QUERIES), de.encode_queries(QUERIES), atol=1e-5)
    assert theirs.similarity_fn_name == ("cosine" if normalize else "dot")


class FakeModel:
    """Stands in for another kind's class: records what load_model hands to it."""

    @classmethod
    def from_pretrained(cls, path, **overrides):
        instance = cls()
        instance.path, instance.overrides = path, overrides
        return instance


def test_load_model_dispatches_on_kind(tmp_path, monkeypatch):
    folder = tmp_path / "colbert"
    folder.mkdir()
    (folder / LEADKD_CONFIG).write_text(json.dumps({"kind": "colbert", "dim": 128}))
    monkeypatch.setitem(loading.MODEL_KINDS, "colbert", f"{__name__}:FakeModel")
    model = load_model(folder, max_query_length=32)
    assert isinstance(model, FakeModel)
    assert model.path == str(folder) and model.overrides == {"max_query_length": 32}


def test_registry_names_the_three_kinds():
    assert loading.MODEL_KINDS == {"dual_encoder": "leadkd.models.dual_encoder:DualEncoder",
                                   "colbert": "leadkd.models.colbert:ColBERT",
                                   "cross_encoder": "leadkd.models.cross_encoder:CrossEncoder"}
    assert loading.model_class("dual_encoder") is DualEncoder
    with pytest.raises(LeadkdError, match="unknown model kind"):
        loading.model_class("bm25")


@pytest.mark.parametrize("content, message", [
    ({"kind": "splade"}, "unknown model kind 'splade'"),
    ({"pooling": "cls"}, "no model 'kind'"),
    ("{not json", "not valid JSON"),
])
def test_bad_leadkd_config_names_the_file(tmp_path, content, message):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / LEADKD_CONFIG).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(LeadkdError, match=message) as info:
        load_model(folder)
    assert LEADKD_CONFIG in str(info.value)


def test_missing_or_non_model_paths(tmp_path):
    with pytest.raises(LeadkdError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(LeadkdError, match="does not exist"):
        DualEncoder.from_pretrained("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeadkdError, match="not a model folder"):
        load_model(tmp_path / "empty")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(LeadkdError, match="is a file"):
        load_model(tmp_path / "file.bin")


def test_pickled_weights_load_only_as_plain_tensors(tiny_bert, tmp_path):
    """A plain ``pytorch_model.bin`` loads; one whose pickle would run code is refused and nothing runs."""
    import os

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_bert, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    reference = DualEncoder.from_pretrained(tiny_bert).encode_passages(["cell protein"], show_progress=False)
    loaded = DualEncoder.from_pretrained(folder).encode_passages(["cell protein"], show_progress=False)
    assert np.allclose(reference, loaded, atol=1e-6)

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"embeddings.word_embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(LeadkdError, match="refusing its pickled weights") as info:
        DualEncoder.from_pretrained(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    assert not marker.exists()


def test_package_exports_other_kinds_lazily():
    assert {"DualEncoder", "load_model", "ColBERT", "CrossEncoder"} <= set(models_pkg.__all__)
    with pytest.raises(AttributeError):
        models_pkg.NoSuchModel  # noqa: B018
