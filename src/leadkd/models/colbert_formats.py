"""Reading ColBERT checkpoints of other ecosystems: PyLate folders and ColBERTv2 (stanford-futuredata).

Both put a bias-free linear projection on top of a Hugging Face encoder, but lay out their inputs
differently from the LEAD paper's code (which :class:`~leadkd.models.colbert.ColBERT` follows by
default), so every setting is read from the checkpoint itself:

* **PyLate** (``lightonai/pylate``): a sentence-transformers folder. ``modules.json`` names the
  Transformer module and PyLate's ``Dense`` (``1_Dense/config.json``: ``in_features``, ``out_features``,
  ``bias``, ``activation_function``; weight ``linear.weight`` in ``model.safetensors`` or
  ``pytorch_model.bin``); ``config_sentence_transformers.json`` holds ``query_prefix`` / ``document_prefix``
  (tokens PyLate added to the tokenizer, e.g. ``"[Q] "``), ``query_length``, ``document_length``,
  ``do_query_expansion``, ``attend_to_expansion_tokens`` and ``skiplist_words``. PyLate inserts the prefix
  token after [CLS], pads queries with [MASK] to ``query_length`` (attended only with
  ``attend_to_expansion_tokens``) and drops the skiplist's token ids (``convert_tokens_to_ids`` of each
  word) from the documents' tokens. Its defaults, used for absent keys: ``"[Q] "``, ``"[D] "``, 32, 180,
  expansion on, not attended, ``string.punctuation``.
* **ColBERTv2**: a BERT folder whose weights hold ``bert.*`` and ``linear.weight`` ``[dim, hidden]``; the
  settings are in ``artifact.metadata`` (or the same keys of ``config.json``): ``query_token_id``
  (``[unused0]``), ``doc_token_id`` (``[unused1]``), ``query_maxlen`` (32), ``doc_maxlen`` (220), ``dim``,
  ``attend_to_mask_tokens`` (false), ``mask_punctuation`` (true), ``similarity`` (``cosine``). The marker
  replaces a placeholder right after [CLS], queries are padded with [MASK] to ``query_maxlen``, and with
  ``mask_punctuation`` the first token id of each ``string.punctuation`` symbol is dropped from documents.

A reader returns :class:`ForeignColBERT`: the :class:`~leadkd.models.colbert.ColBERTOptions` fields it
decides, the projection weight, where the encoder lives, and the skiplist as the source defines it (words
or punctuation symbols; token ids need the tokenizer, see :func:`skiplist_ids`).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import LeadkdError
from .base import LEADKD_CONFIG, read_json_file

PYLATE = "pylate"
COLBERTV2 = "colbertv2"
#: Keys only PyLate writes into ``config_sentence_transformers.json``.
PYLATE_KEYS = ("query_prefix", "document_prefix", "query_length", "document_length", "attend_to_expansion_tokens",
               "skiplist_words", "do_query_expansion")
COLBERTV2_METADATA = "artifact.metadata"
COLBERTV2_KEYS = ("query_token_id", "doc_token_id", "query_maxlen", "doc_maxlen", "dim", "attend_to_mask_tokens",
                  "mask_punctuation", "similarity")
#: The activations a projection may carry: PyLate writes ``fullname(nn.Identity())``.
IDENTITY_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.Identity", "Identity", None)


@dataclass
class ForeignColBERT:
    """What a PyLate or ColBERTv2 folder says about its ColBERT."""

    format: str
    backbone_path: str                      # the folder the encoder and tokenizer load from
    options: dict[str, Any]                 # ColBERTOptions fields the checkpoint decides
    projection: torch.Tensor                # [dim, hidden], bias-free
    skiplist_words: list[str] = field(default_factory=list)   # PyLate: convert_tokens_to_ids of each
    skiplist_symbols: list[str] = field(default_factory=list)  # ColBERTv2: first id of encode(symbol)


def _module_kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def detect_format(path: str | os.PathLike) -> str | None:
    """``"pylate"``, ``"colbertv2"`` or None (a leadkd folder, a plain encoder, a hub name)."""
    root = Path(path)
    if not root.is_dir() or (root / LEADKD_CONFIG).is_file():
        return None
    modules_file, st_file = root / "modules.json", root / "config_sentence_transformers.json"
    if modules_file.is_file():
        modules = read_json_file(modules_file)
        st_config = read_json_file(st_file) if st_file.is_file() else {}
        names = [str(m.get("type", "")) for m in modules] if isinstance(modules, list) else []
        pylate_keys = isinstance(st_config, dict) and (
            any(key in st_config for key in PYLATE_KEYS) or st_config.get("model_type") == "ColBERT")
        if any(name.startswith("pylate.") for name in names) or pylate_keys:
            return PYLATE
        return None
    if (root / COLBERTV2_METADATA).is_file():
        return COLBERTV2
    config_file = root / "config.json"
    if config_file.is_file():
        config = read_json_file(config_file)
        if isinstance(config, dict) and (config.get("architectures") or [None])[0] == "HF_ColBERT":
            return COLBERTV2
    return None


def read_foreign(path: str | os.PathLike, use_safetensors: bool = True) -> ForeignColBERT | None:
    """The ColBERT a PyLate or ColBERTv2 folder holds, or None for any other folder."""
    kind = detect_format(path)
    if kind == PYLATE:
        return read_pylate(path, use_safetensors)
    if kind == COLBERTV2:
        return read_colbertv2(path, use_safetensors)
    return None


def _load_weight(folder: Path, key: str, use_safetensors: bool) -> torch.Tensor:
    """One tensor of a folder's weights (single or sharded safetensors; the pickle only if allowed)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    file = folder / "model.safetensors"
    if index.is_file():
        shard = (read_json_file(index).get("weight_map") or {}).get(key)
        if shard is None:
            raise LeadkdError(f"{index}: no {key!r} in the weight map")
        file = folder / shard
    if file.is_file():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            if key not in handle.keys():
                raise LeadkdError(f"{file}: no {key!r} tensor (the projection)")
            return handle.get_tensor(key)
    pickle = folder / "pytorch_model.bin"
    if not pickle.is_file():
        raise LeadkdError(f"{folder}: no model.safetensors or pytorch_model.bin holding {key!r}")
    if use_safetensors:
        raise LeadkdError(f"{pickle}: refusing pickled weights (no model.safetensors); opt in with "
                          "use_safetensors=False (--allow-pickle), which still unpickles tensors only")
    try:
        weights = torch.load(str(pickle), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LeadkdError(f"{pickle}: cannot read its tensors ({str(exc).strip().splitlines()[0][:200]})") from None
    if key not in weights:
        raise LeadkdError(f"{pickle}: no {key!r} tensor (the projection)")
    return weights[key]


def _projection_shape(weight: torch.Tensor, where: Path, dim: Any = None, hidden: Any = None) -> torch.Tensor:
    if weight.dim() != 2:
        raise LeadkdError(f"{where}: linear.weight has shape {tuple(weight.shape)}, expected [dim, hidden]")
    for name, value, size in (("out_features/dim", dim, weight.shape[0]), ("in_features", hidden, weight.shape[1])):
        if value is not None and value != size:
            raise LeadkdError(f"{where}: {name} is {value} but linear.weight has shape {tuple(weight.shape)}")
    return weight.detach().float().contiguous()


def read_pylate(path: str | os.PathLike, use_safetensors: bool = True) -> ForeignColBERT:
    """A PyLate folder's settings and projection (see the module docstring)."""
    root = Path(path)
    where = root / "modules.json"
    modules = read_json_file(where)
    if not isinstance(modules, list):
        raise LeadkdError(f"{where}: expected a list of modules")
    transformers = [m for m in modules if _module_kind(m) == "Transformer"]
    dense = [m for m in modules if _module_kind(m) == "Dense"]
    others = [_module_kind(m) for m in modules if _module_kind(m) not in ("Transformer", "Dense")]
    if len(transformers) != 1:
        raise LeadkdError(f"{where}: a PyLate model needs exactly one Transformer module, found {len(transformers)}")
    if len(dense) != 1:
        raise LeadkdError(f"{where}: leadkd reads a PyLate model with exactly one Dense projection, "
                          f"found {len(dense)}")
    if others:
        raise LeadkdError(f"{where}: PyLate module(s) {', '.join(others)} are not supported (only Transformer, Dense)")
    dense_dir = root / str(dense[0].get("path", ""))
    dense_file = dense_dir / "config.json"
    if not dense_file.is_file():
        raise LeadkdError(f"{dense_file}: missing (the Dense projection's config)")
    dense_config = read_json_file(dense_file)
    if dense_config.get("bias", True):  # PyLate's Dense defaults to a bias when the key is absent
        raise LeadkdError(f"{dense_file}: field 'bias': a projection with a bias is not supported (ColBERT's is "
                          "bias-free)")
    activation = dense_config.get("activation_function")
    if activation not in IDENTITY_ACTIVATIONS:
        raise LeadkdError(f"{dense_file}: field 'activation_function': {activation!r} is not supported, only "
                          "the identity (torch.nn.modules.linear.Identity)")
    if dense_config.get("use_residual"):
        raise LeadkdError(f"{dense_file}: field 'use_residual': a residual projection is not supported")
    weight = _projection_shape(_load_weight(dense_dir, "linear.weight", use_safetensors), dense_dir,
                               dense_config.get("out_features"), dense_config.get("in_features"))

    st_file = root / "config_sentence_transformers.json"
    st_config = read_json_file(st_file) if st_file.is_file() else {}
    query_prefix = st_config.get("query_prefix", "[Q] ")
    document_prefix = st_config.get("document_prefix", "[D] ")
    for name, prefix in (("query_prefix", query_prefix), ("document_prefix", document_prefix)):
        if not isinstance(prefix, str) or not prefix:
            raise LeadkdError(f"{st_file}: field {name!r}: an empty or missing prefix token is not supported")
    default_prompt = (st_config.get("prompts") or {}).get(st_config.get("default_prompt_name") or "")
    if default_prompt:
        raise LeadkdError(f"{st_file}: field 'default_prompt_name': a prompt prepended to every text is not "
                          "supported")
    bert_file = root / str(transformers[0].get("path", "")) / "sentence_bert_config.json"
    if bert_file.is_file() and read_json_file(bert_file).get("do_lower_case"):
        raise LeadkdError(f"{bert_file}: field 'do_lower_case': lower-casing texts before the tokenizer is not "
                          "supported (use a lower-casing tokenizer)")
    expansion = bool(st_config.get("do_query_expansion", True))
    skiplist = st_config.get("skiplist_words")
    if skiplist is None:
        skiplist = list(string.punctuation)
    if not isinstance(skiplist, list) or not all(isinstance(word, str) for word in skiplist):
        raise LeadkdError(f"{st_file}: field 'skiplist_words': expected a list of strings")
    options = {
        "dim": int(weight.shape[0]),
        "query_marker": query_prefix,
        "doc_marker": document_prefix,
        "max_query_length": st_config.get("query_length", 32),
        "max_passage_length": st_config.get("document_length", 180),
        "marker_position": "after_cls",
        "query_expansion": expansion,
        # PyLate: "If we do not do query expansion, we do not attend to the expansion tokens"
        "attend_expansion": bool(st_config.get("attend_to_expansion_tokens", False)) and expansion,
    }
    backbone = root / str(transformers[0].get("path", ""))
    return ForeignColBERT(PYLATE, str(backbone), options, weight, skiplist_words=skiplist)


def read_colbertv2(path: str | os.PathLike, use_safetensors: bool = True) -> ForeignColBERT:
    """A ColBERTv2 checkpoint's settings (``artifact.metadata`` over ``config.json``) and ``linear.weight``."""
    root = Path(path)
    config_file, metadata_file = root / "config.json", root / COLBERTV2_METADATA
    config = read_json_file(config_file) if config_file.is_file() else {}
    settings = {key: config[key] for key in COLBERTV2_KEYS if isinstance(config, dict) and key in config}
    source = config_file
    if metadata_file.is_file():
        metadata = read_json_file(metadata_file)
        if not isinstance(metadata, dict):
            raise LeadkdError(f"{metadata_file}: expected a JSON object")
        settings.update({key: metadata[key] for key in COLBERTV2_KEYS if key in metadata})
        source = metadata_file
    similarity = settings.get("similarity", "cosine")
    if similarity != "cosine":
        raise LeadkdError(f"{source}: field 'similarity': {similarity!r} is not supported, only 'cosine'")
    weight = _projection_shape(_load_weight(root, "linear.weight", use_safetensors), root, settings.get("dim"))
    options = {
        "dim": int(weight.shape[0]),
        "query_marker": settings.get("query_token_id", "[unused0]"),
        "doc_marker": settings.get("doc_token_id", "[unused1]"),
        "max_query_length": settings.get("query_maxlen", 32),
        "max_passage_length": settings.get("doc_maxlen", 220),
        "marker_position": "after_cls",
        "query_expansion": True,
        "attend_expansion": bool(settings.get("attend_to_mask_tokens", False)),
    }
    symbols = list(string.punctuation) if settings.get("mask_punctuation", True) else []
    return ForeignColBERT(COLBERTV2, str(root), options, weight, skiplist_symbols=symbols)


def skiplist_ids(foreign: ForeignColBERT, tokenizer) -> tuple[int, ...]:
    """The token ids dropped from the passage score, computed as the source library computes them.

    PyLate: ``convert_tokens_to_ids`` of each word (a word outside the vocabulary maps to [UNK], so PyLate
    also skips [UNK]; leadkd keeps that). ColBERTv2: the first id of ``encode(symbol)`` of each punctuation
    symbol, without special tokens.
    """
    ids: set[int] = set()
    for word in foreign.skiplist_words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if isinstance(token_id, int):
            ids.add(token_id)
    for symbol in foreign.skiplist_symbols:
        encoded = tokenizer.encode(symbol, add_special_tokens=False)
        if encoded:
            ids.add(int(encoded[0]))
    return tuple(sorted(ids))
