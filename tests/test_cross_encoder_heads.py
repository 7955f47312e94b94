"""Cross-encoders with a Hugging Face sequence-classification head: trained rerankers keep their head.

References are independent of leadkd: sentence-transformers' own ``CrossEncoder.predict``, transformers'
own ``*ForSequenceClassification`` logits, and the head applied by hand (``F.linear``, ``tanh``) to each
layer's [CLS] of the HF model's own ``output_hidden_states``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from conftest import TINY_WORDS, build_tiny_tokenizer, make_tiny_bert_folder
from leadkd.config import ModelConfig
from leadkd.models.cross_encoder import HEAD_FILE, CrossEncoder
from leadkd.models.loading import load_model
from leadkd.runtime.errors import ConfigError, LeadkdError

QUERIES = ["the cell protein", "cancer risk of the drug dose"]
PASSAGES = ["dna", "the virus shows high levels of rna in the brain", "a mouse study",
            "blood", "patients with heart disease", "the trial results show a low effect"]
GROUP = 3
PAIR_QUERIES = [q for q in QUERIES for _ in range(GROUP)]
SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"


def _tiny_config(architecture: str, vocab: int, **extra):
    import transformers

    common = dict(vocab_size=vocab, num_labels=1, pad_token_id=0, max_position_embeddings=64, **extra)
    if architecture == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **common)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if architecture == "albert":
        return transformers.AlbertConfig(embedding_size=16, **sizes, **common)
    if architecture == "electra":
        return transformers.ElectraConfig(embedding_size=16, **sizes, **common)
    name = {"bert": "BertConfig", "roberta": "RobertaConfig", "xlm-roberta": "XLMRobertaConfig",
            "camembert": "CamembertConfig", "mpnet": "MPNetConfig", "deberta-v2": "DebertaV2Config"}[architecture]
    return getattr(transformers, name)(**sizes, **common)


def _classifier(architecture: str, tokenizer, seed: int = 0, **extra):
    """A random tiny ``*ForSequenceClassification`` (hidden 32, 2 layers), with a non-zero classifier bias."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_tiny_config(architecture, len(tokenizer), **extra))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith(model.base_model_prefix):
                parameter.normal_(0, 0.3)  # a "trained" head, unlike any fresh one
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TINY_WORDS)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def hf_folder(request, tmp_path_factory):
    """An HF reranker folder (``save_pretrained`` of the model and tokenizer); BERT's tokenizer makes
    segment ids (as BERT's own does), RoBERTa's does not."""
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    tokenizer = build_tiny_tokenizer(TINY_WORDS)
    if request.param == "bert":
        tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
        tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names
    model = _classifier(request.param, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_segment_ids_follow_the_checkpoints_tokenizer(hf_folder):
    model = CrossEncoder.from_pretrained(hf_folder)
    assert model.feeds_token_types == (model.backbone.config.model_type == "bert")


@pytest.fixture(scope="module")
def st_folders(hf_folder, tmp_path_factory):
    """The same reranker saved by sentence-transformers' CrossEncoder, with its default and an identity activation."""
    from sentence_transformers import CrossEncoder as STCrossEncoder

    root = tmp_path_factory.mktemp("st")
    STCrossEncoder(str(hf_folder)).save_pretrained(str(root / "sigmoid"))
    STCrossEncoder(str(hf_folder), activation_fn=torch.nn.Identity()).save_pretrained(str(root / "identity"))
    return root / "sigmoid", root / "identity"


def _st_predict(folder, **kwargs):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    return STCrossEncoder(str(folder), **kwargs).predict(list(zip(PAIR_QUERIES, PASSAGES, strict=True)), batch_size=4)


def _naive_layer_scores(model, tokenizer, query: str, passage: str) -> list[float]:
    """Each layer's head score of one pair, the head written out by hand from the HF model's weights."""
    encoded = tokenizer(query, passage, return_tensors="pt")
    if getattr(model.config, "type_vocab_size", 2) < 2:
        encoded.pop("token_type_ids", None)
    with torch.no_grad():
        hidden = model(**encoded, output_hidden_states=True).hidden_states[1:]
    scores = []
    for states in hidden:
        cls = states[0, 0]
        if model.config.model_type == "bert":
            pooled = torch.tanh(F.linear(cls, model.bert.pooler.dense.weight, model.bert.pooler.dense.bias))
            logit = F.linear(pooled, model.classifier.weight, model.classifier.bias)
        else:  # RoBERTa's classification head: dense, tanh, out_proj
            head = model.classifier
            logit = F.linear(torch.tanh(F.linear(cls, head.dense.weight, head.dense.bias)),
                             head.out_proj.weight, head.out_proj.bias)
        scores.append(float(logit.detach()[0]))
    return scores


def test_last_layer_equals_sentence_transformers_predict(st_folders):
    sigmoid_folder, identity_folder = st_folders
    for folder, activation in ((sigmoid_folder, SIGMOID), (identity_folder, IDENTITY)):
        model = CrossEncoder.from_pretrained(folder)
        assert model.options.head == "sequence_classification" and model.options.activation == activation
        logits = model.score_pairs(PAIR_QUERIES, PASSAGES, batch_size=4)
        reranked = model.score_pairs(PAIR_QUERIES, PASSAGES, batch_size=4, activation=True)
        torch.testing.assert_close(torch.tensor(reranked), torch.tensor(_st_predict(folder)), atol=1e-5, rtol=1e-5)
        identity = _st_predict(folder, activation_fn=torch.nn.Identity())
        torch.testing.assert_close(torch.tensor(logits), torch.tensor(identity), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(reranked), torch.tensor(logits))  # identity: logits unchanged


def test_every_layer_equals_the_head_applied_by_hand(hf_folder):
    from transformers import AutoModelForSequenceClassification

    model = CrossEncoder.from_pretrained(hf_folder)
    reference = AutoModelForSequenceClassification.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        scores = model.layer_scores(QUERIES, PASSAGES)
    expected = torch.tensor([_naive_layer_scores(reference, model.tokenizer, q, p)
                             for q, p in zip(PAIR_QUERIES, PASSAGES, strict=True)])  # [N, L]
    assert scores.shape == (2, 2, GROUP)
    torch.testing.assert_close(scores.reshape(2, -1), expected.T, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0], scores[1])


def test_save_reload_and_reopen_with_transformers_and_st(st_folders, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = CrossEncoder.from_pretrained(st_folders[1], max_length=48)
    model.save_pretrained(tmp_path / "ce")
    files = {path.name for path in (tmp_path / "ce").iterdir()}
    assert {"config.json", "model.safetensors", "leadkd_config.json", "config_sentence_transformers.json",
            "modules.json"} <= files and HEAD_FILE not in files
    saved = json.loads((tmp_path / "ce" / "leadkd_config.json").read_text())
    assert saved["head"] == "sequence_classification" and saved["activation"] == IDENTITY
    reloaded = load_model(tmp_path / "ce")
    assert isinstance(reloaded, CrossEncoder) and reloaded.options == model.options
    with torch.no_grad():
        ours = model.layer_scores(QUERIES, PASSAGES)
        assert torch.equal(reloaded.layer_scores(QUERIES, PASSAGES), ours)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ce").eval()
        encoded = model.tokenize_pairs(PAIR_QUERIES, PASSAGES)
        torch.testing.assert_close(hf(**encoded).logits[:, 0], ours[-1].reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(_st_predict(tmp_path / "ce")), ours[-1].reshape(-1), atol=1e-5, rtol=1e-5)


def test_plain_hf_reranker_and_activation_override(hf_folder, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = CrossEncoder.from_pretrained(hf_folder)
    assert model.options.activation == SIGMOID  # as ST's default for one label
    with torch.no_grad():
        hf = AutoModelForSequenceClassification.from_pretrained(hf_folder).eval()
        logits = hf(**model.tokenize_pairs(PAIR_QUERIES, PASSAGES)).logits[:, 0]
    torch.testing.assert_close(torch.tensor(model.score_pairs(PAIR_QUERIES, PASSAGES)), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(model.score_pairs(PAIR_QUERIES, PASSAGES, activation=True)),
                               torch.sigmoid(logits), atol=1e-5, rtol=1e-5)
    tanh = CrossEncoder.from_pretrained(hf_folder, activation="torch.nn.Tanh")
    tanh.save_pretrained(tmp_path / "tanh")  # a plain HF folder records it where every ST >= 4 reads it
    assert json.loads((tmp_path / "tanh" / "config.json").read_text())["sentence_transformers"] == {
        "activation_fn": "torch.nn.Tanh"}
    torch.testing.assert_close(torch.tensor(_st_predict(tmp_path / "tanh")), torch.tanh(logits), atol=1e-5, rtol=1e-5)


def test_st4_config_entry_names_the_activation(hf_folder, tmp_path):
    folder = tmp_path / "st4"
    folder.mkdir()
    for path in hf_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": IDENTITY, "version": "4.1.0"}
    (folder / "config.json").write_text(json.dumps(config))
    model = CrossEncoder.from_pretrained(folder)
    assert model.options.activation == IDENTITY
    torch.testing.assert_close(torch.tensor(model.score_pairs(PAIR_QUERIES, PASSAGES, activation=True)),
                               torch.tensor(_st_predict(folder)), atol=1e-5, rtol=1e-5)


def test_refusals(tokenizer, tmp_path, hf_folder):
    two = tmp_path / "two"
    model = _classifier("bert", tokenizer)
    model.config.num_labels = 2
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(model.config).save_pretrained(two)
    tokenizer.save_pretrained(two)
    with pytest.raises(LeadkdError, match=r"two/config.json: num_labels is 2"):
        CrossEncoder.from_pretrained(two)
    odd = tmp_path / "odd"
    odd.mkdir()
    for path in hf_folder.iterdir():
        (odd / path.name).write_bytes(path.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FunnelForSequenceClassification"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(LeadkdError, match=r"odd/config.json: architecture FunnelForSequenceClassification is not "
                                          r"supported"):
        CrossEncoder.from_pretrained(odd)
    with pytest.raises(ConfigError, match="scores with its own head"):
        CrossEncoder.from_pretrained(hf_folder, head="linear")
    with pytest.raises(ConfigError, match="head must be one of"):
        CrossEncoder.from_pretrained(hf_folder, head="mlp")
    with pytest.raises(ConfigError, match="activation must be a torch class path"):
        CrossEncoder.from_pretrained(hf_folder, activation="os.system")


@pytest.mark.parametrize("architecture", ["bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet",
                                          "distilbert", "albert", "deberta-v2"])
def test_every_mapped_architecture_gives_the_models_own_logits(tokenizer, architecture):
    model = _classifier(architecture, tokenizer)
    ce = CrossEncoder(tokenizer, model)
    assert ce.options.head == "sequence_classification"
    encoded = ce.tokenize_pairs(PAIR_QUERIES, PASSAGES)
    with torch.no_grad():
        expected = model(**encoded).logits[:, 0]
        scores = ce.pair_layer_scores(PAIR_QUERIES, PASSAGES)
    torch.testing.assert_close(scores[-1], expected, atol=1e-5, rtol=1e-5)
    assert scores.shape == (2, len(PASSAGES)) and not torch.allclose(scores[0], scores[1])


def test_plain_encoder_with_sequence_classification_head_trains_and_saves_hf(tmp_path):
    from transformers import AutoModelForSequenceClassification

    plain = make_tiny_bert_folder(tmp_path / "plain")
    config = ModelConfig(path=str(plain), kind="cross_encoder", cross_encoder_head="sequence_classification",
                         max_passage_length=32)
    model = CrossEncoder.from_config(config)
    again = CrossEncoder.from_pretrained(plain, head="sequence_classification")
    classifier = model.classifier_model.classifier
    assert torch.equal(classifier.weight, again.classifier_model.classifier.weight)  # seeded
    assert float(classifier.weight.detach().std()) > 0.005
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.log_softmax(model(QUERIES, PASSAGES), dim=-1)[:, :, 0].sum().neg().backward()
    assert classifier.weight.grad.abs().sum() > 0 and classifier.bias.grad.abs().sum() > 0
    assert model.backbone.pooler.dense.weight.grad.abs().sum() > 0  # the pooler is part of this head
    before = classifier.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, classifier.weight)
    model.eval()
    model.save_pretrained(tmp_path / "ce")
    assert json.loads((tmp_path / "ce" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]
    with torch.no_grad():
        ours = model.score(QUERIES, PASSAGES)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ce").eval()
        torch.testing.assert_close(hf(**model.tokenize_pairs(PAIR_QUERIES, PASSAGES)).logits[:, 0],
                                   ours.reshape(-1), atol=1e-5, rtol=1e-5)
        reopened = load_model(tmp_path / "ce")
        assert reopened.options == model.options
        assert torch.equal(reopened.score(QUERIES, PASSAGES), ours)


def test_saved_sequence_head_folder_that_lost_its_classifier_is_refused(tmp_path):
    plain = make_tiny_bert_folder(tmp_path / "plain")
    (plain / "leadkd_config.json").write_text(json.dumps({"kind": "cross_encoder",
                                                          "head": "sequence_classification"}))
    with pytest.raises(LeadkdError, match="not a sequence classifier"):
        CrossEncoder.from_pretrained(plain)
    assert CrossEncoder.from_pretrained(plain, allow_partial=True).options.head == "sequence_classification"


def test_config_option_belongs_to_cross_encoders():
    with pytest.raises(ValidationError, match="only applies to a cross_encoder"):
        ModelConfig(kind="dual_encoder", cross_encoder_head="linear")
    assert ModelConfig(kind="cross_encoder", cross_encoder_head="Sequence_Classification").cross_encoder_head == \
        "sequence_classification"


def test_distill_from_a_sentence_transformers_reranker_teacher(st_folders, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from conftest import make_tiny_beir, make_tiny_groups
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    values = {
        "teacher.path": str(st_folders[0]), "teacher.kind": "cross_encoder", "teacher.max_passage_length": 32,
        "student.path": str(make_tiny_bert_folder(tmp_path / "student")), "student.max_query_length": 16,
        "student.max_passage_length": 32, "data.corpus": str(make_tiny_beir(tmp_path / "data")),
        "data.train_groups": str(make_tiny_groups(tmp_path / "groups.jsonl")), "data.num_negatives": 3,
        "optim.steps": 2, "optim.batch_size": 4, "layers.k": 1, "eval.split": "null",
        "output_dir": str(tmp_path / "run"),
    }
    run_job(load_config(None, [f"{key}={value}" for key, value in values.items()], kind="distill"), log=lambda m: None)
    teacher = load_model(tmp_path / "run" / "final-teacher")
    assert isinstance(teacher, CrossEncoder) and teacher.options.head == "sequence_classification"
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final-teacher")  # still an HF reranker
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows if "loss" in row)


def test_train_job_writes_an_hf_reranker(tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from conftest import make_tiny_beir, make_tiny_groups
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    values = {
        "model.path": str(make_tiny_bert_folder(tmp_path / "plain")), "model.kind": "cross_encoder",
        "model.cross_encoder_head": "sequence_classification", "model.max_passage_length": 32,
        "data.corpus": str(make_tiny_beir(tmp_path / "data")), "data.num_negatives": 3,
        "data.train_groups": str(make_tiny_groups(tmp_path / "groups.jsonl")), "optim.steps": 2,
        "optim.batch_size": 4, "eval.split": "null", "output_dir": str(tmp_path / "run"),
    }
    run_job(load_config(None, [f"{key}={value}" for key, value in values.items()], kind="train"), log=lambda m: None)
    final = load_model(tmp_path / "run" / "final")
    assert final.options.head == "sequence_classification"
    ours = final.score_pairs(PAIR_QUERIES, PASSAGES, activation=True)
    torch.testing.assert_close(torch.tensor(STCrossEncoder(str(tmp_path / "run" / "final")).predict(
        list(zip(PAIR_QUERIES, PASSAGES, strict=True))).astype("float32")), torch.tensor(ours), atol=1e-5, rtol=1e-5)
