"""A README.md model card for every model a run saves, in sentence-transformers' style.

A folder on its own says nothing about where it came from; the card says it in the place the Hugging
Face hub and every reader look first: the base model and the teacher, the settings that trained it, the
figures its run measured and how to load it. The YAML front matter uses the hub's keys (``base_model``,
``library_name``, ``pipeline_tag``, ``tags``) so an uploaded folder is indexed as sentence-transformers
indexes its own. Figures measured later (the test split scored by the quickstart or ``leadkd compare``)
join the card's table with :func:`add_figures`; the table sits between two markers so that nothing else
in the card moves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..runtime.fileio import atomic_write

CARD = "README.md"
FIGURES_START = "<!-- leadkd: figures -->"
FIGURES_END = "<!-- leadkd: end of figures -->"


def _model_facts(model) -> dict[str, Any]:
    facts = {"kind": getattr(model, "kind", type(model).__name__), "layers": getattr(model, "num_layers", None)}
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "config"):
        facts["hidden size"] = backbone.config.hidden_size
        facts["architecture"] = type(backbone).__name__
    for name in ("pooling", "normalize", "similarity_scale", "max_query_length", "max_passage_length"):
        value = getattr(model, name, None)
        if value is not None:
            facts[name.replace("_", " ")] = value
    return facts


def _origin(config) -> tuple[str | None, list[tuple[str, Any]]]:
    """The base model (hub key) and the lines that say where the weights came from and what taught them."""
    teacher = getattr(config, "teacher", None)
    if teacher is None:  # a `leadkd train` job: one model on ground truth
        return config.model.path, [("base model", config.model.path), ("trained on", "ground truth (leadkd train)")]
    student = config.student
    cut = student.init_teacher_layers
    base = teacher.path if cut is not None else student.path
    lines = [("base model", f"{teacher.path}, blocks {list(cut)} (the student cut from its teacher)" if cut is not None
              else student.path),
             ("teacher", f"{teacher.path} ({teacher.kind}, "
                         + ("trained jointly" if teacher.train else "frozen") + ")")]
    if teacher.scores:  # no teacher ran: its scores were read from a file (`leadkd score-teacher`)
        scored_by = _scored_by(teacher.scores) or teacher.path or "unnamed"
        lines[-1] = ("teacher", f"{scored_by}, frozen, its scores read from {teacher.scores}")
    return base, lines


def _scored_by(scores: str) -> str | None:
    """The teacher a score folder names (its ``meta.json``), as ``path (kind)``; None for a published file."""
    import json
    from pathlib import Path

    meta = Path(scores) / "meta.json"
    if not meta.is_file():
        return None
    teacher = json.loads(meta.read_text(encoding="utf-8")).get("teacher", {})
    return f"{teacher.get('path')} ({teacher.get('kind')})"


def _settings(config) -> list[tuple[str, Any]]:
    optim, loss, data = config.optim, config.loss, config.data
    lines = [("training groups", data.train_groups), ("corpus", data.corpus),
             ("steps", optim.steps), ("batch size", optim.batch_size * optim.grad_accum),
             ("negatives per query", data.num_negatives), ("learning rate", optim.lr), ("seed", config.seed)]
    if hasattr(config, "layers"):
        layered = loss.layer != "none"
        lines += [("objective", f"response {loss.response} (weight {loss.response_weight}, temperature "
                                f"{loss.temperature}) + layer {loss.layer}"
                                + (f" (weight {loss.layer_weight}, temperature {loss.layer_temperature}, "
                                   f"re-weighting {'on' if loss.reweight else 'off'})" if layered else "")),
                  *([("layer pairs", (f"{config.layers.strategy}, K = {config.layers.k}, re-drawn every "
                                      f"{config.layers.resample_every} steps"))] if layered else [])]
    return lines


def figures_table(figures: Mapping[str, Mapping[str, float]]) -> list[str]:
    """``{label: {measure: value}}`` as a Markdown table, measures in their first-seen order."""
    measures = list(dict.fromkeys(m for values in figures.values() for m in values))
    if not figures:
        return ["No figures measured yet."]
    lines = ["| evaluated on | " + " | ".join(measures) + " |", "|---|" + "---:|" * len(measures)]
    for label, values in figures.items():
        lines.append(f"| {label} | " + " | ".join(f"{values[m]:.4f}" if m in values else "" for m in measures) + " |")
    return lines


def model_card(config, model, figures: Mapping[str, Mapping[str, float]], what: str) -> str:
    """The card's text: ``what`` names this folder (e.g. "the checkpoint best on dev, step 150")."""
    base, origin = _origin(config)
    kind = getattr(model, "kind", "dual_encoder")
    dense = kind == "dual_encoder"
    tags = ["leadkd", "knowledge-distillation" if hasattr(config, "teacher") else "retrieval", kind.replace("_", "-")]
    if dense:
        tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", *tags]
    front = ["---", *([f"base_model: {base}"] if base and not os.path.isabs(base) else []),
             f"library_name: {'sentence-transformers' if dense else 'leadkd'}",
             *(["pipeline_tag: sentence-similarity"] if dense else []), "tags:", *[f"- {tag}" for tag in tags], "---"]
    title = ("LEAD-distilled dual encoder" if hasattr(config, "teacher")
             else f"{kind.replace('_', ' ')} trained with leadkd")
    load = ["```python", "from leadkd.models import load_model", "", 'model = load_model("path/to/this/folder")', "```"]
    if dense:
        load = ["```python", "from sentence_transformers import SentenceTransformer", "",
                'model = SentenceTransformer("path/to/this/folder")',
                'embeddings = model.encode(["a query", "a passage"])', "```", "", "or, with leadkd:", "", *load]
    lines = [*front, "", f"# {title}", "",
             (f"This folder is {what}, saved by [leadkd](https://arxiv.org/abs/2212.05225) "
              "(LEAD: liberal feature-based distillation for dense retrieval)."), "", "## Model", "",
             *[f"- {key}: {value}" for key, value in [*origin, *_model_facts(model).items()] if value is not None],
             "", "## Training", "", *[f"- {key}: {value}" for key, value in _settings(config) if value is not None],
             "", "The run's whole configuration is `config.yaml` in its output folder.", "", "## Figures", "",
             FIGURES_START, *figures_table(figures), FIGURES_END, "", "## Loading", "", *load, ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, config, model, figures: Mapping[str, Mapping[str, float]],
                     what: str) -> Path:
    path = Path(folder) / CARD
    with atomic_write(path) as handle:
        handle.write(model_card(config, model, figures, what))
    return path


def _read_figures(lines: list[str]) -> dict[str, dict[str, float]]:
    """The table :func:`figures_table` wrote, read back."""
    rows = [line.strip().strip("|").split("|") for line in lines if line.startswith("|")]
    if len(rows) < 2:
        return {}
    measures = [cell.strip() for cell in rows[0][1:]]
    # Not strict: a card is a file people edit, and a row may have fewer or more cells than the header.
    return {cells[0].strip(): {m: float(v) for m, v in zip(measures, (c.strip() for c in cells[1:]), strict=False)
                               if v}
            for cells in rows[2:]}


def add_figures(folder: str | os.PathLike, label: str, values: Mapping[str, float]) -> bool:
    """Put ``values`` (e.g. the test split's measures) into the card's table under ``label``; False where the
    folder has no leadkd card (a user's own README is never rewritten)."""
    path = Path(folder) / CARD
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    if FIGURES_START not in text or FIGURES_END not in text:
        return False
    before, rest = text.split(FIGURES_START, 1)
    table, after = rest.split(FIGURES_END, 1)
    figures = _read_figures(table.strip().splitlines())
    figures[label] = {name: float(value) for name, value in values.items()}
    with atomic_write(path) as handle:
        handle.write(before + FIGURES_START + "\n" + "\n".join(figures_table(figures)) + "\n" + FIGURES_END + after)
    return True
