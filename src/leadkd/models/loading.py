"""Reopening saved models by kind, and the sentence-transformers metadata that makes folders portable.

``load_model`` reads the ``kind`` a leadkd model wrote into ``leadkd_config.json`` and hands the folder to
that kind's ``from_pretrained``; a folder without it is a plain Hugging Face / sentence-transformers
encoder and opens as a :class:`~leadkd.models.dual_encoder.DualEncoder`. The ST helpers live here so
that every model kind reads and writes the same files the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..kinds import DEFAULT_KIND, MODEL_KINDS, model_class
from ..runtime.errors import LeadkdError
from ..runtime.fileio import atomic_write
from .base import LEADKD_CONFIG, folder_file, read_json_file, read_leadkd_config, resolve_model_path
from .st_modules import DENSE_TYPE, check_pipeline, module_kind, read_dense_layers, save_dense

#: Pooling modes named by sentence-transformers' legacy boolean keys, in ST's own order.
_ST_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def build_model(config, path: str | None = None):
    """The model a :class:`~leadkd.config.ModelConfig` describes, from ``path`` (default ``config.path``)."""
    return model_class(config.kind).from_config(config, path)


def load_model(path: str | os.PathLike, **overrides: Any):
    """Open any saved leadkd model with its own kind and settings; ``overrides`` go to its ``from_pretrained``.

    A folder without ``leadkd_config.json`` opens as a ColBERT if it is a PyLate or ColBERTv2 checkpoint, as a
    cross-encoder if it is a reranker (``architectures`` ``*ForSequenceClassification``: transformers' or
    sentence-transformers' ``CrossEncoder``), else (a plain HF or sentence-transformers encoder, or a hub
    name) as a dual encoder. Loading is strict
    for every kind: missing, unexpected or mis-shaped encoder weights are refused unless
    ``allow_partial=True``, and pickled-only weights unless ``use_safetensors=False`` (both go to
    ``from_pretrained``; see :func:`~leadkd.models.base.load_backbone`).
    """
    resolved = resolve_model_path(path)
    return model_class(detect_kind(resolved)).from_pretrained(resolved, **overrides)


def detect_kind(path: str | os.PathLike) -> str:
    """The kind a folder holds, as :func:`load_model` opens it: a leadkd folder's saved kind, a PyLate or
    ColBERTv2 checkpoint's ColBERT, a reranker's cross-encoder, else a dual encoder (hub names too)."""
    resolved = resolve_model_path(path)
    config = read_leadkd_config(resolved) if os.path.isdir(resolved) else None
    kind: str | None
    if config is None:
        from .classification_heads import is_sequence_classifier  # a reranker is a cross-encoder
        from .colbert_formats import detect_format  # a PyLate / ColBERTv2 checkpoint is a ColBERT

        architectures = (_read_json(str(resolved), "config.json") or {}).get("architectures") or []
        if detect_format(resolved):
            kind = "colbert"
        elif any(is_sequence_classifier(str(name)) for name in architectures):
            kind = "cross_encoder"
        else:
            kind = DEFAULT_KIND
    else:
        file = Path(resolved) / LEADKD_CONFIG
        kind = config.get("kind") if isinstance(config, dict) else None
        if not isinstance(kind, str):
            raise LeadkdError(f"{file}: no model 'kind' given")
        if kind not in MODEL_KINDS:
            raise LeadkdError(f"{file}: unknown model kind {kind!r}; known kinds: {', '.join(sorted(MODEL_KINDS))}")
    return kind


def write_leadkd_config(directory: str | os.PathLike, kind: str, settings: dict[str, Any]) -> None:
    """Write ``leadkd_config.json``: the kind, its settings and the leadkd version that wrote them."""
    payload = {"kind": kind, **settings, "leadkd_version": __version__}
    with atomic_write(Path(directory) / LEADKD_CONFIG) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


# ----------------------------------------------------------------------------------------------------
# sentence-transformers metadata
# ----------------------------------------------------------------------------------------------------

def _read_json(root: str, name: str) -> Any:
    """A JSON file of a local folder (or, for a hub name, of its cached/downloadable snapshot), or None."""
    file = folder_file(root, name)
    return None if file is None else read_json_file(file)


def _st_pooling(config: dict, file: str) -> str:
    """The single pooling mode of an ST ``Pooling`` config (new ``pooling_mode`` or legacy booleans)."""
    mode = config.get("pooling_mode")
    if mode is None:
        active = [name for key, name in _ST_LEGACY_POOLING.items() if config.get(key)]
        mode = active or ["mean"]  # ST's own default when no flag is set
    if isinstance(mode, (list, tuple)):
        if len(mode) != 1:
            raise LeadkdError(f"{file}: combined pooling {list(mode)} is not supported; use 'cls' or 'mean'")
        mode = mode[0]
    if mode not in ("cls", "mean"):
        raise LeadkdError(f"{file}: pooling {mode!r} is not supported; use 'cls' or 'mean'")
    if config.get("include_prompt", True) is False:
        raise LeadkdError(f"{file}: pooling that excludes the prompt (include_prompt=false) is not supported")
    return mode


def read_st_settings(name_or_path: str) -> dict[str, Any]:
    """Dual-encoder settings implied by a sentence-transformers folder; empty for a plain HF folder.

    Keys (only those the metadata decides): ``pooling``, ``normalize``, ``query_prefix``,
    ``passage_prefix``, ``max_query_length``, ``max_passage_length``. The ``Dense`` projections are weights,
    not settings: :func:`read_st_dense` reads them. A module list leadkd cannot reproduce exactly (any module
    but Transformer, Pooling, Dense, Normalize, or those out of order) is refused in one line.
    """
    root = str(name_or_path)
    modules = _read_json(root, "modules.json")
    if modules is None:
        return {}
    where = os.path.join(root, "modules.json")
    if not isinstance(modules, list):
        raise LeadkdError(f"{where}: expected a list of modules")
    check_pipeline(modules, where)  # a module leadkd would drop is refused, never ignored
    settings: dict[str, Any] = {"normalize": False}
    for module in modules:
        kind = module_kind(module)
        if kind == "Pooling":
            sub = os.path.join(module.get("path", ""), "config.json")
            config = _read_json(root, sub)
            if config is not None:
                settings["pooling"] = _st_pooling(config, os.path.join(root, sub))
            else:
                settings["pooling"] = "mean"
        elif kind == "Normalize":
            settings["normalize"] = True

    bert_config = _read_json(root, "sentence_bert_config.json") or {}
    max_length = bert_config.get("max_seq_length")
    if max_length is None:  # sentence-transformers >= 6 keeps the limit in the tokenizer's config
        tokenizer_config = _read_json(root, "tokenizer_config.json") or {}
        model_max = tokenizer_config.get("model_max_length")
        positions = (_read_json(root, "config.json") or {}).get("max_position_embeddings")
        if isinstance(model_max, int) and model_max < 100_000:
            max_length = min(model_max, positions) if isinstance(positions, int) and positions > 0 else model_max
    if isinstance(bert_config.get("document_length"), int):
        max_length = bert_config["document_length"]
    if isinstance(max_length, int):
        settings["max_passage_length"] = max_length
    if isinstance(bert_config.get("query_length"), int):
        settings["max_query_length"] = bert_config["query_length"]

    st_config = _read_json(root, "config_sentence_transformers.json") or {}
    query, passage = st_prompts(st_config.get("prompts"), st_config.get("default_prompt_name"))
    if query is not None:
        settings["query_prefix"] = query
    if passage is not None:
        settings["passage_prefix"] = passage
    return settings


def st_prompts(prompts: dict | None, default_name: str | None) -> tuple[str | None, str | None]:
    """The query and passage prefixes of sentence-transformers prompts: ``query``, then the first of
    ``document`` / ``passage`` / ``corpus``, each else the default prompt (None where there is none)."""
    prompts = prompts or {}
    default = prompts.get(default_name or "")
    passage = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), default)
    return prompts.get("query", default), passage


def read_st_dense(name_or_path: str, *, use_safetensors: bool = True) -> list:
    """The ``Dense`` projections of a sentence-transformers folder, in order (empty without any).

    Pickled Dense weights (``pytorch_model.bin`` only) are refused unless ``use_safetensors=False``.
    """
    root = str(name_or_path)
    modules = _read_json(root, "modules.json")
    if not isinstance(modules, list):
        return []  # no modules.json; a malformed one is refused by read_st_settings
    check_pipeline(modules, os.path.join(root, "modules.json"))
    return read_dense_layers(root, modules, use_safetensors=use_safetensors)


def write_st_metadata(directory: str | os.PathLike, *, hidden_size: int, pooling: str, normalize: bool,
                      max_seq_length: int, query_prefix: str = "", passage_prefix: str = "",
                      dense: Sequence = ()) -> None:
    """Write the files that let ``SentenceTransformer(directory)`` rebuild a pooled encoder.

    The legacy module names and ``pooling_mode_*`` keys are used on purpose: every sentence-transformers
    version from 2 to 6 reads them. ST has one length limit, so it gets the passage length. ``dense``:
    :class:`~leadkd.models.st_modules.DenseLayer` projections applied after pooling, written as ST's
    ``N_Dense`` folders (weights in safetensors); Normalize comes after them.
    """
    directory = Path(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    for layer in dense:
        index = len(modules)
        modules.append({"idx": index, "name": str(index), "path": f"{index}_Dense", "type": DENSE_TYPE})
        save_dense(directory, f"{index}_Dense", layer)
    if normalize:
        index = len(modules)
        modules.append({"idx": index, "name": str(index), "path": f"{index}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (directory / f"{index}_Normalize").mkdir(exist_ok=True)
    pooling_config = {"word_embedding_dimension": hidden_size,
                      **{key: name == pooling for key, name in _ST_LEGACY_POOLING.items()}}
    versions = {"leadkd": __version__}
    try:
        import torch
        import transformers

        versions.update(transformers=transformers.__version__, pytorch=torch.__version__)
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass
    st_config: dict[str, Any] = {"__version__": versions, "prompts": {}, "default_prompt_name": None,
                                 "similarity_fn_name": "cosine" if normalize else "dot"}
    if query_prefix or passage_prefix:
        st_config["prompts"] = {"query": query_prefix, "document": passage_prefix}
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling_config,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": st_config,
    }
    for name, payload in files.items():
        with atomic_write(directory / name) as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
