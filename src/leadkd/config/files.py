"""Config files and ``key=value`` overrides as one nested mapping that remembers where each value came from.

A file is YAML (or JSON, by its suffix), read safely: no tag runs code, a duplicate key is an error (plain
PyYAML keeps the last one), and a syntax error is one line with the line number. Overrides are dotted keys
with YAML values (``optim.lr=2e-5``, ``layers.pairs=[[0, 1]]``) merged on top; each leaf remembers its
origin, the file or the override, so that an error about it can say where to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..runtime.errors import ConfigError
from .values import describe

__all__ = ["read_config_file", "read_sources", "origin_of", "dump_yaml"]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML/JSON file: for a job's config, or for files that hold more than one
    job, e.g. a comparison."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    else:
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level, got {describe(data)}")
    return data


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=2e-5")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted option name like optim.lr")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a path with a colon and space): take it as the text it is
    return parts, value


def _merge(target: dict, source: Mapping, origin: str, origins: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``source`` into ``target``, remembering where each leaf came from (for error messages)."""
    for key, value in source.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value, origin, origins, dotted + ".")
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
            for existing in [name for name in origins if name == dotted or name.startswith(dotted + ".")]:
                del origins[existing]
            origins[dotted] = origin


def origin_of(dotted: str, origins: Mapping[str, str], default: str) -> str:
    """Where the value at ``dotted`` came from: its own origin, its section's, or ``default``."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in origins:
            return origins[key]
    # a key under a section set elsewhere (e.g. the section's own origin), or a default value
    for key, origin in origins.items():
        if key.startswith(dotted + "."):
            return origin
    return default


def read_sources(path: str | os.PathLike | None, overrides: Sequence[str]) -> tuple[dict, dict[str, str], str]:
    """The file (if any) with the overrides merged on top, each leaf's origin, and the origin of defaults."""
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = "config"
    if path is not None:
        source = str(path)
        _merge(data, read_config_file(path), source, origins)
    for text in overrides:
        parts, value = _parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        # An override must not silently replace a whole section with a scalar, nor dig into a scalar.
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth + 1])} is not a section")
        _merge(data, nested, f"override {text!r}", origins)
    return data, origins, source


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes lists inline, so that ``pairs: [[0, 1], [2, 5]]`` reads as it is written."""


_Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", items, flow_style=not any(isinstance(item, dict) for item in items)))


def dump_yaml(data: Mapping[str, Any]) -> str:
    """``data`` as YAML, in its own order, that :func:`read_config_file` reads back equal."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
