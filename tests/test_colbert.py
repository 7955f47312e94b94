"""ColBERT: per-layer MaxSim checked against a per-pair, per-token reference, plus its input format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from leadkd.models.colbert import PROJECTION_FILE, ColBERT, maxsim_scores
from leadkd.runtime.errors import ConfigError, LeadkdError

QUERIES = ["the cell protein", "cancer risk of the drug dose in patients"]
PASSAGES = ["dna", "the virus shows high levels of rna in the brain and heart", "a mouse study", "blood"]
Q_LEN = 12


@pytest.fixture(scope="module")
def colbert(tiny_bert) -> ColBERT:
    return ColBERT.from_pretrained(tiny_bert, dim=16, max_query_length=Q_LEN, max_passage_length=24)


def _reference_scores(model: ColBERT, query: str, passage: str, raw_last: bool = False) -> list[float]:
    """Per-layer MaxSim of one pair, with the inputs built by hand and Python loops over tokens; the last
    layer projected and normalised as ColBERT's score, or (``raw_last``) raw like the others."""
    vocab = model.tokenizer.get_vocab()
    q_ids = model.tokenizer(query)["input_ids"][:Q_LEN]
    q_ids = [vocab[model.options.query_marker]] + q_ids[1:] + [vocab["[MASK]"]] * (Q_LEN - len(q_ids))
    p_ids = model.tokenizer(passage)["input_ids"]
    p_ids = [vocab[model.options.doc_marker]] + p_ids[1:]

    def layers(ids: list[int]) -> list[torch.Tensor]:
        out = model.backbone(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             output_hidden_states=True)
        states = [h[0] for h in out.hidden_states[1:]]
        if not raw_last:
            last = states[-1] @ model.projection.weight.T if model.projection is not None else states[-1]
            states[-1] = last / last.norm(dim=-1, keepdim=True)
        return states

    scores = []
    for q_states, p_states in zip(layers(q_ids), layers(p_ids), strict=True):
        total = 0.0
        for i in range(q_states.shape[0]):
            total += max(float(q_states[i] @ p_states[j]) for j in range(p_states.shape[0]))
        scores.append(total)
    return scores


@pytest.mark.parametrize("folder", ["tiny_bert", "tiny_bert_other"])
def test_every_layer_matches_per_pair_reference(folder, tiny_bert, tiny_bert_other):
    path = {"tiny_bert": tiny_bert, "tiny_bert_other": tiny_bert_other}[folder]
    model = ColBERT.from_pretrained(path, max_query_length=Q_LEN)
    queries = [q.upper() for q in QUERIES] if folder == "tiny_bert_other" else QUERIES
    with torch.no_grad():
        scores = model.layer_scores(queries, PASSAGES)
        expected = torch.tensor([[_reference_scores(model, q, p) for p in PASSAGES] for q in queries])
    assert scores.shape == (model.num_layers, len(queries), len(PASSAGES))
    torch.testing.assert_close(scores, expected.permute(2, 0, 1), atol=1e-4, rtol=1e-5)


def test_markers_replace_cls_and_queries_pad_with_attended_mask(colbert):
    vocab = colbert.tokenizer.get_vocab()
    ids, mask = colbert.tokenize_queries(QUERIES)
    assert ids.shape == (2, Q_LEN) and bool(mask.all())
    assert (ids[:, 0] == vocab["[unused1]"]).all() and not (ids == vocab["[CLS]"]).any()
    assert (ids[0, 5:] == vocab["[MASK]"]).all()  # [Q] the cell protein [SEP] then [MASK]...
    p_ids, p_mask = colbert.tokenize_passages(PASSAGES)
    assert (p_ids[:, 0] == vocab["[unused2]"]).all() and not (p_ids == vocab["[CLS]"]).any()
    assert ((p_ids == vocab["[PAD]"]) == (p_mask == 0)).all()
    assert p_mask[0].tolist()[:4] == [1, 1, 1, 0]


def test_mask_padding_is_attended_by_real_query_tokens(colbert):
    ids, mask = colbert.tokenize_queries(QUERIES[:1])
    with torch.no_grad():
        augmented = colbert.query_layer_states(QUERIES[:1], layers=[0])[0][0]
        unattended = colbert.backbone(input_ids=ids, attention_mask=(ids != colbert.mask_id).long(),
                                      output_hidden_states=True).hidden_states[1]
    assert not torch.allclose(augmented[0, :5], unattended[0, :5], atol=1e-4)


def test_document_padding_never_contributes(colbert):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 8, generator=generator)
    p = torch.randn(4, 6, 8, generator=generator)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    base = maxsim_scores(q, p, mask)
    padded = torch.cat([p, torch.full((4, 3, 8), 1e6)], dim=1)  # huge "pad" states would win any max
    padded_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(maxsim_scores(q, padded, padded_mask), base)
    torch.testing.assert_close(maxsim_scores(q, p, mask, chunk_size=1), base)
    with torch.no_grad():
        alone = colbert.layer_scores(QUERIES, PASSAGES[:1])
        beside_long = colbert.layer_scores(QUERIES, [PASSAGES[0], PASSAGES[1] * 2])
    torch.testing.assert_close(beside_long[:, :, :1], alone, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_all_padding_row_stays_finite_and_cannot_win(dtype):
    q = torch.ones(2, 32, 4, dtype=dtype)
    p = -torch.ones(3, 5, 4, dtype=dtype)  # every real similarity is negative
    mask = torch.tensor([[1] * 5, [0] * 5, [1, 0, 0, 0, 0]])
    scores = maxsim_scores(q, p, mask)
    assert torch.isfinite(scores).all()
    assert (scores[:, 1] < scores[:, 0]).all() and (scores[:, 1] < scores[:, 2]).all()


def test_last_layer_is_projected_and_normalised_intermediate_raw(colbert, tiny_bert):
    with torch.no_grad():
        states, mask = colbert.query_layer_states(QUERIES)
        ids, _ = colbert.tokenize_queries(QUERIES)
        raw = colbert.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
    assert [s.shape[-1] for s in states] == [32, 16]
    torch.testing.assert_close(states[0], raw[0])
    torch.testing.assert_close(states[1], F.normalize(raw[1] @ colbert.projection.weight.T, dim=-1))
    torch.testing.assert_close(states[1].norm(dim=-1), torch.ones(2, Q_LEN))
    unprojected = ColBERT.from_pretrained(tiny_bert, dim=None, max_query_length=Q_LEN)
    assert unprojected.projection is None
    with torch.no_grad():
        last = unprojected.query_layer_states(QUERIES, layers=[-1])[0][0]
    torch.testing.assert_close(last, F.normalize(raw[1], dim=-1))


def test_layer_selection_and_score(colbert):
    with torch.no_grad():
        every = colbert.layer_scores(QUERIES, PASSAGES)
        torch.testing.assert_close(colbert.layer_scores(QUERIES, PASSAGES, layers=[-1])[0], every[-1])
        torch.testing.assert_close(colbert.layer_scores(QUERIES, PASSAGES, layers=[1, 0]), every.flip(0))
        torch.testing.assert_close(colbert.score(QUERIES, PASSAGES), every[-1])
    with pytest.raises(LeadkdError, match="layer 2 does not exist"):
        colbert.layer_scores(QUERIES, PASSAGES, layers=[2])


@pytest.mark.parametrize("dim", [16, None])
def test_the_layer_view_scores_the_last_layer_raw_and_the_final_score_apart(tiny_bert, dim):
    """What LEAD's layer loss sees (the paper's code): MaxSim over every block's raw output, the last one
    included; the response term alone gets the projected, normalised final score, appended after them."""
    model = ColBERT.from_pretrained(tiny_bert, dim=dim, max_query_length=Q_LEN, max_passage_length=24)
    last = model.num_layers - 1
    with torch.no_grad():
        view = model.encode_batch(QUERIES, PASSAGES, [0, last], final=True).scores()
        raw = torch.tensor([[_reference_scores(model, q, p, raw_last=True) for p in PASSAGES] for q in QUERIES])
        final = torch.tensor([[_reference_scores(model, q, p) for p in PASSAGES] for q in QUERIES])
        only_final = model.encode_batch(QUERIES, PASSAGES, [], final=True).scores()
        earlier = model.encode_batch(QUERIES, PASSAGES, [last], final=True, raw_last_layer=False).scores()
    assert view.shape == (3, len(QUERIES), len(PASSAGES))
    torch.testing.assert_close(view[0], raw[..., 0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(view[1], raw[..., last], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(view[2], final[..., last], atol=1e-4, rtol=1e-5)
    assert (view[1] - view[2]).abs().min() > 1e-3  # raw and final really differ
    torch.testing.assert_close(only_final[0], view[2])
    torch.testing.assert_close(earlier[0], earlier[1])  # colbert_last_layer=final: the old view
    torch.testing.assert_close(model.score(QUERIES, PASSAGES), view[2])  # the ordinary score is unchanged


@pytest.mark.parametrize("role", ["query_marker", "doc_marker"])
def test_missing_marker_token_is_named(tiny_bert, role):
    with pytest.raises(LeadkdError, match=rf"{role} '\[Q\]' is not in the tokenizer's vocabulary"):
        ColBERT.from_pretrained(tiny_bert, **{role: "[Q]"})


def test_unknown_option_is_rejected(tiny_bert):
    with pytest.raises(ConfigError, match="unknown colbert option.*pooling"):
        ColBERT.from_pretrained(tiny_bert, pooling="cls")


def test_save_load_round_trip_and_saved_settings(colbert, tmp_path):
    colbert.save_pretrained(tmp_path / "cb")
    saved = json.loads((tmp_path / "cb" / "leadkd_config.json").read_text())
    assert saved.pop("leadkd_version")
    assert saved == {"kind": "colbert", "dim": 16, "query_marker": "[unused1]", "doc_marker": "[unused2]",
                     "max_query_length": Q_LEN, "max_passage_length": 24}
    assert (tmp_path / "cb" / PROJECTION_FILE).is_file() and (tmp_path / "cb" / "model.safetensors").is_file()
    loaded = ColBERT.from_pretrained(tmp_path / "cb")
    assert loaded.options == colbert.options
    with torch.no_grad():
        assert torch.equal(loaded.layer_scores(QUERIES, PASSAGES), colbert.layer_scores(QUERIES, PASSAGES))
    assert ColBERT.from_pretrained(tmp_path / "cb", max_query_length=8).options.max_query_length == 8
    with pytest.raises(LeadkdError, match="projection weight has shape"):
        ColBERT.from_pretrained(tmp_path / "cb", dim=8)
    colbert.save_pretrained(tmp_path / "cb")  # overwriting an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cb"]


def test_fresh_projection_is_seeded(tiny_bert):
    first = ColBERT.from_pretrained(tiny_bert).projection.weight
    second = ColBERT.from_pretrained(tiny_bert).projection.weight
    assert first.shape == (128, 32) and torch.equal(first, second)


def test_gradient_reaches_backbone_and_projection(tiny_bert):
    model = ColBERT.from_pretrained(tiny_bert, dim=16, max_query_length=Q_LEN).train()
    scores = model(QUERIES, PASSAGES)  # calling the module is layer_scores
    torch.log_softmax(scores, dim=-1)[:, :, 0].sum().backward()
    assert model.projection.weight.grad is not None and model.projection.weight.grad.abs().sum() > 0
    first_block = model.backbone.encoder.layer[0].attention.self.query.weight.grad
    assert first_block is not None and first_block.abs().sum() > 0
    assert model.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # every trainable parameter gets a gradient (DDP-safe): BERT's unused pooler is frozen
    assert all(param.grad is not None for param in model.parameters() if param.requires_grad)
    assert not any(param.requires_grad for param in model.backbone.pooler.parameters())
