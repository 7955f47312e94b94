"""Model cards: every folder a run saves says where it came from, what trained it and what it scored."""

from __future__ import annotations

import json

import pytest
import yaml

from leadkd.distill.trainer import run_job
from leadkd.models.model_card import add_figures, figures_table
from test_trainer import distill_config, setup  # noqa: F401  (the tiny teacher, data and groups)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_distill_run_writes_cards_with_its_own_figures(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run_job(distill_config(setup, out, **{"eval.split": "dev", "eval.every": 2}), log=lambda m: None)
    evals = {row["step"]: row["eval"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval" in row}
    best_step = max(evals, key=lambda step: (evals[step]["nDCG@10"], -step))
    for folder, step in (("best", best_step), ("final", 4)):
        card = (out / folder / "README.md").read_text()
        meta = front_matter(card)
        assert meta["library_name"] == "sentence-transformers" and "leadkd" in meta["tags"]
        assert "base_model" not in meta  # a local, absolute teacher path is no hub name
        assert f"{setup['teacher']}, blocks [0, 2]" in card and "trained jointly" in card
        assert "K = 2, re-drawn every 1 steps" in card and "- steps: 4" in card
        row = next(line for line in card.splitlines() if line.startswith(f"| dev (step {step}) |"))
        assert f"{evals[step]['nDCG@10']:.4f}" in row
        assert "SentenceTransformer(" in card
    assert "No figures measured yet." in (out / "final-teacher" / "README.md").read_text()


def test_figures_join_the_table_and_nothing_else_moves(tmp_path):
    card = tmp_path / "README.md"
    table = "\n".join(figures_table({"dev (step 4)": {"nDCG@10": 0.5, "R@100": 0.9}}))
    card.write_text(f"# m\n\n<!-- leadkd: figures -->\n{table}\n<!-- leadkd: end of figures -->\n\n## Loading\nx\n")
    assert add_figures(tmp_path, "test", {"nDCG@10": 0.61234, "R@100": 0.95})
    assert add_figures(tmp_path, "test", {"nDCG@10": 0.7})  # a label again: its row is replaced
    text = card.read_text()
    assert text.startswith("# m\n") and text.endswith("## Loading\nx\n")
    assert "| dev (step 4) | 0.5000 | 0.9000 |" in text and "| test | 0.7000 |  |" in text
    assert text.count("| test |") == 1


@pytest.mark.parametrize("content", [None, "# my own notes\n"])
def test_a_folder_without_a_leadkd_card_is_left_alone(tmp_path, content):
    if content is not None:
        (tmp_path / "README.md").write_text(content)
    assert not add_figures(tmp_path, "test", {"nDCG@10": 0.5})
    assert (tmp_path / "README.md").read_text() == content if content else not (tmp_path / "README.md").exists()
