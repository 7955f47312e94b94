"""A Hugging Face reranker's own classification head, applied to any layer's [CLS] vector.

A ``*ForSequenceClassification`` model computes its logit from the first token's last hidden state, but
each architecture does it with different modules (BERT's pooler then ``classifier``; RoBERTa's
``classifier`` head that takes the sequence and reads token 0; DistilBERT's ``pre_classifier``, ReLU,
``classifier``...). LEAD scores every layer with the *same* head (spec §2.2), so leadkd needs that
computation as a function of a ``[N, hidden]`` vector. Each supported architecture is one explicit
recipe below: the modules it uses (their dotted names in the HF model) and how its ``forward`` chains
them, with the model's own dropout modules (identity in eval mode, as in HF's forward). An architecture
not listed is refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.errors import LeadkdError


@dataclass(frozen=True)
class HeadRecipe:
    """``parts``: short name -> dotted submodule of the HF model; ``apply(parts, cls)``: ``[N, hidden]`` -> logits."""

    parts: dict[str, str]
    apply: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor]


def _first_token(cls: torch.Tensor) -> torch.Tensor:
    """``[N, hidden]`` as the ``[N, 1, hidden]`` sequence whose token 0 a sequence-reading module takes."""
    return cls.unsqueeze(1)


def _pooler_then_classifier(prefix: str) -> HeadRecipe:
    """BERT-like: the encoder's pooler (dense + tanh over token 0), dropout, ``classifier``."""
    return HeadRecipe({"pooler": f"{prefix}.pooler", "dropout": "dropout", "classifier": "classifier"},
                      lambda p, cls: p["classifier"](p["dropout"](p["pooler"](_first_token(cls)))))


#: RoBERTa-like: a ``classifier`` module (dense, activation, out_proj, with dropout) that reads token 0 itself.
_SEQUENCE_HEAD = HeadRecipe({"classifier": "classifier"}, lambda p, cls: p["classifier"](_first_token(cls)))

_ALBERT = HeadRecipe(
    {"pooler": "albert.pooler", "pooler_activation": "albert.pooler_activation", "dropout": "dropout",
     "classifier": "classifier"},
    lambda p, cls: p["classifier"](p["dropout"](p["pooler_activation"](p["pooler"](cls)))))

_DISTILBERT = HeadRecipe(
    {"pre_classifier": "pre_classifier", "dropout": "dropout", "classifier": "classifier"},
    lambda p, cls: p["classifier"](p["dropout"](torch.relu(p["pre_classifier"](cls)))))

#: DeBERTa: its own ``pooler`` (ContextPooler, reads token 0), dropout, ``classifier``.
_DEBERTA = HeadRecipe({"pooler": "pooler", "dropout": "dropout", "classifier": "classifier"},
                      lambda p, cls: p["classifier"](p["dropout"](p["pooler"](_first_token(cls)))))

#: Architecture class name -> how its forward turns the first token's hidden state into logits.
HEAD_RECIPES: dict[str, HeadRecipe] = {
    "BertForSequenceClassification": _pooler_then_classifier("bert"),
    "AlbertForSequenceClassification": _ALBERT,
    "RobertaForSequenceClassification": _SEQUENCE_HEAD,
    "XLMRobertaForSequenceClassification": _SEQUENCE_HEAD,
    "CamembertForSequenceClassification": _SEQUENCE_HEAD,
    "ElectraForSequenceClassification": _SEQUENCE_HEAD,
    "MPNetForSequenceClassification": _SEQUENCE_HEAD,
    "DistilBertForSequenceClassification": _DISTILBERT,
    "DebertaForSequenceClassification": _DEBERTA,
    "DebertaV2ForSequenceClassification": _DEBERTA,
}


def is_sequence_classifier(architecture: str) -> bool:
    """Whether an HF architecture name is a sequence-classification model (what rerankers are saved as)."""
    return architecture.endswith("ForSequenceClassification")


def check_supported(architecture: str, where: str) -> HeadRecipe:
    """The recipe of ``architecture``, or one line saying it cannot be mapped."""
    recipe = HEAD_RECIPES.get(architecture)
    if recipe is None:
        raise LeadkdError(f"{where}: architecture {architecture} is not supported as a cross-encoder with its own "
                          "head (leadkd must know how the head reads a layer's [CLS]); supported: "
                          f"{', '.join(sorted(HEAD_RECIPES))}")
    return recipe


class SequenceClassificationHead(nn.Module):
    """The head modules of an HF sequence classifier (shared with it, not copied), scoring ``[N, hidden]``."""

    def __init__(self, model: nn.Module, where: str = "model"):
        super().__init__()
        recipe = check_supported(type(model).__name__, where)
        self.parts = nn.ModuleDict({name: model.get_submodule(path) for name, path in recipe.parts.items()})
        self._apply_head = recipe.apply

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 1]`` of the first-token vectors ``cls`` ``[N, hidden]``."""
        return self._apply_head(self.parts, cls)
