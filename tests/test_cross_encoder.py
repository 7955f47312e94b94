"""Cross-encoder: the shared head at every layer's [CLS], checked pair by pair, and its group rule."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from leadkd.models.cross_encoder import HEAD_FILE, CrossEncoder
from leadkd.runtime.errors import ConfigError, LeadkdError

QUERIES = ["the cell protein", "cancer risk of the drug dose"]
PASSAGES = ["dna", "the virus shows high levels of rna in the brain", "a mouse study",  # query 0
            "blood", "patients with heart disease", "the trial results show a low effect"]  # query 1
GROUP = 3


@pytest.fixture(scope="module")
def cross_encoder(tiny_bert) -> CrossEncoder:
    return CrossEncoder.from_pretrained(tiny_bert, max_length=32)


def _reference(model: CrossEncoder, query: str, passage: str, token_types: bool) -> list[float]:
    """Per-layer head scores of one pair: its own forward pass, the head applied by hand."""
    encoded = model.tokenizer(query, passage, return_tensors="pt", return_token_type_ids=True)
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if token_types:
        inputs["token_type_ids"] = encoded["token_type_ids"]
    hidden = model.backbone(**inputs, output_hidden_states=True).hidden_states[1:]
    weight, bias = model.head.weight[0], model.head.bias[0]
    return [float(h[0, 0] @ weight + bias) for h in hidden]


@pytest.mark.parametrize("token_types", [True, False])
def test_every_layer_matches_pairwise_reference(tiny_bert, token_types):
    model = CrossEncoder.from_pretrained(tiny_bert, max_length=32, use_token_type_ids=token_types)
    with torch.no_grad():
        scores = model.layer_scores(QUERIES, PASSAGES)
        expected = [[_reference(model, q, PASSAGES[i * GROUP + g], token_types) for g in range(GROUP)]
                    for i, q in enumerate(QUERIES)]
    assert scores.shape == (model.num_layers, len(QUERIES), GROUP)
    torch.testing.assert_close(scores, torch.tensor(expected).permute(2, 0, 1), atol=1e-5, rtol=1e-5)


def test_token_type_ids_switch(tiny_bert, cross_encoder):
    inputs = cross_encoder.tokenize_pairs(["the cell"], ["dna rna"])
    assert inputs["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    plain = CrossEncoder.from_pretrained(tiny_bert, max_length=32, use_token_type_ids=False)
    assert "token_type_ids" not in plain.tokenize_pairs(["the cell"], ["dna rna"])
    with torch.no_grad():
        assert not torch.allclose(plain.score(QUERIES, PASSAGES), cross_encoder.score(QUERIES, PASSAGES))


def test_models_without_segment_embeddings_get_no_token_types(cross_encoder):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(cross_encoder.tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, type_vocab_size=1)
    model = CrossEncoder(cross_encoder.tokenizer, BertModel(config).eval())
    assert not model.feeds_token_types
    assert model.layer_scores(QUERIES, PASSAGES).shape == (1, 2, GROUP)


def test_candidates_are_each_querys_own_group(cross_encoder):
    with torch.no_grad():
        grouped = cross_encoder.layer_scores(QUERIES, PASSAGES)
        alone = cross_encoder.layer_scores(QUERIES[1:], PASSAGES[GROUP:])
        single = cross_encoder.layer_scores(QUERIES, PASSAGES[:2])  # G = 1
    torch.testing.assert_close(grouped[:, 1:], alone, atol=1e-5, rtol=1e-5)
    assert single.shape == (2, 2, 1)
    for passages in (PASSAGES[:5], [], PASSAGES[:1]):
        with pytest.raises(LeadkdError, match="same number of candidates for every query"):
            cross_encoder.layer_scores(QUERIES, passages)


def test_score_score_pairs_and_layer_selection(cross_encoder):
    with torch.no_grad():
        every = cross_encoder.layer_scores(QUERIES, PASSAGES)
        torch.testing.assert_close(cross_encoder.score(QUERIES, PASSAGES), every[-1])
        torch.testing.assert_close(cross_encoder.layer_scores(QUERIES, PASSAGES, layers=[0]), every[:1])
    pair_queries = [q for q in QUERIES for _ in range(GROUP)]
    cross_encoder.train()
    pairs = cross_encoder.score_pairs(pair_queries, PASSAGES, batch_size=4)
    assert cross_encoder.training  # mode restored after the eval-mode pass
    cross_encoder.eval()
    assert isinstance(pairs, np.ndarray) and pairs.dtype == np.float32 and pairs.shape == (6,)
    np.testing.assert_allclose(pairs, every[-1].reshape(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(cross_encoder.score_pairs(pair_queries, PASSAGES, batch_size=1), pairs, atol=1e-5)
    with pytest.raises(LeadkdError, match="pairs must align"):
        cross_encoder.score_pairs(QUERIES, PASSAGES)
    with pytest.raises(LeadkdError, match="layer -3 does not exist"):
        cross_encoder.layer_scores(QUERIES, PASSAGES, layers=[-3])


def test_truncation_cuts_the_passage_and_survives_long_queries(tiny_bert):
    model = CrossEncoder.from_pretrained(tiny_bert, max_length=10)
    ids = model.tokenize_pairs(["the cell protein"], ["dna rna virus vaccine brain heart blood drug"])["input_ids"]
    vocab = model.tokenizer.get_vocab()
    assert ids.shape == (1, 10)
    assert ids[0, :5].tolist() == [vocab[t] for t in ("[CLS]", "the", "cell", "protein", "[SEP]")]
    assert ids[0, -1] == vocab["[SEP]"]
    inputs = model.tokenize_pairs(["cell " * 40], ["dna " * 40])
    assert inputs["input_ids"].shape[1] <= 10 and inputs["token_type_ids"].sum() > 0  # the passage kept a part
    assert model.layer_scores(["cell " * 40], ["dna " * 40]).shape == (2, 1, 1)


def test_save_load_round_trip(cross_encoder, tmp_path):
    cross_encoder.save_pretrained(tmp_path / "ce")
    saved = json.loads((tmp_path / "ce" / "leadkd_config.json").read_text())
    assert saved.pop("leadkd_version")
    assert saved == {"kind": "cross_encoder", "max_length": 32, "use_token_type_ids": True, "head": "linear",
                     "activation": "torch.nn.modules.activation.Sigmoid"}
    assert (tmp_path / "ce" / HEAD_FILE).is_file() and (tmp_path / "ce" / "model.safetensors").is_file()
    loaded = CrossEncoder.from_pretrained(tmp_path / "ce")
    assert loaded.options == cross_encoder.options
    with torch.no_grad():
        assert torch.equal(loaded.layer_scores(QUERIES, PASSAGES), cross_encoder.layer_scores(QUERIES, PASSAGES))
    assert not CrossEncoder.from_pretrained(tmp_path / "ce", use_token_type_ids=False).feeds_token_types


def test_fresh_head_is_seeded_normal_with_zero_bias(tiny_bert):
    first, second = CrossEncoder.from_pretrained(tiny_bert).head, CrossEncoder.from_pretrained(tiny_bert).head
    assert torch.equal(first.weight, second.weight) and float(first.bias.detach()) == 0.0
    assert 0.005 < float(first.weight.detach().std()) < 0.05


def test_another_kinds_folder_gives_only_its_backbone(tiny_bert, tmp_path, caplog):
    folder = tmp_path / "de"
    shutil.copytree(tiny_bert, folder)
    (folder / "leadkd_config.json").write_text(json.dumps({"kind": "dual_encoder", "max_length": 7}))
    with caplog.at_level(logging.WARNING):
        model = CrossEncoder.from_pretrained(folder, use_token_type_ids=False)
    assert model.options.max_length == 256 and not model.options.use_token_type_ids
    assert "'dual_encoder' model; loading only its backbone" in caplog.text


def test_bad_options_are_rejected(tiny_bert):
    with pytest.raises(ConfigError, match="unknown cross_encoder option.*dim"):
        CrossEncoder.from_pretrained(tiny_bert, dim=128)
    with pytest.raises(ConfigError, match="max_length"):
        CrossEncoder.from_pretrained(tiny_bert, max_length=2)


def test_gradient_reaches_backbone_and_head(tiny_bert):
    model = CrossEncoder.from_pretrained(tiny_bert, max_length=32).train()
    scores = model(QUERIES, PASSAGES)  # calling the module is layer_scores
    torch.log_softmax(scores, dim=-1)[:, :, 0].sum().backward()
    assert model.head.weight.grad.abs().sum() > 0
    # The bias is shared by every candidate of a query, so it cancels in the softmax over them: its gradient
    # is zero but for rounding (once asserted non-zero, which failed in some test orders). It is a parameter
    # that receives a gradient, which the last line checks.
    assert model.head.bias.grad.abs().max() < 1e-5
    assert model.backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(param.grad is not None for param in model.parameters() if param.requires_grad)


def test_plain_checkpoint_gets_a_fresh_head_with_a_log_line(tiny_bert, caplog):
    with caplog.at_level(logging.INFO, logger="leadkd"):
        CrossEncoder.from_pretrained(tiny_bert)
    assert HEAD_FILE in caplog.text and "fresh" in caplog.text
