"""PyLate and ColBERTv2 checkpoints: leadkd's ColBERT scores them as those libraries do.

Each folder is written by hand in the layout its library writes (PyLate: a sentence-transformers folder
with its own Dense module and prefix tokens added to the tokenizer; ColBERTv2: an ``HF_ColBERT`` BERT
folder with ``bert.*`` + ``linear.weight`` and ``artifact.metadata``). The reference scores are computed
here from the plain Hugging Face model, one text at a time, with the inputs laid out by hand.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import TINY_WORDS, make_tiny_bert_folder
from leadkd.models.colbert import PROJECTION_FILE, ColBERT
from leadkd.models.colbert_formats import detect_format
from leadkd.models.loading import load_model
from leadkd.runtime.errors import LeadkdError

WORDS = TINY_WORDS + list(string.punctuation) + ["[unused0]"]
QUERIES = ["the cell protein?", "cancer risk of the drug dose in patients , high levels of rna and dna"]
PASSAGES = ["dna .", "the virus shows high levels of rna , in the brain and heart !", "a mouse study", "blood ; ."]
DIM = 8


def _write_json(file: Path, payload) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(payload, indent=2))


def _projection(seed: int) -> torch.Tensor:
    return torch.randn(DIM, 32, generator=torch.Generator().manual_seed(seed))


def make_pylate_folder(path: Path, *, query_length: int = 12, document_length: int = 16, attend: bool = False,
                       expansion: bool = True, dense: dict | None = None) -> Path:
    """What ``pylate.models.ColBERT(base).save(path)`` writes: the encoder (prefix tokens added to the
    tokenizer, embeddings resized), ``modules.json``, ``1_Dense`` and PyLate's keys in
    ``config_sentence_transformers.json``."""
    from transformers import AutoModel, AutoTokenizer

    make_tiny_bert_folder(path, words=WORDS, dropout=0.0)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    tokenizer.add_tokens(["[Q] ", "[D] "])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _write_json(path / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
    ])
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": document_length - 1, "do_lower_case": False})
    _write_json(path / "1_Dense" / "config.json", {
        "in_features": 32, "out_features": DIM, "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False, **(dense or {})})
    save_file({"linear.weight": _projection(1)}, str(path / "1_Dense" / "model.safetensors"))
    _write_json(path / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": "3.0.0", "pylate": "1.1.4"}, "prompts": {},
        "default_prompt_name": None, "similarity_fn_name": "MaxSim", "query_prefix": "[Q] ",
        "document_prefix": "[D] ", "query_length": query_length, "document_length": document_length,
        "attend_to_expansion_tokens": attend, "skiplist_words": list(string.punctuation),
        "do_query_expansion": expansion})
    return path


def make_colbertv2_folder(path: Path, *, query_maxlen: int = 12, doc_maxlen: int = 16, attend: bool = False,
                          mask_punctuation: bool = True, similarity: str = "cosine") -> Path:
    """What ColBERT's ``HF_ColBERT.save_pretrained`` + ``artifact.metadata`` give: ``bert.*`` and
    ``linear.weight`` in one safetensors file, ``architectures: [HF_ColBERT]``."""
    from transformers import AutoModel

    make_tiny_bert_folder(path, words=WORDS, dropout=0.0)
    model = AutoModel.from_pretrained(path)
    weights = {f"bert.{key}": value.contiguous() for key, value in model.state_dict().items()}
    weights["linear.weight"] = _projection(2)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["HF_ColBERT"]
    _write_json(path / "config.json", config)
    _write_json(path / "artifact.metadata", {
        "query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_token": "[Q]", "doc_token": "[D]",
        "query_maxlen": query_maxlen, "doc_maxlen": doc_maxlen, "dim": DIM, "similarity": similarity,
        "attend_to_mask_tokens": attend, "mask_punctuation": mask_punctuation, "interaction": "colbert",
        "nway": 2, "checkpoint": "bert-base-uncased"})
    return path


# ---------------------------------------------------------------------------------------------- reference
class Reference:
    """A ColBERT scored by hand: marker after [CLS], [MASK] expansion, projection, normalisation, skiplist."""

    def __init__(self, path: Path, fmt: str):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        vocab = self.tokenizer.get_vocab()
        if fmt == "pylate":
            settings = json.loads((path / "config_sentence_transformers.json").read_text())
            self.weight = load_file(str(path / "1_Dense" / "model.safetensors"))["linear.weight"]
            self.q_marker, self.d_marker = vocab["[Q] "], vocab["[D] "]
            self.q_len, self.d_len = settings["query_length"], settings["document_length"]
            self.expansion = settings["do_query_expansion"]
            self.attend = settings["attend_to_expansion_tokens"] and self.expansion
            self.skip = {vocab[word] for word in settings["skiplist_words"]}
        else:
            meta = json.loads((path / "artifact.metadata").read_text())
            self.weight = load_file(str(path / "model.safetensors"))["linear.weight"]
            self.q_marker, self.d_marker = vocab[meta["query_token_id"]], vocab[meta["doc_token_id"]]
            self.q_len, self.d_len = meta["query_maxlen"], meta["doc_maxlen"]
            self.expansion, self.attend = True, meta["attend_to_mask_tokens"]
            self.skip = {vocab[s] for s in string.punctuation} if meta["mask_punctuation"] else set()
        self.cls, self.sep, self.mask = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]

    def _layers(self, ids: list[int], attention: list[int]) -> list[torch.Tensor]:
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([attention]),
                             output_hidden_states=True)
        states = [h[0] for h in out.hidden_states[1:]]
        states.append(F.normalize(states[-1] @ self.weight.T, dim=-1))  # the final vectors, after the raw ones
        return states

    def query(self, text: str) -> list[torch.Tensor]:
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.q_len - 3]
        ids = [self.cls, self.q_marker] + body + [self.sep]
        attention = [1] * len(ids)
        if self.expansion:
            pads = self.q_len - len(ids)
            ids, attention = ids + [self.mask] * pads, attention + [int(self.attend)] * pads
        return self._layers(ids, attention)

    def passage(self, text: str) -> list[torch.Tensor]:
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.d_len - 3]
        ids = [self.cls, self.d_marker] + body + [self.sep]
        keep = [i for i, token in enumerate(ids) if token not in self.skip]
        return [states[keep] for states in self._layers(ids, [1] * len(ids))]

    def scores(self, queries, passages) -> torch.Tensor:
        """``[layers + 1, Q, P]``: each block's raw MaxSim, then the final (projected) score."""
        q_all = [self.query(q) for q in queries]
        p_all = [self.passage(p) for p in passages]
        table = torch.zeros(len(q_all[0]), len(queries), len(passages))
        for qi, q_states in enumerate(q_all):
            for pi, p_states in enumerate(p_all):
                for layer, (q, p) in enumerate(zip(q_states, p_states, strict=True)):
                    table[layer, qi, pi] = sum(max(float(q[i] @ p[j]) for j in range(p.shape[0]))
                                               for i in range(q.shape[0]))
        return table


def _leadkd_scores(model: ColBERT) -> torch.Tensor:
    with torch.no_grad():
        raw = model.encode_batch(QUERIES, PASSAGES, list(range(model.num_layers)), final=True).scores()
        final = model.score(QUERIES, PASSAGES)
    torch.testing.assert_close(raw[-1], final, atol=1e-5, rtol=1e-5)
    return raw


FOLDERS = {
    "pylate": lambda path, **kw: make_pylate_folder(path, **kw),
    "pylate-attended": lambda path, **kw: make_pylate_folder(path, attend=True, **kw),
    "pylate-no-expansion": lambda path, **kw: make_pylate_folder(path, expansion=False, **kw),
    "colbertv2": lambda path, **kw: make_colbertv2_folder(path, **kw),
    "colbertv2-attended": lambda path, **kw: make_colbertv2_folder(path, attend=True, **kw),
}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_final_and_layer_scores_match_a_hand_made_colbert(name, tmp_path):
    path = FOLDERS[name](tmp_path / name)
    fmt = name.split("-")[0]
    assert detect_format(path) == fmt
    model = ColBERT.from_pretrained(path)
    expected = Reference(path, fmt).scores(QUERIES, PASSAGES)
    torch.testing.assert_close(_leadkd_scores(model), expected, atol=1e-5, rtol=1e-5)
    assert model.options.marker_position == "after_cls" and model.options.dim == DIM
    assert model.options.skiplist  # punctuation: the passages above contain some
    ids, attention = model.tokenize_queries(QUERIES)
    assert ids[0, 0] == model.tokenizer.cls_token_id and ids[0, 1] == model.query_marker_id
    if name.endswith("no-expansion"):
        assert not (ids == model.mask_id).any()
    else:
        assert ids.shape[1] == 12 and bool(attention.all()) == name.endswith("attended")


def test_the_skiplist_and_attention_really_change_the_scores(tmp_path):
    """The reference is not trivially met: dropping the skiplist or attending the [MASK]s moves the score."""
    path = make_colbertv2_folder(tmp_path / "cb")
    with torch.no_grad():
        base = ColBERT.from_pretrained(path).score(QUERIES, PASSAGES)
        kept = ColBERT.from_pretrained(path, skiplist=[]).score(QUERIES, PASSAGES)
        attended = ColBERT.from_pretrained(path, attend_expansion=True).score(QUERIES, PASSAGES)
        replaced = ColBERT.from_pretrained(path, marker_position="replace_cls").score(QUERIES, PASSAGES)
    for other in (kept, attended, replaced):
        assert (other - base).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["pylate", "colbertv2"])
def test_settings_are_read_from_the_checkpoint(fmt, tmp_path):
    path = FOLDERS[fmt](tmp_path / fmt)
    settings_file = path / ("config_sentence_transformers.json" if fmt == "pylate" else "artifact.metadata")
    settings = json.loads(settings_file.read_text())
    settings["query_length" if fmt == "pylate" else "query_maxlen"] = 9
    settings_file.write_text(json.dumps(settings))
    model = ColBERT.from_pretrained(path)
    assert model.query_length == 9 and model.tokenize_queries(QUERIES)[0].shape == (2, 9)
    torch.testing.assert_close(_leadkd_scores(model), Reference(path, fmt).scores(QUERIES, PASSAGES),
                               atol=1e-5, rtol=1e-5)
    assert ColBERT.from_pretrained(path, max_query_length=10).query_length == 10  # an override still wins


def test_colbertv2_settings_fall_back_to_config_json(tmp_path):
    path = make_colbertv2_folder(tmp_path / "cb", query_maxlen=10, mask_punctuation=False)
    metadata = json.loads((path / "artifact.metadata").read_text())
    (path / "artifact.metadata").unlink()
    config = json.loads((path / "config.json").read_text())
    config.update({key: metadata[key] for key in ("query_token_id", "doc_token_id", "query_maxlen", "doc_maxlen",
                                                  "dim", "attend_to_mask_tokens", "mask_punctuation")})
    _write_json(path / "config.json", config)
    assert detect_format(path) == "colbertv2"
    model = ColBERT.from_pretrained(path)
    assert model.query_length == 10 and model.options.skiplist == ()
    (path / "artifact.metadata").write_text(json.dumps(metadata))
    torch.testing.assert_close(_leadkd_scores(model), Reference(path, "colbertv2").scores(QUERIES, PASSAGES),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense, field", [({"bias": True}, "bias"),
                                          ({"activation_function": "torch.nn.modules.activation.Tanh"},
                                           "activation_function")])
def test_a_projection_colbert_does_not_have_is_refused_in_one_line(dense, field, tmp_path):
    path = make_pylate_folder(tmp_path / "bad", dense=dense)
    with pytest.raises(LeadkdError, match=rf"1_Dense/config.json: field '{field}'") as caught:
        ColBERT.from_pretrained(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("file, change, field", [
    ("sentence_bert_config.json", {"do_lower_case": True}, "do_lower_case"),
    ("config_sentence_transformers.json", {"prompts": {"query": "q: "}, "default_prompt_name": "query"},
     "default_prompt_name"),
])
def test_pylate_text_preprocessing_leadkd_cannot_mirror_is_refused(file, change, field, tmp_path):
    path = make_pylate_folder(tmp_path / "pre")
    settings = {**json.loads((path / file).read_text()), **change}
    _write_json(path / file, settings)
    with pytest.raises(LeadkdError, match=rf"{file}: field '{field}'"):
        ColBERT.from_pretrained(path)


def test_l2_colbertv2_is_refused_in_one_line(tmp_path):
    path = make_colbertv2_folder(tmp_path / "l2", similarity="l2")
    with pytest.raises(LeadkdError, match=r"artifact.metadata: field 'similarity': 'l2' is not supported"):
        ColBERT.from_pretrained(path)


@pytest.mark.parametrize("name", ["pylate", "pylate-no-expansion", "colbertv2"])
def test_save_and_reopen_gives_identical_scores(name, tmp_path):
    model = ColBERT.from_pretrained(FOLDERS[name](tmp_path / "source"))
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / PROJECTION_FILE).is_file()
    saved = json.loads((tmp_path / "saved" / "leadkd_config.json").read_text())
    assert saved["marker_position"] == "after_cls" and saved["skiplist"] == list(model.options.skiplist)
    for reopened in (ColBERT.from_pretrained(tmp_path / "saved"), load_model(tmp_path / "saved")):
        assert reopened.options == model.options
        assert torch.equal(_leadkd_scores(reopened), _leadkd_scores(model))


@pytest.mark.parametrize("fmt", ["pylate", "colbertv2"])
def test_load_model_opens_them_as_colbert(fmt, tmp_path):
    path = FOLDERS[fmt](tmp_path / fmt)
    model = load_model(path)
    assert isinstance(model, ColBERT) and model.kind == "colbert"
    assert torch.equal(model.projection.weight, _projection(1 if fmt == "pylate" else 2))


def test_plain_encoders_keep_the_papers_format(tiny_bert):
    assert detect_format(tiny_bert) is None
    model = ColBERT.from_pretrained(tiny_bert)
    assert model.options.marker_position == "replace_cls" and model.options.attend_expansion
    assert model.options.skiplist == () and "skiplist" not in model.settings()
