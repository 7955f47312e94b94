"""How a layer strategy is written: its names and the explicit map's pairs, read once for the config and the
trainer's schedule alike.

Today's spelling is a name plus, for ``map``, a list of ``[student, teacher]`` pairs::

    layers: {strategy: map, pairs: [[0, 1], [2, 5]]}

The old spelling put the map in the name, ``strategy: "0:1,2:5"``; saved runs (``config.yaml``, the layer
schedule in ``state.pt``) and comparison ledgers hold it, so it still reads, as ``map`` with those pairs.
Whether the layers exist is checked against the models' depths once they are loaded, not here.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, cast

Pair = tuple[int, int]

#: Every strategy name; ``map`` is the only one that takes ``pairs``.
STRATEGIES: tuple[str, ...] = ("random", "last", "skip", "paper_last", "paper_skip", "map")

__all__ = ["STRATEGIES", "Pair", "StrategyError", "resolve_strategy", "parse_layer_map"]

_OLD_ENTRY = re.compile(r"(\d+)\s*:\s*(\d+)")
_PAIRS_EXAMPLE = "[[0, 1], [2, 5]]"


class StrategyError(ValueError):
    """A wrong strategy or map; ``key`` is the setting at fault (``strategy`` or ``pairs``)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def resolve_strategy(strategy: Any, pairs: Any = None) -> tuple[str, tuple[Pair, ...] | None]:
    """``(name, pairs)`` in today's spelling from either spelling; ``pairs`` is None unless the name is ``map``.

    Names are case-insensitive; pairs come back sorted by student layer.
    """
    if _is_old_map(strategy):
        if pairs is not None:
            raise StrategyError("pairs", f"set beside the old-style map {strategy!r} in layers.strategy; "
                                         "keep one of the two (strategy: map with pairs is today's spelling)")
        return "map", parse_layer_map(strategy)
    name = strategy.strip().lower() if isinstance(strategy, str) else strategy
    if name not in STRATEGIES:
        close = difflib.get_close_matches(str(name), STRATEGIES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StrategyError("strategy", f"expected one of {', '.join(STRATEGIES)}, got {strategy!r}{hint}")
    if name == "map":
        if pairs is None:
            raise StrategyError("pairs", f"strategy 'map' needs its [student, teacher] pairs, e.g. {_PAIRS_EXAMPLE}")
        return name, _checked(_as_pairs(pairs), "pairs", pairs)
    if pairs is not None:
        raise StrategyError("pairs", f"only strategy 'map' takes pairs; set layers.pairs to null for {name!r}")
    return name, None


def parse_layer_map(text: str | int) -> tuple[Pair, ...]:
    """The old spelling ``"0:1,2:5"`` (``student:teacher``, comma-separated) as sorted pairs.

    An int is how YAML 1.1 reads one unquoted pair such as ``5:11``: the base-60 number 311 (5 x 60 + 11),
    which as a strategy can mean nothing else, so it is read back as that pair.
    """
    if isinstance(text, int) and not isinstance(text, bool) and 60 <= text < 3600:
        return _checked([divmod(text, 60)], "strategy", text)
    entries = [_OLD_ENTRY.fullmatch(entry.strip()) for entry in str(text).split(",")]
    if not isinstance(text, str) or not all(entries):
        raise StrategyError("strategy", f"expected one of {', '.join(STRATEGIES)}, or old-style student:teacher "
                                        f"pairs like '0:1,1:3,2:5', got {text!r}")
    matches = cast("list[re.Match[str]]", entries)  # all(entries) above: every entry matched
    return _checked([(int(match.group(1)), int(match.group(2))) for match in matches], "strategy", text)


def _is_old_map(strategy: Any) -> bool:
    """A number, or text with digits, colons or commas that is not a name: meant as an old-style map."""
    if isinstance(strategy, bool):
        return False
    if isinstance(strategy, int):
        return True
    return (isinstance(strategy, str) and strategy.strip().lower() not in STRATEGIES
            and re.search(r"[\d:,]", strategy) is not None)


def _as_pairs(items: Any) -> list[Pair]:
    """``[[student, teacher], ...]`` of non-negative layer numbers as tuples; anything else is an error."""
    def is_layer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if (not isinstance(items, (list, tuple)) or not items
            or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(is_layer, pair))
                       for pair in items)):
        raise StrategyError("pairs", f"expected [student, teacher] pairs of layer numbers (>= 0) like "
                                     f"{_PAIRS_EXAMPLE}, got {items!r}")
    return [(pair[0], pair[1]) for pair in items]


def _checked(pairs: list[Pair], key: str, written: Any) -> tuple[Pair, ...]:
    """``pairs`` sorted by student layer, once no layer is used twice on either side."""
    for side, index in (("student", 0), ("teacher", 1)):
        layers = [pair[index] for pair in pairs]
        repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
        if repeated:
            raise StrategyError(key, f"{written!r} uses a {side} layer twice (layer {repeated[0]})")
    return tuple(sorted(pairs))
