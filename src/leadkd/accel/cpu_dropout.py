"""Dropout for training on CPU at a fraction of torch's cost: the same Bernoulli masks, cheaper bits.

Why: torch's CPU dropout draws one float (``bernoulli_``) per element, and scaled-dot-product attention
with dropout leaves its fused kernels for the math path anyway. On a 3-layer MiniLM training step the
attention-probability masks alone (``[N, heads, T, T]`` per layer) took 12-20% of the time. Here each
element's keep/drop decision comes from 16 random bits (a quarter of a 64-bit draw), and attention runs
that same math path with the mask applied to the probabilities and the ``1/(1-p)`` rescaling moved onto
the much smaller attention output.

The distribution is dropout's: an element is kept with probability ``1 - p`` (``p`` rounded to a multiple
of 2^-16, e.g. 0.1 -> 0.100006) and kept values are scaled by ``1/(1-p)``. Masks come from torch's default
CPU generator, so ``torch.manual_seed`` and checkpointed RNG states (resume, gradient checkpointing)
reproduce them. Evaluation mode, other devices and ``p`` in {0, 1} use torch's own functions unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: The attention implementation name registered with transformers for :func:`attention`.
ATTENTION = "leadkd_cpu_dropout"
_BITS = 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean ``shape`` mask, each element True with probability ``1 - p`` (to 2^-16), on the CPU."""
    count = math.prod(shape)
    # random_(-2**63, None) draws all 64 bits; a plain random_() leaves the sign bit 0, which would bias
    # every fourth element.
    words = torch.empty((count * _BITS + 63) // 64, dtype=torch.int64).random_(-2**63, None)
    bits = words.view(torch.int16)[:count].view(shape)
    return bits >= round(p * 2**_BITS) - 2**(_BITS - 1)


def _fast(x: torch.Tensor, p: float, training: bool) -> bool:
    return training and 0.0 < p < 1.0 and x.device.type == "cpu" and x.is_floating_point()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with :func:`keep_mask` masks on CPU in training; ``F.dropout`` itself otherwise."""
    if not _fast(x, p, training):
        return F.dropout(x, p, training)
    return x.mul(keep_mask(x.shape, p)).mul_(1.0 / (1.0 - p))


class CpuDropout(nn.Dropout):
    """An ``nn.Dropout`` (same ``p``, no state) whose training-mode masks come from :func:`keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: softmax(q k^T * scaling + mask) with dropout, times v.

    ``attention_mask`` is additive (transformers' eager mask, registered with it). Without dropout, or
    off the CPU, it is transformers' own SDPA function.
    """
    if not _fast(query, dropout, True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query * scaling, key.transpose(-2, -1))
    if attention_mask is not None:
        weights.add_(attention_mask)
    probs = torch.softmax(weights, dim=-1).mul(keep_mask(weights.shape, dropout))
    output = torch.matmul(probs, value).mul_(1.0 / (1.0 - dropout))
    return output.transpose(1, 2).contiguous(), None


def _register() -> bool:
    """Make :func:`attention` (with transformers' additive eager mask) selectable by name; False where this
    transformers has no attention registry (before ~4.53: attention then keeps torch's dropout)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    return True


def use_cpu_dropout(model: nn.Module) -> int:
    """Give a Hugging Face model :class:`CpuDropout` modules and, where it attends through SDPA, the
    :func:`attention` function. Weights and saved folders are unchanged (the attention choice is not
    written to ``config.json``). Returns the number of dropout modules replaced."""
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, CpuDropout(child.p, child.inplace))
                replaced += 1
    config = getattr(model, "config", None)
    if (getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation")
            and _register()):
        model.set_attn_implementation(ATTENTION)  # type: ignore[operator]  # hasattr above; torch: Tensor | Module
    return replaced
