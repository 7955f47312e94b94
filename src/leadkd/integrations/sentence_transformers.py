"""LEAD as a sentence-transformers loss: train a ``SentenceTransformer`` student with ``SentenceTransformerTrainer``.

:class:`LEADLoss` is an ``nn.Module`` called as every ST loss is, ``loss(features, labels)`` with one feature
dict per dataset column (query, positive, negative_1..n). It computes exactly what leadkd's own trainer
computes per step (:class:`leadkd.distill.objectives.Distillation`): both models score one candidate set
(every passage of the batch for two dense models, each query's own group for a cross-encoder teacher), and
:func:`leadkd.distill.losses.lead_total_loss` turns the per-layer scores into the LEAD objective.

The teacher may read text with another tokenizer, so it needs the raw strings, which ST's collator drops.
:func:`text_collator` is ST's own collator that also keeps each column's strings, as ``{column}_text``;
``collect_features`` then hands them to the loss inside each column's features, as ``"text"``.

Only the pure losses and layer schedule of leadkd are imported here, never its trainer or config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

try:  # sentence-transformers >= 6 (its modules moved under sentence_transformer/)
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
except ImportError:  # 3 to 5
    from sentence_transformers.data_collator import (  # type: ignore[no-redef]  # only one of the two runs
        SentenceTransformerDataCollator,
    )

from ..distill.layers import LayerSchedule, pair_layers
from ..distill.losses import duplicate_positive_mask, group_labels, lead_total_loss, own_group_scores
from ..runtime.errors import ConfigError, LeadkdError

if TYPE_CHECKING:
    from ..models.base import Retriever

__all__ = ["LEADLoss", "TextKeepingDataCollator", "text_collator", "as_leadkd_teacher", "student_layer_embeddings"]

#: Key under which each column's raw strings travel in its feature dict.
TEXT_KEY = "text"


# --------------------------------------------------------------------------- raw texts through ST's collator

class TextKeepingDataCollator(SentenceTransformerDataCollator):
    """ST's collator, plus ``{column}_text``: the column's strings as given, before any prompt."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(features)
        if not features:
            return batch
        skipped = {"dataset_name", *self.valid_label_columns}
        for column in features[0]:
            if column not in skipped:
                batch[f"{column}_{TEXT_KEY}"] = [row[column] for row in features]
        return batch


def text_collator(model, args=None):
    """The collator to give ``SentenceTransformerTrainer(data_collator=...)``: ST's, keeping the raw texts.

    ``args`` (the trainer's arguments) passes on their ``prompts`` and ``router_mapping``, as the trainer
    does for its default collator; the teacher always gets the texts without the student's prompts.
    """
    options: dict[str, Any] = {}
    if args is not None:
        options = {"router_mapping": getattr(args, "router_mapping", None) or {},
                   "prompts": getattr(args, "prompts", None) or {}}
    return TextKeepingDataCollator(preprocess_fn=model.preprocess, **options)


# --------------------------------------------------------------------------- the teacher

def _is_leadkd_model(model: Any) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "encode_batch") and hasattr(model, "scores_whole_batch")


def _st_dual_encoder(model, similarity_scale: float | None):
    """A leadkd DualEncoder over a SentenceTransformer's own modules (shared weights, nothing copied)."""
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # 3 to 5
        from sentence_transformers.models import (  # type: ignore[no-redef]  # only one of the two runs
            Normalize,
            Pooling,
            Transformer,
        )

    from ..models.dual_encoder import DualEncoder
    from ..models.loading import st_prompts

    modules = list(model.children())
    if not modules or not isinstance(modules[0], Transformer):
        raise LeadkdError("the SentenceTransformer teacher must start with a Transformer module")
    pooling, normalize = None, False
    for module in modules[1:]:
        if isinstance(module, Pooling):
            mode = module.pooling_mode if isinstance(module.pooling_mode, str) else (
                module.pooling_mode[0] if len(module.pooling_mode) == 1 else None)
            if mode not in ("cls", "mean"):
                raise LeadkdError(f"the SentenceTransformer teacher pools with {module.pooling_mode!r}; leadkd's "
                                  "dual encoder pools with 'cls' or 'mean'")
            pooling = mode
        elif isinstance(module, Normalize):
            normalize = True
        else:
            raise LeadkdError(f"the SentenceTransformer teacher has a {type(module).__name__} module; leadkd's dual "
                              "encoder is Transformer, Pooling (cls/mean) and optionally Normalize")
    if pooling is None:
        raise LeadkdError("the SentenceTransformer teacher has no Pooling module")
    transformer = modules[0]
    length = transformer.max_seq_length or 256
    query, passage = st_prompts(getattr(model, "prompts", None), getattr(model, "default_prompt_name", None))
    options: dict[str, Any] = {"pooling": pooling, "normalize": normalize, "max_query_length": length,
                               "max_passage_length": length, "query_prefix": query or "",
                               "passage_prefix": passage or ""}
    if similarity_scale is not None:
        options["similarity_scale"] = similarity_scale
    return DualEncoder(transformer.auto_model, transformer.tokenizer, **options)


def as_leadkd_teacher(teacher: Any, similarity_scale: float | None = None) -> nn.Module:
    """Any teacher as a leadkd retriever: a leadkd model as is; a folder (leadkd or ST) through
    :func:`leadkd.models.load_model`; an in-memory ``SentenceTransformer`` bi-encoder as a DualEncoder
    sharing its weights. ``similarity_scale`` overrides a dual-encoder teacher's score scale."""
    if _is_leadkd_model(teacher):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        from ..models.loading import load_model

        overrides = {} if similarity_scale is None else {"similarity_scale": similarity_scale}
        return load_model(teacher, **overrides)
    kind = type(teacher).__name__
    module = type(teacher).__module__
    if module.startswith("sentence_transformers") and kind == "SentenceTransformer":
        return _st_dual_encoder(teacher, similarity_scale)
    if module.startswith("sentence_transformers") and kind == "CrossEncoder":
        return _st_cross_encoder(teacher)
    raise LeadkdError(f"cannot use a {kind} as the teacher: give a leadkd model (DualEncoder, ColBERT, "
                      "CrossEncoder), a model folder, or a sentence-transformers SentenceTransformer")


def _st_cross_encoder(teacher) -> nn.Module:
    """An in-memory sentence-transformers ``CrossEncoder`` as a leadkd CrossEncoder with its trained head,
    read through the folder ST saves (the tested path: scores equal ``predict``'s logits). The weights are
    a copy: a teacher trained jointly updates the copy, not the object given."""
    import tempfile

    from ..models.cross_encoder import CrossEncoder

    with tempfile.TemporaryDirectory() as folder:
        teacher.save_pretrained(folder)
        return CrossEncoder.from_pretrained(folder).to(teacher.device)


# --------------------------------------------------------------------------- the student's layers

@contextlib.contextmanager
def _hidden_states_on(config):
    """Ask the HF model for every block's output for one forward (ST then returns ``all_layer_embeddings``)."""
    before = getattr(config, "output_hidden_states", False)
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = before


def student_layer_embeddings(model, features: dict[str, Any], layers: Sequence[int]) -> Tensor:
    """``[len(layers), N, d]``: each requested block's token states through the student's own modules after
    its Transformer (Pooling, then Normalize if it has one), as leadkd's DualEncoder defines a layer's vector.

    One forward of the whole model (so a DDP wrapper sees it); the last block's vector is the model's own
    ``sentence_embedding``.
    """
    inner = getattr(model, "module", model)
    modules = list(inner.children())
    config = modules[0].auto_model.config
    with _hidden_states_on(config):
        out = model(dict(features))
    if "all_layer_embeddings" not in out:
        raise LeadkdError("the student's Transformer returned no hidden states; LEADLoss needs a Hugging Face "
                          "encoder that honours output_hidden_states")
    hidden = out["all_layer_embeddings"][1:]  # index 0 is the embedding output, not a layer
    last = len(hidden) - 1
    vectors = []
    for layer in layers:
        if layer == last:
            vectors.append(out["sentence_embedding"])
            continue
        state = {key: value for key, value in out.items()
                 if key not in ("token_embeddings", "sentence_embedding", "all_layer_embeddings")}
        state["token_embeddings"] = hidden[layer]
        for module in modules[1:]:
            state = module(state)
        vectors.append(state["sentence_embedding"])
    return torch.stack(vectors)


def _num_student_layers(model) -> int:
    from ..models.base import num_blocks

    return num_blocks(list(getattr(model, "module", model).children())[0].auto_model)


# --------------------------------------------------------------------------- the loss

class LEADLoss(nn.Module):
    """LEAD (Sun et al., WSDM 2024) for ``SentenceTransformerTrainer``: the student learns the teacher's
    final and per-layer score distributions over each query's candidates, plus the ground truth.

    Inputs: (query, positive, negative_1, ..., negative_n) columns, no label; the trainer's collator must be
    :func:`text_collator` (the teacher reads raw text). The settings are leadkd's ``loss`` and ``layers``
    sections under the same names and defaults (docs/sentence-transformers.md lists them).

    ``train_teacher=False`` (default): the teacher is frozen (eval mode, no gradient) and its CE and the
    reverse KL drop out, as in leadkd. ``train_teacher=True``: the teacher's terms join the loss and its
    gradients are computed, but ST's trainer optimises only the student's parameters; give it an optimizer
    over :meth:`trainable_parameters` (``optimizers=(torch.optim.AdamW(loss.trainable_parameters()), None)``).
    """

    def __init__(self, model, teacher, *, k: int = 5, strategy: str = "random",
                 pairs: Sequence[tuple[int, int]] | None = None, resample_every: int | None = 10, seed: int = 888,
                 layer: str = "lead", temperature: float = 1.0, layer_temperature: float = 10.0, reweight: bool = True,
                 student_ce: float = 1.0, teacher_ce: float = 1.0, response: str = "kl", response_weight: float = 1.0,
                 layer_weight: float = 1.0, detach_teacher_targets: bool = False, train_teacher: bool = False,
                 in_batch_negatives: bool = True, mask_duplicate_positives: bool = True,
                 colbert_last_layer: str = "raw", similarity_scale: float = 1.0,
                 teacher_similarity_scale: float | None = None, gradient_accumulation_steps: int = 1):
        super().__init__()
        if layer not in ("lead", "none"):
            raise ConfigError(f"LEADLoss layer must be 'lead' or 'none', got {layer!r} (the hidden-state baseline "
                              "needs one shared tokenizer; use leadkd's own trainer for it)")
        if colbert_last_layer not in ("raw", "final"):
            raise ConfigError(f"LEADLoss colbert_last_layer must be 'raw' or 'final', got {colbert_last_layer!r}")
        if not similarity_scale > 0:
            raise ConfigError(f"LEADLoss similarity_scale must be > 0, got {similarity_scale}")
        if gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.model = model
        self.teacher = as_leadkd_teacher(teacher, teacher_similarity_scale)
        self.train_teacher = bool(train_teacher)
        self.teacher.train(self.train_teacher)
        if not self.train_teacher:
            self.teacher.requires_grad_(False)
        self.terms: dict[str, Any] = {"temperature": temperature, "layer_temperature": layer_temperature,
                                      "reweight": reweight, "student_weight": student_ce, "teacher_weight": teacher_ce,
                                      "response": response, "response_weight": response_weight,
                                      "layer_weight": layer_weight, "detach_teacher_targets": detach_teacher_targets}
        self.settings = {"k": k, "strategy": strategy, "pairs": pairs, "resample_every": resample_every, "seed": seed,
                         "layer": layer, **self.terms, "train_teacher": self.train_teacher,
                         "in_batch_negatives": in_batch_negatives, "mask_duplicate_positives": mask_duplicate_positives,
                         "colbert_last_layer": colbert_last_layer, "similarity_scale": similarity_scale}
        self.in_batch_negatives = in_batch_negatives
        self.mask_duplicate_positives = mask_duplicate_positives
        self.raw_last_layer = colbert_last_layer == "raw"
        self.similarity_scale = float(similarity_scale)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.schedule = None
        if layer == "lead":
            self.schedule = LayerSchedule(strategy, _num_student_layers(model),
                                          cast("Retriever", self.teacher).num_layers, k=k, seed=seed,
                                          resample_interval=resample_every, pairs=pairs)
        #: Training calls so far; ``calls // gradient_accumulation_steps`` is the optimizer step for the pairs.
        self.calls = 0
        self.last_terms: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> LEADLoss:
        """A frozen teacher stays in eval mode (no dropout) whatever mode the loss is put in."""
        super().train(mode)
        if not self.train_teacher:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ what the trainer asks
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters, then the teacher's when it trains: what an optimizer must step."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.train_teacher:
            params += [p for p in self.teacher.parameters() if p.requires_grad]
        return params

    def step_callback(self):
        """A ``TrainerCallback`` that sets the layer schedule's step from the trainer's ``global_step`` at each
        optimizer step, so a resumed run continues the same draws (``callbacks=[loss.step_callback()]``)."""
        from transformers import TrainerCallback

        loss = self

        class LayerStepCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                loss.calls = state.global_step * loss.gradient_accumulation_steps

        return LayerStepCallback()

    def get_config_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.settings.items() if key != "pairs" or value is not None}

    @property
    def citation(self) -> str:
        return """
@inproceedings{sun2024lead,
  title={LEAD: Liberal Feature-based Distillation for Dense Retrieval},
  author={Sun, Hao and Liu, Xiao and Gong, Yeyun and Dong, Anlei and Lu, Jingwen and Zhang, Yan and Yang, Linjun
          and Majumder, Rangan and Duan, Nan},
  booktitle={WSDM},
  year={2024}
}
"""

    # ------------------------------------------------------------------ one batch
    def current_pairs(self, training: bool) -> list[tuple[int, int]]:
        if self.schedule is None:
            return []
        step = self.calls // self.gradient_accumulation_steps
        if training:
            self.calls += 1
        return self.schedule.pairs_for_step(step)

    @staticmethod
    def _texts(features: list[dict[str, Any]]) -> list[list[str]]:
        texts = []
        for column, feature in enumerate(features):
            column_texts = feature.get(TEXT_KEY)
            if column_texts is None:
                raise LeadkdError(f"LEADLoss: column {column} carries no raw texts; the teacher reads text, so give "
                                  "the trainer data_collator=leadkd.integrations.sentence_transformers"
                                  ".text_collator(model)")
            if not all(isinstance(text, str) for text in column_texts):
                raise LeadkdError(f"LEADLoss: column {column} holds non-text inputs; LEAD needs text columns")
            texts.append(list(column_texts))
        return texts

    def forward(self, sentence_features: Iterable[dict[str, Any]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise LeadkdError(f"LEADLoss needs (query, positive, negative_1, ...) columns, got {len(features)} "
                              "column(s)")
        texts = self._texts(features)
        model_inputs = [{key: value for key, value in feature.items() if key != TEXT_KEY} for feature in features]
        queries = texts[0]
        batch, group = len(queries), len(features) - 1
        # Query-major groups, as leadkd lays a batch out: query i's positive, then its negatives.
        passages = [texts[1 + j][i] for i in range(batch) for j in range(group)]
        training = torch.is_grad_enabled() and getattr(self.model, "training", True)
        pairs = self.current_pairs(training)
        s_layers, t_layers, positions = pair_layers(pairs)
        student = self._student_scores(model_inputs, s_layers, batch, group)
        teacher = self._teacher_scores(queries, passages, t_layers)
        student, teacher, labels_, mask = self._layout(student, teacher, queries, texts, passages, group)
        terms = lead_total_loss(teacher, student, labels_.to(student.device), positions,
                                train_teacher=self.train_teacher, candidate_mask=mask, **self.terms)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return terms["loss"]

    def _student_scores(self, model_inputs, layers, batch: int, group: int) -> Tensor:
        """``[L'+1, Q, B*G]``: the requested layers' then the final scores over every passage of the batch."""
        final = _num_student_layers(self.model) - 1
        wanted = list(layers) + [final]
        query_vectors = student_layer_embeddings(self.model, model_inputs[0], wanted)            # [L, Q, d]
        columns = [student_layer_embeddings(self.model, f, wanted) for f in model_inputs[1:]]    # G x [L, B, d]
        passage_vectors = torch.stack(columns, dim=2).flatten(1, 2)                             # [L, B*G, d]
        scores = torch.matmul(query_vectors, passage_vectors.transpose(1, 2))
        return scores if self.similarity_scale == 1.0 else scores * self.similarity_scale

    def _teacher_scores(self, queries, passages, layers) -> Tensor:
        with contextlib.nullcontext() if self.train_teacher else torch.no_grad():
            encoded = cast("Retriever", self.teacher).encode_batch(queries, passages, layers, final=True,
                                                                  raw_last_layer=self.raw_last_layer)
            return encoded.scores()

    def _layout(self, student: Tensor, teacher: Tensor, queries, texts, passages, group: int):
        """Both models over one candidate set (spec §2.3), the label columns and the duplicate-positive mask.

        The mask is leadkd's by passage identity, here read as text identity (ST rows carry no ids)."""
        own_group = not (self.teacher.scores_whole_batch and self.in_batch_negatives)
        if own_group:
            student = own_group_scores(student, group)
            if self.teacher.scores_whole_batch:
                teacher = own_group_scores(teacher, group)
        labels = group_labels(len(queries), group, in_batch=not own_group)
        mask = None
        if self.mask_duplicate_positives:
            in_batch = group_labels(len(queries), group)
            mask = duplicate_positive_mask([(text,) for text in texts[1]], passages, in_batch)
            if own_group:
                mask = own_group_scores(mask, group)
            mask = mask.to(student.device) if bool(mask.any()) else None
        return student, teacher.to(student.device), labels, mask
