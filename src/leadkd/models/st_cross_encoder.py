"""What sentence-transformers' ``CrossEncoder`` keeps beside a reranker's weights: its score activation.

ST's ``predict`` applies an activation to the logits (default ``Sigmoid`` for one label). Where it is
stored depends on the ST version that saved the folder, and ST reads them in this order:

* ST >= 6: ``config_sentence_transformers.json`` (``"model_type": "CrossEncoder"``, ``"activation_fn"``),
  with ``modules.json`` and ``sentence_bert_config.json`` beside it;
* ST 4-5: ``config.json``'s ``"sentence_transformers": {"activation_fn": ...}`` entry;
* ST < 4: ``config.json``'s ``"sbert_ce_default_activation_function"``.

leadkd distils from logits (LEAD softmaxes them); the activation is kept only so that reranking scores
and saved folders match what ST gives. Activations are dotted ``torch.*`` class paths, as ST writes them;
anything else would mean importing code a folder names, which ST itself refuses without trust_remote_code.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..runtime.errors import LeadkdError
from ..runtime.fileio import atomic_write
from .base import read_json_file

#: ST's activation for a one-label cross-encoder that names none.
DEFAULT_ACTIVATION = "torch.nn.modules.activation.Sigmoid"
#: The ST >= 6 CrossEncoder files carried from a loaded folder to a saved one.
ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
ST_CONFIG = "config_sentence_transformers.json"


def activation_module(path: str, where: str = "activation") -> nn.Module:
    """An instance of the ``torch.*`` activation class named by its dotted path (ST's ``fullname``)."""
    module_name, _, class_name = path.rpartition(".")
    if not path.startswith("torch.") or not module_name:
        raise LeadkdError(f"{where}: activation {path!r} is not a torch class path (such as {DEFAULT_ACTIVATION})")
    try:
        activation = getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, AttributeError, TypeError) as exc:
        raise LeadkdError(f"{where}: cannot build activation {path!r} ({exc})") from None
    if not isinstance(activation, nn.Module):
        raise LeadkdError(f"{where}: activation {path!r} is not a torch module")
    return activation


def read_st_cross_encoder(location: str, hf_config) -> tuple[dict[str, Any], str | None]:
    """The ST >= 6 CrossEncoder files of a folder (name -> JSON) and the activation ST would apply (None:
    the folder names none). A ST pipeline with modules after the transformer is refused: its scores are
    not the transformer's logits."""
    files: dict[str, Any] = {}
    activation = None
    folder = Path(location)
    st_config_file = folder / ST_CONFIG
    if os.path.isdir(location) and st_config_file.is_file():
        st_config = read_json_file(st_config_file)
        if isinstance(st_config, dict) and st_config.get("model_type") == "CrossEncoder":
            for name in ST_FILES:
                if (folder / name).is_file():
                    files[name] = read_json_file(folder / name)
            modules = files.get("modules.json")
            if modules is not None:
                if not isinstance(modules, list):
                    raise LeadkdError(f"{folder / 'modules.json'}: expected a list of modules")
                kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
                if kinds != ["Transformer"]:
                    raise LeadkdError(f"{folder / 'modules.json'}: modules {kinds} are not supported; a cross-encoder "
                                      "must be a single Transformer module (its scores are the model's logits)")
            activation = st_config.get("activation_fn")
    if activation is None:
        entry = getattr(hf_config, "sentence_transformers", None)
        if isinstance(entry, dict):
            activation = entry.get("activation_fn")
    if activation is None:
        activation = getattr(hf_config, "sbert_ce_default_activation_function", None)
    if activation is not None and not isinstance(activation, str):
        raise LeadkdError(f"{folder}: activation_fn must be a class path, got {activation!r}")
    return files, activation


def record_activation(hf_config, files: dict[str, Any], activation: str) -> dict[str, Any]:
    """Put ``activation`` wherever the folder's ST version keeps it (in ``hf_config`` and the returned
    files); a folder that kept none gets ST 4's ``config.json`` entry, which every ST >= 4 reads, unless
    the activation is ST's default anyway."""
    files = {name: (dict(payload) if isinstance(payload, dict) else payload) for name, payload in files.items()}
    recorded = False
    if isinstance(files.get(ST_CONFIG), dict):
        files[ST_CONFIG]["activation_fn"] = activation
        recorded = True
    entry = getattr(hf_config, "sentence_transformers", None)
    if isinstance(entry, dict):
        hf_config.sentence_transformers = {**entry, "activation_fn": activation}
        recorded = True
    if getattr(hf_config, "sbert_ce_default_activation_function", None) is not None:
        hf_config.sbert_ce_default_activation_function = activation
        recorded = True
    if not recorded and activation != DEFAULT_ACTIVATION:
        hf_config.sentence_transformers = {"activation_fn": activation}
    return files


def write_st_files(directory: str | os.PathLike, files: dict[str, Any]) -> None:
    """Write the carried ST files (JSON) into ``directory``."""
    for name, payload in files.items():
        with atomic_write(Path(directory) / name) as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
