"""CPU dropout: the same Bernoulli masks as dropout, checked against naive computations of each formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_bert_folder
from leadkd.accel.cpu_dropout import ATTENTION, CpuDropout, attention, dropout, keep_mask, use_cpu_dropout


def naive_mask(shape: tuple[int, ...], p: float, seed: int) -> np.ndarray:
    """The mask :func:`keep_mask` must draw after ``torch.manual_seed(seed)``: the generator's 64-bit words
    read as little-endian 16-bit signed integers, kept where at least -2^15 + round(p * 2^16)."""
    torch.manual_seed(seed)
    count = int(np.prod(shape))
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2**63, None).numpy()  # all 64 bits
    halves = np.frombuffer(words.astype("<i8").tobytes(), dtype="<i2")[:count]
    return (halves.astype(np.int64) >= -32768 + round(p * 65536)).reshape(shape)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    kept, n = float(mask.float().mean()), 1e6
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # five binomial standard deviations
    for lane in range(4):  # each 16-bit quarter of a 64-bit draw, the sign bit's included
        share = float(mask.flatten()[lane::4].float().mean())
        assert abs(share - (1 - p)) < 5 * (p * (1 - p) / (n / 4)) ** 0.5, lane
    np.testing.assert_array_equal(mask.numpy(), naive_mask((1000, 1000), p, seed=0))
    assert not torch.equal(mask, keep_mask((1000, 1000), p))  # a new draw each call
    # Neighbouring elements are independent: P(both kept) = (1 - p)^2.
    pairs = float((mask[:, :-1] & mask[:, 1:]).float().mean())
    assert abs(pairs - (1 - p) ** 2) < 10 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5  # pairs overlap: wider


def test_dropout_is_the_mask_times_one_over_keep_probability_forward_and_backward():
    x = torch.randn(3, 5, 7, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.2, training=True)
    mask = torch.from_numpy(naive_mask((3, 5, 7), 0.2, seed=3))
    torch.testing.assert_close(y, torch.where(mask, x / 0.8, torch.zeros(())), rtol=1e-6, atol=0)
    y.backward(torch.ones_like(y) * 2)
    torch.testing.assert_close(x.grad, mask.float() * 2 / 0.8)


def test_evaluation_other_probabilities_and_integers_are_torchs_own():
    x = torch.randn(4, 6)
    assert torch.equal(dropout(x, 0.3, training=False), x)
    assert torch.equal(dropout(x, 0.0, training=True), x)
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    module = CpuDropout(0.5)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.5
    assert torch.equal(module.eval()(x), x)


def naive_attention(q, k, v, additive_mask, p, keep):
    """softmax(q k^T / sqrt(d) + mask), dropped out, times v, as [B, T, heads, d]."""
    probs = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + additive_mask, dim=-1)
    return ((probs * keep / (1 - p)) @ v).transpose(1, 2)


def test_attention_matches_the_naive_formula_with_padding_forward_and_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    additive = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    additive[1, :, :, 3:] = torch.finfo(torch.float64).min  # the second text has 3 real tokens
    module = torch.nn.Module()
    torch.manual_seed(7)
    out, weights = attention(module, q, k, v, additive, dropout=0.25, scaling=4 ** -0.5)
    keep = torch.from_numpy(naive_mask((2, 3, 5, 5), 0.25, seed=7))
    reference = naive_attention(q, k, v, additive, 0.25, keep)
    torch.testing.assert_close(out, reference)
    assert weights is None
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(reference.sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    # Without dropout it is transformers' own SDPA path, and the same numbers as the formula.
    plain, _ = attention(module, q, k, v, additive, dropout=0.0, scaling=4 ** -0.5)
    torch.testing.assert_close(plain, naive_attention(q, k, v, additive, 0.0, torch.ones(1, dtype=torch.bool)))


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("bert") / "m", layers=2, dropout=0.3, init_range=0.2)


def _encoder_parameters(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if not name.startswith("pooler.")]  # unused by the states


def _inputs():
    ids = torch.tensor([[2, 8, 9, 10, 11, 12, 3], [2, 13, 14, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_a_patched_bert_trains_as_torchs_dropout_would_with_these_masks(bert_folder, monkeypatch):
    """The patched model against the plain eager model whose every dropout draws :func:`naive_mask`'s masks:
    same masks in the same order, applied to the same tensors (padding included), same gradients."""
    from transformers import AutoModel

    # float64, so that only a different mask or formula, not summation order, can show.
    plain = AutoModel.from_pretrained(bert_folder, attn_implementation="eager").double().train()
    patched = AutoModel.from_pretrained(bert_folder).double().train()
    assert patched.config._attn_implementation == "sdpa"
    assert use_cpu_dropout(patched) == sum(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    assert patched.config._attn_implementation == ATTENTION
    ids, mask = _inputs()

    # Mask i of either model is drawn right after torch.manual_seed(1000 + i).
    from leadkd.accel import cpu_dropout

    draws, real_keep = iter(range(1000, 10**6)), cpu_dropout.keep_mask

    def seeded_keep(shape, p):
        torch.manual_seed(next(draws))
        return real_keep(shape, p)

    monkeypatch.setattr(cpu_dropout, "keep_mask", seeded_keep)
    out = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    grads = torch.autograd.grad(out.pow(2).sum(), _encoder_parameters(patched))

    seeds, naive_draws = [], iter(range(1000, 10**6))

    def naive_dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        seeds.append(next(naive_draws))
        return x * torch.from_numpy(naive_mask(tuple(x.shape), p, seeds[-1])) / (1 - p)

    monkeypatch.setattr(F, "dropout", naive_dropout)
    reference = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.autograd.grad(reference.pow(2).sum(), _encoder_parameters(plain))
    assert len(seeds) == 1 + 2 * 3  # embeddings, then per block: attention probs, two hidden dropouts
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_a_patched_model_evaluates_and_saves_as_before(bert_folder, tmp_path):
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(bert_folder).eval()
    patched = AutoModel.from_pretrained(bert_folder)
    use_cpu_dropout(patched)
    patched.eval()
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   plain(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=1e-6, atol=1e-6)
    patched.save_pretrained(tmp_path / "saved")
    assert ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["hidden_dropout_prob"] == 0.3
