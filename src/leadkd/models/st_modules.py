"""The module pipeline of a sentence-transformers folder (``modules.json``) that a dual encoder can follow.

A sentence-transformers bi-encoder is a list of modules: ``Transformer``, ``Pooling``, then optionally
``Dense`` projections and a final ``Normalize``. leadkd reproduces exactly that pipeline, or refuses the
folder in one line: a module it would drop would make its embeddings silently differ from
sentence-transformers'. The ``Dense`` weights are read and written in sentence-transformers' own layout
(``N_Dense/config.json`` with ``in_features``, ``out_features``, ``bias``, ``activation_function``, and
``N_Dense/model.safetensors`` holding ``linear.weight`` / ``linear.bias``), so folders stay portable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.errors import LeadkdError
from ..runtime.fileio import atomic_write
from .base import folder_file, read_json_file

#: Module types leadkd follows, by their last dotted name (ST 2-6 spell the package part differently).
SUPPORTED = ("Transformer", "Pooling", "Dense", "Normalize")
#: The type names written to ``modules.json``: the legacy spelling every sentence-transformers version reads.
DENSE_TYPE = "sentence_transformers.models.Dense"
#: Where a Dense module's activation may come from: classes of torch.nn only (a folder never runs its own code).
ACTIVATION_PREFIX = "torch.nn."
WEIGHT_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"
#: The input/output key every plain bi-encoder Dense reads and writes.
SENTENCE_EMBEDDING = "sentence_embedding"


def module_kind(module: Any) -> str:
    """The last dotted name of a ``modules.json`` entry's type (``Dense`` for ``...models.Dense``)."""
    return str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""


def check_pipeline(modules: list, where: str) -> None:
    """Refuse, in one line, a module list a dual encoder cannot reproduce exactly.

    Accepted: ``Transformer``, ``Pooling``, any number of ``Dense``, an optional ``Normalize``, in that
    order (leadkd applies the Dense projections to the pooled vector, then normalises).
    """
    seen: list[str] = []
    for position, module in enumerate(modules):
        kind = module_kind(module)
        label = f"module {module.get('idx', position) if isinstance(module, dict) else position}"
        type_name = module.get("type") if isinstance(module, dict) else module
        if kind not in SUPPORTED:
            raise LeadkdError(f"{where}: {label} ({type_name!r}) is not supported by leadkd's dual encoder, which "
                              f"follows only {', '.join(SUPPORTED)} (in that order); its embeddings would differ "
                              "from sentence-transformers' - remove the module or use a model without it")
        if kind == "Dense" and ("Pooling" not in seen or "Normalize" in seen):
            raise LeadkdError(f"{where}: {label} (Dense) comes "
                              f"{'before Pooling' if 'Pooling' not in seen else 'after Normalize'}"
                              "; leadkd applies Dense projections to the pooled vector and then Normalize - "
                              "reorder modules.json or use a model without it")
        if kind in ("Transformer", "Pooling", "Normalize") and kind in seen:
            raise LeadkdError(f"{where}: {label} is a second {kind}; leadkd follows one - use a model without it")
        if kind == "Transformer" and seen:
            raise LeadkdError(f"{where}: {label} (Transformer) is not the first module; leadkd needs it first")
        seen.append(kind)


def _activation(name: Any, file: str) -> nn.Module:
    """An activation module from its dotted class name, only from ``torch.nn`` (e.g. ``...activation.Tanh``)."""
    if name is None:
        return nn.Identity()
    text = str(name)
    candidate = getattr(nn, text.rsplit(".", 1)[-1], None) if text.startswith(ACTIVATION_PREFIX) else None
    if not (isinstance(candidate, type) and issubclass(candidate, nn.Module)):
        raise LeadkdError(f"{file}: activation_function {text!r} is not a torch.nn module class; leadkd loads "
                          "activations from torch.nn only (e.g. torch.nn.modules.activation.Tanh)")
    try:
        return candidate()
    except TypeError as exc:
        raise LeadkdError(f"{file}: activation_function {text!r} cannot be built without arguments ({exc})") from None


class DenseLayer(nn.Module):
    """sentence-transformers' ``Dense``: ``activation(linear(x))``, with the same parameter names."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: nn.Module | None = None):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_function = nn.Identity() if activation is None else activation

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.activation_function(self.linear(vectors))

    def st_config(self) -> dict[str, Any]:
        """The ``config.json`` sentence-transformers writes for this module."""
        activation = type(self.activation_function)
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.linear.bias is not None,
                "activation_function": f"{activation.__module__}.{activation.__qualname__}"}


def _positive_int(config: dict, key: str, file: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LeadkdError(f"{file}: {key} must be a positive integer, got {value!r}")
    return value


def load_dense(root: str, module_path: str, *, use_safetensors: bool = True) -> DenseLayer:
    """One ``Dense`` module of a sentence-transformers folder: its config and weights, strictly."""
    where = os.path.join(root, module_path)
    config_file = folder_file(root, f"{module_path}/config.json".lstrip("/"))
    if config_file is None:
        raise LeadkdError(f"{where}: Dense module without config.json")
    config = read_json_file(config_file)
    file = str(config_file)
    if not isinstance(config, dict):
        raise LeadkdError(f"{file}: expected a JSON object")
    if config.get("use_residual"):
        raise LeadkdError(f"{file}: use_residual=true is not supported by leadkd; use a Dense without it")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key) not in (None, SENTENCE_EMBEDDING):
            raise LeadkdError(f"{file}: {key}={config[key]!r} is not supported; leadkd projects the sentence "
                              "embedding only")
    bias = config.get("bias", True)
    if not isinstance(bias, bool):
        raise LeadkdError(f"{file}: bias must be true or false, got {bias!r}")
    layer = DenseLayer(_positive_int(config, "in_features", file), _positive_int(config, "out_features", file), bias,
                       _activation(config.get("activation_function", "torch.nn.modules.activation.Tanh"), file))

    weights_file = folder_file(root, f"{module_path}/{WEIGHT_FILE}".lstrip("/"))
    if weights_file is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights_file))
    else:
        pickled = folder_file(root, f"{module_path}/{PICKLE_FILE}".lstrip("/"))
        if pickled is None:
            raise LeadkdError(f"{where}: Dense module without weights ({WEIGHT_FILE} or {PICKLE_FILE})")
        if use_safetensors:
            raise LeadkdError(f"{pickled}: refusing pickled Dense weights (no {WEIGHT_FILE}): a pickle can carry "
                              "code; convert the folder to safetensors or opt in with use_safetensors=False")
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LeadkdError(f"{pickled}: cannot read the Dense weights "
                              f"({str(exc).strip().splitlines()[0]})") from None
    weights_name = str(weights_file or pickled)
    expected = {name: tuple(p.shape) for name, p in layer.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        raise LeadkdError(f"{weights_name}: Dense weights {found} do not match its config.json, which needs {expected}")
    layer.load_state_dict(state)
    return layer


def read_dense_layers(root: str, modules: list, *, use_safetensors: bool = True) -> list[DenseLayer]:
    """The ``Dense`` modules of a (checked) module list, in order."""
    return [load_dense(root, str(module.get("path", "")), use_safetensors=use_safetensors)
            for module in modules if module_kind(module) == "Dense"]


def save_dense(directory: str | os.PathLike, folder: str, layer: DenseLayer) -> None:
    """Write one Dense module as sentence-transformers does: ``config.json`` and safetensors weights."""
    from safetensors.torch import save_file

    target = Path(directory) / folder
    target.mkdir(parents=True, exist_ok=True)
    with atomic_write(target / "config.json") as handle:
        json.dump(layer.st_config(), handle, indent=2)
        handle.write("\n")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in layer.state_dict().items()}
    save_file(state, str(target / WEIGHT_FILE))


def check_chain(layers: Sequence[DenseLayer], hidden_size: int, where: str = "") -> None:
    """Each projection must take the width the one before gives (the first: the encoder's width)."""
    width = hidden_size
    for position, layer in enumerate(layers):
        if layer.in_features != width:
            raise LeadkdError(f"{where + ': ' if where else ''}Dense projection {position} takes "
                              f"{layer.in_features} features but gets {width} "
                              f"({'the encoder width' if position == 0 else 'the projection before'})")
        width = layer.out_features
