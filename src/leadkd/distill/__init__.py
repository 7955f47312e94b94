"""Distillation: LEAD's pure losses over layer scores and the choice of layer pairs."""

from .layers import STRATEGIES, LayerSchedule, select_layers
from .losses import (
    HiddenStateMSE,
    check_same_tokenizer,
    contrastive_loss,
    group_labels,
    kl_distillation,
    layer_distillation_loss,
    lead_total_loss,
    margin_mse_loss,
    own_group_scores,
    response_kl_loss,
)

__all__ = [
    "STRATEGIES", "LayerSchedule", "select_layers",
    "HiddenStateMSE", "check_same_tokenizer", "contrastive_loss", "group_labels", "kl_distillation",
    "layer_distillation_loss", "lead_total_loss", "margin_mse_loss", "own_group_scores", "response_kl_loss",
]
