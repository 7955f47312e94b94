"""DualEncoder: per-layer vectors and scores against a naive one-text-at-a-time computation, and encode()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leadkd.models import DualEncoder, pair_scores
from leadkd.runtime.errors import LeadkdError

QUERIES = ["cancer risk", "the effect of vaccine dose on heart", "dna"]
PASSAGES = [
    "the study shows high levels of protein in cells of patients with cancer",
    "virus",
    "a trial of the drug dose and the risk of heart and brain effects in human and mouse",
    "low blood levels",
    "genes and rna results show an increase in the treatment of patients",
]


def naive_layer_vectors(de: DualEncoder, texts: list[str], prefix: str, max_length: int) -> torch.Tensor:
    """[L, N, d] by hand: one text at a time, HF hidden states, hand pooling and normalisation."""
    per_text = []
    for text in texts:
        batch = de.tokenizer(prefix + text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = de.backbone(**batch, output_hidden_states=True).hidden_states[1:]
        vectors = torch.stack([h[0, 0] if de.pooling == "cls" else h[0].mean(dim=0) for h in hidden])
        per_text.append(F.normalize(vectors, dim=-1) if de.normalize else vectors)
    return torch.stack(per_text, dim=1)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_layer_embeddings_match_naive(models, pooling, normalize):
    de = models[(pooling, normalize)]
    got = de.layer_embeddings(PASSAGES, "passage")
    assert got.shape == (de.num_layers, len(PASSAGES), de.hidden_size) == (2, 5, 32)
    expected = naive_layer_vectors(de, PASSAGES, "", de.max_passage_length)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_layer_scores_match_naive(models, pooling):
    de = models[(pooling, True)]
    scores = de.layer_scores(QUERIES, PASSAGES)
    assert scores.shape == (2, len(QUERIES), len(PASSAGES))
    q = naive_layer_vectors(de, QUERIES, "", de.max_query_length)
    p = naive_layer_vectors(de, PASSAGES, "", de.max_passage_length)
    expected = torch.einsum("lqd,lpd->lqp", q, p)
    torch.testing.assert_close(scores.detach(), expected, atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1 + 1e-5  # cosine when normalised
    # The last slice is the ordinary score, which encode() reproduces.
    ordinary = de.encode_queries(QUERIES) @ de.encode_passages(PASSAGES).T
    np.testing.assert_allclose(scores[-1].detach().numpy(), ordinary, atol=1e-5)
    # A subset of layers is the same slices.
    torch.testing.assert_close(de.layer_scores(QUERIES, PASSAGES, layers=[-1]).detach(), scores[1:].detach())


def test_forward_is_layer_scores(models):
    de = models[("cls", False)]
    torch.testing.assert_close(de(QUERIES, PASSAGES, layers=[0]), de.layer_scores(QUERIES, PASSAGES, layers=[0]))


def test_pair_scores_is_batched_inner_product():
    q, p = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    expected = torch.stack([q[i] @ p[i].T for i in range(3)])
    torch.testing.assert_close(pair_scores(q, p), expected)
    torch.testing.assert_close(pair_scores(q, p, scale=20.0), 20.0 * expected)
    with pytest.raises(ValueError):
        pair_scores(q, torch.randn(2, 6, 8))


def test_similarity_scale_multiplies_scores_only(tiny_bert, models):
    plain = models[("cls", True)]
    scaled = DualEncoder.from_pretrained(tiny_bert, pooling="cls", normalize=True, similarity_scale=20)
    assert scaled.settings()["similarity_scale"] == 20.0
    torch.testing.assert_close(scaled.layer_scores(QUERIES, PASSAGES).detach(),
                               20 * plain.layer_scores(QUERIES, PASSAGES).detach())
    np.testing.assert_allclose(scaled.encode(PASSAGES), plain.encode(PASSAGES), atol=1e-6)
    with pytest.raises(LeadkdError, match="similarity_scale"):
        DualEncoder.from_pretrained(tiny_bert, similarity_scale=0)


def test_layer_numbers_are_checked(models):
    de = models[("cls", False)]
    with pytest.raises(LeadkdError, match="layer 2 does not exist"):
        de.layer_embeddings(QUERIES, "query", layers=[2])
    with pytest.raises(LeadkdError, match="layer"):
        de.encode(QUERIES, layers=[-3])
    with pytest.raises(LeadkdError, match="unknown side"):
        de.layer_embeddings(QUERIES, "document")
    with pytest.raises(TypeError):
        de.encode("one string")
    # Layer numbers from numpy (a sampler's output) are integers too; bools and floats are not.
    torch.testing.assert_close(de.layer_embeddings(QUERIES, "query", layers=[np.int64(-1)]),
                               de.layer_embeddings(QUERIES, "query", layers=[1]))
    for bad in (True, 1.0):
        with pytest.raises(LeadkdError, match="does not exist"):
            de.layer_embeddings(QUERIES, "query", layers=[bad])


def test_gradients_reach_the_encoder_but_not_the_unused_pooler(models):
    de = models[("mean", False)]
    de.zero_grad()
    de.layer_scores(QUERIES[:2], PASSAGES[:3]).sum().backward()
    grads = {name: p.grad for name, p in de.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert not any(p.requires_grad for p in de.backbone.pooler.parameters())
    de.zero_grad()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encode_keeps_input_order_and_matches_unbatched(models, pooling):
    de = models[(pooling, False)]
    texts = PASSAGES + ["cell", "the the the"]
    one_by_one = np.concatenate([de.encode([t], batch_size=1) for t in texts])
    for kwargs in ({"batch_size": 2, "max_batch_tokens": 0}, {"batch_size": 128, "max_batch_tokens": 20}, {}):
        got = de.encode(texts, **kwargs)
        assert got.dtype == np.float32 and got.shape == (len(texts), de.hidden_size)
        np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    expected = naive_layer_vectors(de, texts, "", de.max_passage_length)[-1].numpy()
    np.testing.assert_allclose(one_by_one, expected, atol=1e-5)


def test_encode_layers_and_edge_cases(models):
    de = models[("mean", True)]
    layered = de.encode(PASSAGES, layers=[0, 1], batch_size=2)
    assert layered.shape == (2, len(PASSAGES), de.hidden_size)
    with torch.no_grad():
        expected = de.layer_embeddings(PASSAGES, "passage").numpy()
    np.testing.assert_allclose(layered, expected, atol=1e-5)
    np.testing.assert_allclose(layered[-1], de.encode(PASSAGES), atol=1e-5)
    assert de.encode([]).shape == (0, de.hidden_size)
    assert de.encode([], layers=[0]).shape == (1, 0, de.hidden_size)
    assert de.encode(["", "cell"]).shape == (2, de.hidden_size)
    with pytest.raises(LeadkdError, match="batch_size"):
        de.encode(PASSAGES, batch_size=0)


def test_encode_is_deterministic_in_train_mode_and_restores_it(models):
    de = models[("cls", False)]
    reference = de.encode(PASSAGES)
    de.train()
    try:
        np.testing.assert_allclose(de.encode(PASSAGES, show_progress=True), reference, atol=1e-6)
        assert de.training and de.backbone.training
    finally:
        de.eval()


def test_prefixes_and_lengths_apply_by_side(tiny_bert, models):
    plain = models[("cls", False)]
    de = DualEncoder.from_pretrained(tiny_bert, query_prefix="the ", passage_prefix="a ", max_query_length=4,
                                     max_passage_length=6)
    assert (de.max_query_length, de.max_passage_length) == (4, 6)
    long_text = "cancer risk study patients treatment effect"
    np.testing.assert_allclose(de.encode_queries([long_text]), plain.encode_queries(["the cancer"]), atol=1e-6)
    np.testing.assert_allclose(de.encode_passages([long_text]), plain.encode_passages(["a cancer risk study"]),
                               atol=1e-6)
    batch = de.tokenize([long_text, ""], "query")  # "the " + "" is 3 tokens with [CLS], [SEP]
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_bad_settings_raise_one_line_errors(tiny_bert):
    with pytest.raises(LeadkdError, match="unknown pooling 'max'"):
        DualEncoder.from_pretrained(tiny_bert, pooling="max")
    with pytest.raises(LeadkdError, match="exceeds the model's 128 positions"):
        DualEncoder.from_pretrained(tiny_bert, max_passage_length=512)
    with pytest.raises(LeadkdError, match="max_query_length"):
        DualEncoder.from_pretrained(tiny_bert, max_query_length=0)


def test_default_lengths_are_capped_to_the_model(models):
    de = models[("cls", False)]  # tiny BERT: 128 positions; the default passage length is 256
    assert (de.max_query_length, de.max_passage_length) == (64, 128)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_prepared_padding_mask_gives_what_the_2d_mask_gives(implementation):
    """``block_outputs`` hands transformers a 4-D mask (its own check of a 2-D one reads the mask on the
    host, a GPU sync per forward): every hidden state equals the 2-D mask's, padded positions included."""
    from transformers import BertConfig, BertModel

    from leadkd.models.base import block_outputs, prepared_mask

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                 attn_implementation=implementation)).eval()
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:], mask[2, 2:] = 0, 0
    assert prepared_mask(model, mask).dim() == 4
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        for got, want in zip(block_outputs(model, ids, mask), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        unpadded = model(input_ids=ids, attention_mask=torch.ones_like(mask), output_hidden_states=True)
        for got, want in zip(block_outputs(model, ids, None), unpadded.hidden_states[1:], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # None: no padding, no mask at all


def test_a_model_that_builds_its_own_masks_keeps_the_2d_one():
    from transformers import DebertaV2Config, DebertaV2Model

    from leadkd.models.base import prepared_mask

    model = DebertaV2Model(DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=37, vocab_size=100))
    mask = torch.ones(2, 5, dtype=torch.long)
    assert prepared_mask(model, mask) is mask
