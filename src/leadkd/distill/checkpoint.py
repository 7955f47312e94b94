"""Training checkpoints: written whole or not at all, the last K kept, the newest good one resumed.

A checkpoint is a folder ``step-00000100/`` holding each trained model as an ordinary model folder
(``save_pretrained``: safetensors + settings) and ``state.pt`` with everything else a resumed run needs
(optimizers, schedulers, RNG states, data position, layer-selection state). ``state.pt`` holds only
tensors, numbers, strings and containers, so it is read with ``torch.load(weights_only=True)``: loading
a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..config import DistillConfig, changed_settings, load_config
from ..runtime.errors import ConfigError, LeadkdError
from ..runtime.fileio import atomic_directory, is_write_failure, remove_tree, write_failure_reason

STATE_FILE = "state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout, shuffles), in a weights-only-loadable form."""
    # the legacy tuple (MT19937's): numpy's stub types the default call as the dict of legacy=False
    numpy_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state = {
        "torch": torch.get_rng_state(),
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_tensor(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_tensor(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss if gauss is None else float(gauss)}


def _python_state_from_tensor(state: dict[str, Any]) -> tuple:
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss"]


def save_checkpoint(root: str | os.PathLike, step: int, models: dict[str, Any], state: dict[str, Any],
                    keep_last: int | None = None) -> Path:
    """Write ``root/step-N`` atomically (models by ``save_pretrained``, ``state.pt``); prune old ones."""
    root = Path(root)
    target = root / checkpoint_name(step)
    try:
        with atomic_directory(target) as tmp:
            for name, model in models.items():
                model.save_pretrained(tmp / name)
            torch.save(state, tmp / STATE_FILE)
    except Exception as exc:  # a full disk: OSError, torch's RuntimeError or safetensors' SafetensorError
        if not is_write_failure(exc):
            raise
        intact = list_checkpoints(root)  # a failed write never touches what was already there
        kept = f"the newest intact checkpoint is {intact[-1]}" if intact else "no earlier checkpoint exists"
        reason = write_failure_reason(exc, root, default="write failed")
        raise LeadkdError(f"{target}: cannot write the checkpoint of step {step} ({reason}); {kept}") from None
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            _remove(old)
    return target


def _remove(folder: Path) -> None:
    """Delete an old checkpoint, renamed out of the checkpoint names first (no half-deleted ``step-N``)."""
    remove_tree(folder, folder.with_name(f".{folder.name}.deleting"))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (temporary and half-written folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


#: What an interrupted write of this module or of a model folder leaves: ``atomic_directory``'s
#: ``.step-N.<random>.tmp`` (or ``.final…``, ``.best…``, ``.final-student…``) and ``remove_tree``'s
#: ``.step-N.deleting``.
_LEFTOVER = re.compile(r"^\.(step-\d+|final(-\w+)?|best)\.(.+\.tmp|deleting)$")


def remove_leftovers(output: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders a kill in the middle of a checkpoint or model write left in ``output``
    and its ``checkpoints/``; returns what was removed (for one log line).

    Nothing else reads them (``list_checkpoints`` matches ``step-N`` only), so they would only fill the
    disk, a checkpoint's size each. Called at the start of a run, under the output folder's lock: no
    other writer can own them then.
    """
    removed = []
    for folder in (Path(output), Path(output) / "checkpoints"):
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_dir() and _LEFTOVER.match(path.name):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
    return removed


def load_state(folder: str | os.PathLike) -> dict[str, Any]:
    """``state.pt`` of one checkpoint, weights-only."""
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise LeadkdError(f"{folder}: not a checkpoint (no {STATE_FILE})")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcode, refused global, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeadkdError(f"{file}: unreadable checkpoint state ({first})") from None


def check_weights(folder: str | os.PathLike) -> None:
    """Every safetensors file under a checkpoint must be whole (a truncated file fails its header check)."""
    from safetensors import safe_open

    for file in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError, OSError: unreadable either way
            raise LeadkdError(f"{file}: damaged weights "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def newest_checkpoint(root: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose state and weights load; a broken newer one is skipped with a warning."""
    for folder in reversed(list_checkpoints(root)):
        try:
            state = load_state(folder)
            check_weights(folder)
            return folder, state
        except LeadkdError as exc:
            warnings.warn(f"skipping a damaged checkpoint: {exc}", stacklevel=2)
    return None


def check_resumable(output: Path, config, resume: bool, resumed_from: Path | None, log) -> None:
    """Never overwrite a run by accident, and never resume one under different settings.

    A fresh start in a folder that holds checkpoints would replace them one by one; resuming with, say,
    another ``optim.steps`` would silently bend the learning-rate schedule of the steps already taken.
    ``config``: the run's validated config; ``log`` says why a saved config could not be compared.
    """
    checkpoints = Path(output) / "checkpoints"
    if not resume and list_checkpoints(checkpoints):
        raise ConfigError(f"{output}: holds checkpoints of an earlier run; pass --resume to continue "
                          "it, or choose another output_dir")
    saved = Path(output) / "config.yaml"
    if resumed_from is None or not saved.is_file():
        return
    try:
        before = load_config(saved, kind="distill" if isinstance(config, DistillConfig) else "train")
    except ConfigError as exc:  # written by another leadkd version: nothing reliable to compare with
        log(f"warning: cannot compare with the saved settings ({exc})")
        return
    changed = changed_settings(before, config)
    if changed:
        start = Path(output) / "final" if (Path(output) / "final").is_dir() else resumed_from
        raise ConfigError(f"{saved}: the run being resumed used other settings ({'; '.join(changed)}); "
                          f"resume with the same settings, or start a new output_dir from {start}")
