"""Cross-encoder as a LEAD model: one score head read out at every layer's [CLS].

The joint input is the tokenizer's pair encoding ``[CLS] query [SEP] passage [SEP]``, truncated on
the passage side. As in the LEAD paper's code (spec §2.2), a single head scores the [CLS] vector of
*every* layer, t^l = head(h^l_CLS); there are no per-layer heads. A cross-encoder scores pairs, so the
candidates of a query are its own group only (spec §2.3).

Two heads (option ``head``):

* ``"linear"`` (the paper's, default for a plain encoder): Linear(hidden, 1), t^l = wᵀ h^l_CLS + b, saved
  beside the encoder as ``cross_encoder_head.safetensors``.
* ``"sequence_classification"``: a Hugging Face ``*ForSequenceClassification`` model's own head (BERT's
  pooler + classifier, RoBERTa's classification head, ...; see :mod:`.classification_heads`). A trained
  reranker (an HF or sentence-transformers ``CrossEncoder`` folder, ``num_labels`` 1) always loads with its
  trained head, and its last layer's score is the model's own logit; a plain encoder gets the HF head with
  a fresh classifier (seeded). Such a model saves as an HF sequence classifier (plus the ST CrossEncoder
  files it came with), which transformers and sentence-transformers open directly.

Scores are logits (what LEAD distils). The checkpoint's ST activation (``activation``, default Sigmoid as
in ST) is applied only on request: ``score_pairs(..., activation=True)``.

``use_token_type_ids=True`` (default) feeds the usual segment ids (query 0, passage 1); the paper's
code fed none, i.e. all zeros, which ``use_token_type_ids=False`` reproduces. Models without segment
embeddings (RoBERTa-like, ``type_vocab_size`` < 2; DistilBERT) never get them, nor does a
sequence-classification model whose tokenizer does not make them (``model_input_names``), as in
transformers and sentence-transformers.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from ..runtime.errors import ConfigError, LeadkdError
from ..runtime.fileio import atomic_directory
from .base import (
    freeze_pooler,
    load_backbone,
    loading_options,
    num_blocks,
    options_from_folder,
    position_limit,
    prepared_mask,
    read_leadkd_config,
    resolve_layers,
    resolve_model_path,
)
from .batch_inputs import CrossEncoderTokenizer, group_queries, inputs_to
from .classification_heads import SequenceClassificationHead, check_supported, is_sequence_classifier
from .loading import write_leadkd_config
from .st_cross_encoder import (
    DEFAULT_ACTIVATION,
    activation_module,
    read_st_cross_encoder,
    record_activation,
    write_st_files,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

KIND = "cross_encoder"
#: Score head saved beside the backbone (keys ``weight`` [1, hidden] and ``bias`` [1]).
HEAD_FILE = "cross_encoder_head.safetensors"
#: Seed of the head's N(0, 0.02) initialisation when a folder has none (a plain HF checkpoint), and of a
#: fresh sequence-classification head's initialisation (transformers' own, under this torch seed).
HEAD_SEED = 0
LINEAR_HEAD = "linear"
SEQUENCE_CLASSIFICATION_HEAD = "sequence_classification"
HEADS = (LINEAR_HEAD, SEQUENCE_CLASSIFICATION_HEAD)


@dataclass(frozen=True)
class CrossEncoderOptions:
    """What a cross-encoder folder remembers in ``leadkd_config.json`` besides its weights."""

    max_length: int = 256
    use_token_type_ids: bool = True
    #: ``"linear"`` (the paper's Linear(hidden, 1)) or ``"sequence_classification"`` (an HF classifier's head);
    #: a sequence-classification checkpoint always uses its own.
    head: str = LINEAR_HEAD
    #: dotted torch class applied by ``score_pairs(activation=True)``; None: the checkpoint's (ST's), else Sigmoid
    activation: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 4:
            raise ConfigError(f"cross-encoder max_length must be an integer >= 4, got {self.max_length!r}")
        if not isinstance(self.use_token_type_ids, bool):
            raise ConfigError("cross-encoder use_token_type_ids must be true or false, "
                              f"got {self.use_token_type_ids!r}")
        if self.head not in HEADS:
            raise ConfigError(f"cross-encoder head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.activation is not None and (not isinstance(self.activation, str)
                                            or not self.activation.startswith("torch.")):
            raise ConfigError(f"cross-encoder activation must be a torch class path such as {DEFAULT_ACTIVATION}, "
                              f"got {self.activation!r}")


@dataclass
class GroupScores:
    """A cross-encoder's view of a batch: its scores ``[L', Q, G]`` of each query's own group, already
    final; there is nothing to gather (no query is scored against another process's passages)."""

    values: torch.Tensor

    def gathered(self, with_grad: bool) -> GroupScores:
        return self

    def scores(self) -> torch.Tensor:
        return self.values


class CrossEncoder(nn.Module):
    """A reranker over any Hugging Face encoder, exposing the shared head's score at every layer.

    ``backbone`` is an encoder (``AutoModel``), or an HF ``*ForSequenceClassification`` model, whose own
    head then scores every layer (``options.head`` becomes ``"sequence_classification"``); with a plain
    encoder and ``options.head == "sequence_classification"`` the HF classifier is built around it with a
    fresh, seeded head. ``from_pretrained`` returns it in eval mode (as Hugging Face does); call
    ``.train()`` to train it. Calling the module is ``layer_scores`` (so DDP can wrap it).
    """

    kind = KIND
    scores_whole_batch = False

    def __init__(self, tokenizer, backbone: PreTrainedModel, options: CrossEncoderOptions = CrossEncoderOptions(),
                 head: nn.Linear | None = None, *, st_files: dict | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.st_files = dict(st_files or {})
        classifier = None
        if is_sequence_classifier(type(backbone).__name__):
            classifier = backbone
            options = dataclasses.replace(options, head=SEQUENCE_CLASSIFICATION_HEAD)
        elif options.head == SEQUENCE_CLASSIFICATION_HEAD:
            classifier = _classifier_around(backbone)
        if options.activation is None:
            options = dataclasses.replace(options, activation=DEFAULT_ACTIVATION)
        assert options.activation is not None  # filled in just above
        self.activation_fn = activation_module(options.activation)
        self.options = options
        # The HF classifier, kept outside the module tree (its modules are the backbone and head below), so
        # that save_pretrained can write it whole without the model's parameters being registered twice.
        self.__dict__["_classifier_model"] = classifier
        score_head: nn.Module | None = head  # a Linear, or the classifier's own head
        if classifier is not None:
            if head is not None:
                raise ConfigError("a cross-encoder with a sequence-classification head takes no separate head")
            if classifier.config.num_labels != 1:
                raise LeadkdError(f"{type(classifier).__name__} has num_labels {classifier.config.num_labels}; "
                                  "a cross-encoder needs one score (num_labels 1)")
            backbone = cast("PreTrainedModel", classifier.base_model)  # the encoder inside an HF classifier
            score_head = SequenceClassificationHead(classifier)
        self.backbone = backbone
        self.num_layers = num_blocks(backbone)
        hidden = backbone.config.hidden_size
        if classifier is None:
            freeze_pooler(backbone)  # no linear-head score reads it; a BERT classifier's head is its pooler
            if head is None:
                score_head = _seeded_head(hidden)
            elif tuple(head.weight.shape) != (1, hidden) or head.bias is None:
                raise ConfigError(f"cross-encoder head must be Linear({hidden}, 1) with a bias")
        assert score_head is not None  # given, the classifier's or a fresh one: each branch above sets it
        self.head = score_head
        limit = position_limit(tokenizer, backbone)
        self.max_length = options.max_length
        if limit is not None and self.max_length > limit:
            logger.warning("cross-encoder max_length=%d exceeds the model's %d positions; using %d",
                           self.max_length, limit, limit)
            self.max_length = limit
        accepts = "token_type_ids" in inspect.signature(backbone.forward).parameters
        # A trained classifier reads segment ids only where its tokenizer makes them (as in transformers
        # and sentence-transformers: ``model_input_names``); it was trained that way.
        tokenizer_makes = classifier is None or "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self.feeds_token_types = (options.use_token_type_ids and accepts and tokenizer_makes
                                  and getattr(backbone.config, "type_vocab_size", 0) >= 2)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, trust_remote_code: bool = False,
                        allow_partial: bool = False, use_safetensors: bool = True,
                        **overrides) -> CrossEncoder:
        """Load a leadkd cross-encoder folder, a trained reranker, or start one from any HF encoder.

        ``overrides`` are :class:`CrossEncoderOptions` fields (``max_length``, ``use_token_type_ids``,
        ``head``, ``activation``); given ones win over the folder's saved options, which win over the
        defaults. A sequence-classification checkpoint (``architectures`` ``*ForSequenceClassification``,
        ``num_labels`` 1: an HF or sentence-transformers reranker) loads with its own trained head, and
        with the activation its ST metadata names. Otherwise, with ``head="linear"``, a folder without
        ``cross_encoder_head.safetensors`` (a plain HF checkpoint) gets a fresh head: weight N(0, 0.02)
        from seed :data:`HEAD_SEED`, bias 0; with ``head="sequence_classification"`` it gets the HF head
        with a fresh classifier. A saved cross-encoder folder that lost its head is refused unless
        ``allow_partial``. Weights load strictly (see :func:`~leadkd.models.base.load_backbone` for
        ``allow_partial`` and ``use_safetensors``).
        """
        location = resolve_model_path(path)
        options = options_from_folder(location, KIND, CrossEncoderOptions, overrides)
        loading: dict[str, Any] = {"trust_remote_code": trust_remote_code, "allow_partial": allow_partial,
                                   "use_safetensors": use_safetensors}
        config = _model_config(location, trust_remote_code)
        architecture = next(iter(getattr(config, "architectures", None) or []), "")
        if is_sequence_classifier(architecture):
            return cls._from_classifier(location, config, architecture, options, overrides, loading)
        saved = read_leadkd_config(location) if os.path.isdir(location) else None
        if options.head == SEQUENCE_CLASSIFICATION_HEAD:
            if saved and saved.get("kind") == KIND and saved.get("head") == SEQUENCE_CLASSIFICATION_HEAD \
                    and not allow_partial:
                raise LeadkdError(f"{location}: a saved cross-encoder with a sequence-classification head, but its "
                                  f"config.json is not a sequence classifier (architectures {architecture or 'none'}); "
                                  "restore the folder, or load with allow_partial=True for a fresh head")
            tokenizer, backbone = load_backbone(location, **loading)
            logger.info("%s: a sequence-classification head around the encoder; its classifier starts fresh "
                        "(seed %d)", location, HEAD_SEED)
            return cls(tokenizer, backbone, options).eval()
        tokenizer, backbone = load_backbone(location, **loading)
        file = Path(location) / HEAD_FILE
        head = _load_head(file, backbone.config.hidden_size) if file.is_file() else None
        if head is None:
            if saved and saved.get("kind") == KIND and not allow_partial:
                raise LeadkdError(f"{location}: a saved cross-encoder without its score head ({HEAD_FILE}); "
                                  "restore the file, or load with allow_partial=True for a fresh head")
            logger.info("%s: no cross-encoder head (%s); starting a fresh one (N(0, 0.02), seed %d)",
                        location, HEAD_FILE, HEAD_SEED)
        return cls(tokenizer, backbone, options, head).eval()

    @classmethod
    def _from_classifier(cls, location: str, config, architecture: str, options: CrossEncoderOptions,
                         overrides: dict, loading: dict) -> CrossEncoder:
        """A sequence-classification checkpoint with its own head and its ST activation."""
        where = os.path.join(location, "config.json")
        if config.num_labels != 1:
            raise LeadkdError(f"{where}: num_labels is {config.num_labels} ({architecture}); a cross-encoder "
                              "reads one relevance score, so only num_labels 1 is supported")
        if overrides.get("head", SEQUENCE_CLASSIFICATION_HEAD) != SEQUENCE_CLASSIFICATION_HEAD:
            raise ConfigError(f"{where}: a {architecture} checkpoint scores with its own head; head="
                              f"{overrides['head']!r} does not apply (leave it unset or 'sequence_classification')")
        check_supported(architecture, where)
        tokenizer, classifier = load_backbone(location, **loading, auto_class="AutoModelForSequenceClassification")
        check_supported(type(classifier).__name__, where)
        st_files, activation = read_st_cross_encoder(location, classifier.config)
        if options.activation is None:  # neither given nor saved by leadkd: what ST would apply
            options = dataclasses.replace(options, activation=activation)
        if options.activation is not None:
            activation_module(options.activation, where)  # one line naming the folder for a bad saved path
        return cls(tokenizer, classifier, options, st_files=st_files).eval()

    @classmethod
    def from_config(cls, config, path: str | None = None) -> CrossEncoder:
        """From a :class:`~leadkd.config.ModelConfig`: the pair's length is ``max_passage_length``, the
        head ``cross_encoder_head`` (unset: the folder's)."""
        length = {"max_length": config.max_passage_length} if config.max_passage_length else {}
        segments = {} if config.token_type_ids is None else {"use_token_type_ids": config.token_type_ids}
        head = getattr(config, "cross_encoder_head", None)
        heads = {} if head is None else {"head": head}
        return cls.from_pretrained(path or config.path, **length, **segments, **heads, **loading_options(config))

    @property
    def classifier_model(self) -> PreTrainedModel | None:
        """The HF ``*ForSequenceClassification`` model of a sequence-classification head, else None."""
        return self.__dict__["_classifier_model"]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write weights (safetensors), tokenizer, head and settings; the folder appears whole or not at all.

        A linear head is saved beside the encoder (:data:`HEAD_FILE`); a sequence-classification model is
        saved as the HF classifier it is, with the ST CrossEncoder files it came with (its activation
        recorded where that ST version keeps it), so transformers and sentence-transformers open it too.
        """
        from safetensors.torch import save_file

        with atomic_directory(path) as tmp:
            if self.classifier_model is not None:
                assert self.options.activation is not None  # __init__ fills it in (the options are frozen)
                st_files = record_activation(self.classifier_model.config, self.st_files, self.options.activation)
                self.classifier_model.save_pretrained(tmp)
                write_st_files(tmp, st_files)
            else:
                self.backbone.save_pretrained(tmp)
                save_file({name: tensor.detach().cpu().contiguous()
                           for name, tensor in self.head.state_dict().items()}, str(tmp / HEAD_FILE))
            self.tokenizer.save_pretrained(tmp)
            write_leadkd_config(tmp, self.kind, self.settings())

    def settings(self) -> dict:
        """The options that, with the weights, define this model (what ``leadkd_config.json`` stores)."""
        return dataclasses.asdict(self.options)

    # ------------------------------------------------------------------ tokenisation
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def batch_tokenizer(self) -> CrossEncoderTokenizer:
        """This model's tokenisation as a picklable object (:mod:`~leadkd.models.batch_inputs`), for workers."""
        return CrossEncoderTokenizer(self.tokenizer, self.max_length, self.feeds_token_types)

    def tokenize_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for aligned (query, passage) pairs, padded to the longest pair."""
        return inputs_to(self.batch_tokenizer().pairs(queries, passages), self.device)

    # ------------------------------------------------------------------ scores
    def pair_layer_scores(self, queries: Sequence[str], passages: Sequence[str],
                          layers: Sequence[int] | None = None, pairs: dict[str, Any] | None = None) -> torch.Tensor:
        """The head's score at each requested layer for aligned pairs: ``[L', N]``. ``pairs``: the pairs
        already tokenised (:meth:`batch_tokenizer`), else done here."""
        wanted = resolve_layers(layers, self.num_layers)
        everything = any(layer != self.num_layers - 1 for layer in wanted)
        inputs = (self.tokenize_pairs(queries, passages) if pairs is None
                  else inputs_to(pairs, self.device, non_blocking=True))
        inputs["attention_mask"] = cast(torch.Tensor, prepared_mask(self.backbone, inputs["attention_mask"]))
        outputs = self.backbone(**inputs, output_hidden_states=everything, return_dict=True)
        if everything:
            blocks = dict(enumerate(outputs.hidden_states[1:]))
        else:
            blocks = {self.num_layers - 1: outputs.last_hidden_state}
        # One layer at a time: a sequence-classification head sees [N, hidden], as in the HF forward.
        return torch.stack([self.head(blocks[layer][:, 0]).squeeze(-1) for layer in wanted])  # [L', N]

    def layer_scores(self, queries: Sequence[str], passages: Sequence[str],
                     layers: Sequence[int] | None = None) -> torch.Tensor:
        """Scores of each query's own G candidates at each requested layer: ``[L', Q, G]``.

        ``passages`` holds G candidates per query, query-major (query i's are ``passages[i*G:(i+1)*G]``).
        """
        return self._group_scores(queries, passages, layers)

    def _group_scores(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int] | None,
                      pairs: dict[str, Any] | None = None) -> torch.Tensor:
        repeated = group_queries(queries, passages)
        scores = self.pair_layer_scores(repeated, passages, layers, pairs)
        return scores.view(scores.shape[0], len(queries), len(passages) // len(queries))

    def forward(self, queries: Sequence[str], passages: Sequence[str],
                layers: Sequence[int] | None = None) -> torch.Tensor:
        return self.layer_scores(queries, passages, layers)

    def encode_batch(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int],
                     final: bool = False, raw_last_layer: bool = True,
                     inputs: dict[str, Any] | None = None) -> GroupScores:
        """The training view: the head's scores at ``layers`` (then the last layer, the score, with
        ``final``) of each query's own group, query-major as :meth:`layer_scores` takes them. ``inputs``:
        the pairs already tokenised by :meth:`batch_tokenizer`."""
        wanted = list(layers) + ([self.num_layers - 1] if final else [])
        return GroupScores(self._group_scores(queries, passages, wanted, None if inputs is None else inputs["pairs"]))

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """The ordinary cross-encoder score (last layer) of each query's own group: ``[Q, G]``."""
        return self.layer_scores(queries, passages, layers=[-1])[0]

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32,
                    activation: bool = False) -> np.ndarray:
        """Final scores of aligned (query, passage) pairs for reranking, as float32 ``[N]``.

        Logits by default; ``activation=True`` applies the checkpoint's activation (``options.activation``,
        what sentence-transformers' ``predict`` applies). Runs in eval mode under ``inference_mode``; pairs
        are batched by length to save padding.
        """
        if len(queries) != len(passages):
            raise LeadkdError(f"{len(queries)} queries but {len(passages)} passages: pairs must align")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]) + len(passages[i]))
        scores = np.empty(len(queries), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    chunk = order[start:start + batch_size]
                    batch = self.pair_layer_scores([queries[i] for i in chunk], [passages[i] for i in chunk], [-1])[0]
                    if activation:
                        batch = self.activation_fn(batch.float())
                    scores[chunk] = batch.float().cpu().numpy()
        finally:
            self.train(was_training)
        return scores


def _model_config(location: str, trust_remote_code: bool):
    """The HF config of a folder or hub name, or None where it cannot be read (``load_backbone`` then says why)."""
    from transformers import AutoConfig

    if os.path.isdir(location) and not (Path(location) / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def _classifier_around(backbone: PreTrainedModel) -> PreTrainedModel:
    """The HF sequence classifier (``num_labels`` 1) of ``backbone``'s architecture, holding its weights.

    The head starts as transformers initialises it, under torch seed :data:`HEAD_SEED` (the global RNG is
    restored afterwards), so the same encoder always gets the same head. The encoder's weights are copied in;
    a pooler the classifier does not have (RoBERTa's) is dropped.
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(backbone.config)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        try:
            classifier = AutoModelForSequenceClassification.from_config(config)
        except ValueError as exc:
            raise LeadkdError(f"cross-encoder head 'sequence_classification': transformers has no sequence "
                              f"classifier for model type {config.model_type!r} ({str(exc).splitlines()[0]})") from None
    check_supported(type(classifier).__name__, f"model type {config.model_type!r}")
    classifier.to(dtype=next(backbone.parameters()).dtype)
    missing, unexpected = classifier.base_model.load_state_dict(backbone.state_dict(), strict=False)
    unexpected = [key for key in unexpected if not key.startswith("pooler.")]
    if missing or unexpected:
        raise LeadkdError(f"cannot put the {type(backbone).__name__} encoder into {type(classifier).__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return classifier.to(next(backbone.parameters()).device).train(backbone.training)


def _seeded_head(hidden: int) -> nn.Linear:
    """A fresh score head as the paper's code builds it: weight N(0, 0.02), bias 0, from a fixed seed."""
    head = nn.Linear(hidden, 1)
    generator = torch.Generator().manual_seed(HEAD_SEED)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden, generator=generator) * 0.02)
        head.bias.zero_()
    return head


def _load_head(file: Path, hidden: int) -> nn.Linear:
    from safetensors.torch import load_file

    weights = load_file(str(file))
    weight, bias = weights.get("weight"), weights.get("bias")
    if weight is None or bias is None or tuple(weight.shape) != (1, hidden) or tuple(bias.shape) != (1,):
        raise LeadkdError(f"{file}: not a score head for hidden size {hidden} (need weight [1, {hidden}] and bias [1])")
    head = nn.Linear(hidden, 1)
    head.load_state_dict({"weight": weight, "bias": bias})
    return head
