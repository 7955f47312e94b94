"""CPU inference at full speed: fused feed-forward kernels and one batch per core.

Neither changes what a model computes beyond float rounding; both are applied by the code that runs a
model (:func:`encode` below: the retrieval pipeline, dev evaluation and mining call it), never by the
model itself. Measured in benchmarks/encode_speed.py against sentence-transformers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import block_outputs

#: Padded tokens per batch in CPU inference. Measured on MiniLM-L6 (2 cores): 8 x 256 tokens ran ~15% faster
#: than 32 x 256 with both threads on one batch, because a small batch's activations stay in the CPU caches;
#: with one batch per core (``parallel_batches``) 4 x 256 is ~1.5% faster again than 8 x 256.
CPU_BATCH_TOKENS = 1024


def encode(model, texts: Sequence[str], side: str = "passage", *, fuse: bool = True, parallel_batches: bool = True,
           **kwargs: Any) -> np.ndarray:
    """``model.encode(texts, side, **kwargs)`` with the CPU speed-ups where the model runs on the CPU: the
    fused kernels (after a one-off check against the plain forward), batches of at most
    :data:`CPU_BATCH_TOKENS` padded tokens, and as many batches side by side as torch has threads (each
    on one thread). Elsewhere, or for a model without a Hugging Face ``backbone``, it is the model's own
    ``encode_queries`` / ``encode_passages``."""
    device = getattr(model, "device", None)
    if getattr(device, "type", None) != "cpu" or not isinstance(getattr(model, "backbone", None), nn.Module):
        return (model.encode_queries if side == "query" else model.encode_passages)(texts, **kwargs)
    kwargs.setdefault("max_batch_tokens", CPU_BATCH_TOKENS)
    workers = torch.get_num_threads() if parallel_batches else 1
    bf16 = bool(kwargs.get("bf16"))

    def run_batches(fn: Callable[[np.ndarray], None], batches: list) -> None:
        if workers > 1 and len(batches) >= 2 * workers:
            on_worker_threads(fn, batches, workers, bf16)
        else:
            for rows in batches:
                fn(rows)

    with contextlib.ExitStack() as stack:
        if fuse and not bf16 and len(texts) > 0 and fusion_reproduces(model.backbone):
            stack.enter_context(fused_cpu_inference(model.backbone))
        return model.encode(texts, side, run_batches=run_batches, **kwargs)


def encode_queries(model, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
    return encode(model, texts, "query", **kwargs)


def encode_passages(model, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
    return encode(model, texts, "passage", **kwargs)


def _is_erf_gelu(module: Any) -> bool:
    """True for the exact (erf) GELU of BERT-family configs, the only activation the fusion reproduces."""
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    if type(module) is GELUActivation:
        return getattr(module, "act", None) is F.gelu
    return type(module) is nn.GELU and module.approximate == "none"


def on_worker_threads(fn: Callable[[Any], None], items: Sequence[Any], workers: int, bf16: bool) -> None:
    """``fn(item)`` for every item, on ``workers`` threads that each run torch with one thread.

    Why: a batch's ops split over two cores spend part of each op synchronising; two batches side by
    side, one per core, keep both cores on GEMMs (+8% passages/s for MiniLM on this 2-core CPU). torch's
    thread count is process-wide, so it is 1 while this runs and restored after. Items are taken in order
    (the longest batches first), so the threads finish together. Inference mode and autocast are
    per-thread, hence entered in each worker.
    """
    from concurrent.futures import ThreadPoolExecutor

    def run(item: Any) -> None:
        with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                                      else contextlib.nullcontext()):
            fn(item)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(run, items):  # re-raises a worker's exception here
                pass
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def fused_cpu_inference(model: nn.Module) -> Iterator[int]:
    """Run BERT-style blocks' ``dense -> GELU`` and ``dense -> + residual`` as single oneDNN calls (eval only).

    Why: on CPU the separate GELU pass over the ``[tokens, 4d]`` activations, the residual add and the bias
    broadcast of each GEMM cost ~15% of a MiniLM forward; oneDNN applies them while the GEMM output is
    still in cache. The math is unchanged (exact erf GELU; dropout is skipped, as in eval mode); only some
    GEMMs' summation order differs (~1e-6). Modules are patched per instance and restored on exit, so
    training never sees the patch, and weights are re-packed on every entry, so they are never stale.
    Yields the number of patched modules (0 where oneDNN or a matching module is missing).
    """
    mkldnn = getattr(torch.ops, "mkldnn", None)
    linear = getattr(mkldnn, "_linear_pointwise", None)
    reorder = getattr(mkldnn, "_reorder_linear_weight", None)
    patched: list[nn.Module] = []
    try:
        if linear is not None and reorder is not None and torch.backends.mkldnn.is_available():
            for module in model.modules():
                dense = getattr(module, "dense", None)
                if not (isinstance(dense, nn.Linear) and dense.bias is not None and dense.weight.device.type == "cpu"
                        and dense.weight.dtype == torch.float32):
                    continue
                weight, bias = reorder(dense.weight.detach(), None), dense.bias.detach()
                if _is_erf_gelu(getattr(module, "intermediate_act_fn", None)):  # BertIntermediate and copies
                    module.forward = (lambda w, b: lambda hidden_states: linear(
                        hidden_states, w, b, "gelu", [], "none"))(weight, bias)
                elif type(module).__name__.endswith("Output") and isinstance(getattr(module, "LayerNorm", None),
                                                                              nn.LayerNorm):  # Bert(Self)Output
                    module.forward = (lambda w, b, norm: lambda hidden_states, input_tensor: norm(linear.binary(
                        hidden_states, input_tensor, w, b, "add")))(weight, bias, cast(nn.LayerNorm, module.LayerNorm))
                else:
                    continue
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


def fusion_reproduces(backbone: nn.Module) -> bool:
    """Whether :func:`fused_cpu_inference` patches this encoder and reproduces it: checked once per encoder
    on a tiny random batch, in eval mode (a module that only looks like BERT's falls back to the plain
    forward, with a warning). The verdict depends on the modules, not the weights, so it is kept."""
    verdict = getattr(backbone, "_leadkd_fusion_verdict", None)
    if verdict is not None:
        return verdict
    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(backbone.config, "vocab_size", 1000))
    ids = torch.randint(min(vocab, 1000) // 2, min(vocab, 1000), (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            reference = block_outputs(backbone, ids, mask, all_layers=False)[-1]
            try:
                with fused_cpu_inference(backbone) as count:
                    fused = block_outputs(backbone, ids, mask, all_layers=False)[-1]
            except (RuntimeError, TypeError):  # a module that only looks like BERT's
                count, fused = 1, reference + float("inf")
    finally:
        backbone.train(was_training)
    scale = max(1.0, float(reference.abs().max()))
    verdict = count > 0 and float((fused - reference).abs().max()) <= 1e-4 * scale
    if count > 0 and not verdict:
        warnings.warn("fused CPU inference does not reproduce this model; using the plain forward", stacklevel=3)
    backbone._leadkd_fusion_verdict = verdict  # type: ignore[assignment]  # torch types attributes Tensor | Module
    return verdict
