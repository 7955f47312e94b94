"""`leadkd report`: the Markdown report and its plots from synthetic run folders (no models, no data)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from leadkd.errors import InputError, LeadkdError
from leadkd.report import PLOTS, build_report, load_metrics, markdown_table, parse_markdown_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MODELS = {
    "teacher": {"nDCG@10": 0.6452, "R@100": 0.9312},
    "student_init": {"nDCG@10": 0.4123, "R@100": 0.8011},
    "student_warmup": {"nDCG@10": 0.5904, "R@100": 0.9020},
    "student_lead": {"nDCG@10": 0.6021, "R@100": 0.9105},
}


def per_layer(depth: int, top: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"layer": layer, "nDCG@10": round(top * (0.3 + 0.7 * (layer + 1) / depth) + rng.uniform(-0.01, 0.01), 4)}
            for layer in range(depth)]


def results(**overrides) -> dict:
    data = {
        "dataset": "scifact",
        "splits": {"train": "train-nodev", "dev": "dev", "test": "test"},
        "settings": {"teacher": "all-MiniLM-L12-v2", "student_layers": [0, 2, 4, 6, 8, 10],
                     "steps": {"warmup": 300, "distill": 300}, "batch_size": 8, "lr": 2e-5, "seconds": 812.4},
        "measures": ["nDCG@10", "R@100"],
        "models": MODELS,
        "layers": {"teacher": per_layer(12, 0.64, 0), "student_init": per_layer(6, 0.41, 1),
                   "student_lead": per_layer(6, 0.60, 2)},
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def stage_rows(steps: int, seed: int, lead: bool, eval_every: int = 50) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = [{"step": 0, "eval": {"nDCG@10": 0.40 + 0.01 * seed, "R@100": 0.80}}]
    for step in range(1, steps + 1):
        decay = math.exp(-step / (steps / 3))
        row: dict = {"step": step, "epoch": step // 100, "lr": {"student": 2e-5 * (1 - step / steps)},
                     "seconds": round(step * 0.8, 3)}
        if lead:
            terms = {"student_ce": 0.5 + 2 * decay + rng.uniform(0, 0.4), "teacher_ce": 0.3 + rng.uniform(0, 0.2),
                     "response_kl": 0.05 + 0.4 * decay * rng.uniform(0.5, 1.5),
                     "layer_kl": 0.2 + 1.5 * decay * rng.uniform(0.5, 1.5)}
            student = sorted(rng.sample(range(6), 3))
            teacher = sorted(rng.sample(range(12), 3))
            weights = [rng.uniform(0.1, 1) for _ in range(3)]
            row.update(terms, loss=sum(terms.values()), pairs=[list(p) for p in zip(student, teacher)],
                       layer_weights=[w / sum(weights) for w in weights],
                       layer_pair_kl=[rng.uniform(0, 1) for _ in range(3)])
        else:
            row.update(ce=0.4 + 2.5 * decay + rng.uniform(0, 0.5))
            row["loss"] = row["ce"]
        rows.append(row)
        if step % eval_every == 0:
            rows.append({"step": step, "eval": {"nDCG@10": 0.40 + 0.01 * seed + 0.2 * (1 - decay), "R@100": 0.85}})
    return rows


def write_jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail, encoding="utf-8")


def make_run(root: Path, result: dict | None = None, stages: tuple[str, ...] = ("warmup", "distill")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if result is not None:
        (root / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    for seed, name in enumerate(stages):
        write_jsonl(root / "stages" / name / "metrics.jsonl", stage_rows(300, seed, lead=name == "distill"))
    return root


def section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def assert_png(path: Path, min_side: int = 300) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, str]:
    run = make_run(tmp_path_factory.mktemp("full") / "run", results())
    report = build_report(run)
    return run, report.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the full report


def test_main_table_parses_back_to_the_given_numbers(full_run):
    run, text = full_run
    assert (run / "report.md").is_file()
    rows = parse_markdown_table(section(text, "Test results"))
    assert [row["model"] for row in rows] == list(MODELS)
    for row in rows:
        for measure, value in MODELS[row["model"]].items():
            assert row[measure] == pytest.approx(value, abs=5e-5)
    by_name = {row["model"]: row for row in rows}
    assert by_name["student_warmup"]["Δ nDCG@10"] is None  # the baseline itself
    assert by_name["student_lead"]["Δ nDCG@10"] == pytest.approx(0.6021 - 0.5904, abs=5e-5)
    assert by_name["student_lead"]["Δ R@100"] == pytest.approx(0.9105 - 0.9020, abs=5e-5)
    table = section(text, "Test results")
    assert "**0.6452**" in table and "**0.9312**" in table  # the teacher is best on both
    assert table.count("**") == 2 * 2 + 2  # two bold cells, plus the bold word in the caption
    assert "difference to `student_warmup`" in table


def test_per_layer_table_and_images_are_linked(full_run):
    run, text = full_run
    rows = parse_markdown_table(section(text, "Per-layer quality"))
    assert [row["layer"] for row in rows] == list(range(12))
    given = results()["layers"]
    for name in ("teacher", "student_init", "student_lead"):
        values = [row[name] for row in rows if row[name] is not None]
        assert values == pytest.approx([entry["nDCG@10"] for entry in given[name]], abs=5e-5)
    assert all(row["student_lead"] is None for row in rows[6:])  # the student has 6 layers
    for name in PLOTS.values():
        assert f"]({name})" in text
        assert_png(run / name)


def test_what_happened_states_the_deltas(full_run):
    _, text = full_run
    facts = section(text, "What happened")
    assert "LEAD changed test nDCG@10 by +0.0117 (0.5904 → 0.6021)" in facts
    assert "over the warmed-up student" in facts
    assert "The teacher scores 0.6452 test nDCG@10; the LEAD student reaches 93.3% of that." in facts
    assert "the best single layer of `teacher`, `student_init`, `student_lead` is each one's final layer" in facts
    assert "Stage `warmup`: 300 logged training rows up to step 300 in 240 s" in facts
    assert "dev nDCG@10 0.4000 (step 0) → 0.5900 (step 300)" in facts
    assert "distinct (student, teacher) layer pairs; the most frequent" in facts
    assert "Dataset: scifact" in text and "train = `train-nodev`" in text
    settings = parse_markdown_table(section(text, "Run"))
    assert {"setting": "steps.distill", "value": 300} in settings
    assert {"setting": "student_layers", "value": "0, 2, 4, 6, 8, 10"} in settings


def test_rebuilding_is_idempotent_and_leaves_backend_and_folder_clean(full_run):
    import matplotlib

    run, text = full_run
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # read without resolving it
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    build_report(run)
    after = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    assert after == before
    assert (run / "report.md").read_text(encoding="utf-8") == text
    assert not [path for path in run.iterdir() if path.name.startswith(".")]  # no temporary files left
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend


# --------------------------------------------------------------------------- missing data


def test_missing_sections_become_one_line_notes(tmp_path):
    data = results(layers=None, settings=None)
    data["models"] = {name: MODELS[name] for name in ("teacher", "student_init", "student_lead")}
    run = make_run(tmp_path / "run", data, stages=("warmup",))
    (run / "per_layer.png").write_bytes(b"stale")  # from an earlier build: must not survive
    text = build_report(run).read_text(encoding="utf-8")
    assert "No per-layer results: `results.json` has no `layers`." in text
    assert "No settings recorded in `results.json`." in text
    assert "No distill logs (`stages/distill/metrics.jsonl` not found)." in text
    assert "No layer-selection data: no distill stage logs." in text
    assert not (run / "per_layer.png").exists() and not (run / "layer_weights.png").exists()
    assert_png(run / "training_curves.png")
    assert "](per_layer.png)" not in text and "](layer_weights.png)" not in text
    rows = {row["model"]: row for row in parse_markdown_table(section(text, "Test results"))}
    # no warm-up model: the delta is measured against the initial student
    assert rows["student_lead"]["Δ nDCG@10"] == pytest.approx(0.6021 - 0.4123, abs=5e-5)
    assert "over the initial student" in text


def test_a_folder_with_only_results_and_no_logs(tmp_path):
    data = results(measures=None)
    data["models"] = {"teacher": {"nDCG@10": 0.6452, "R@100": None}, "student_warmup": {"nDCG@10": 0.59},
                      "student_lead": {"nDCG@10": 0.6021, "R@100": 0.9105, "MRR@10": "n/a"}}
    data["layers"] = {"teacher": [0.2, 0.4, 0.6], "student_lead": [{"layer": 1, "nDCG@10": 0.5},
                                                                   {"layer": 0, "nDCG@10": 0.3}]}
    run = make_run(tmp_path / "run", data, stages=())
    text = build_report(run).read_text(encoding="utf-8")
    assert "No training logs: `stages/` not found." in text
    assert "No layer-selection data" in text
    assert_png(run / "per_layer.png")
    assert not (run / "training_curves.png").exists()
    # measures come from the models when results.json does not list them; unusable values are blanks
    rows = {row["model"]: row for row in parse_markdown_table(section(text, "Test results"))}
    assert list(rows["teacher"]) == ["model", "nDCG@10", "R@100", "MRR@10", "Δ nDCG@10", "Δ R@100", "Δ MRR@10"]
    assert rows["teacher"]["R@100"] is None and rows["student_lead"]["MRR@10"] is None
    assert rows["student_lead"]["Δ nDCG@10"] == pytest.approx(0.0121, abs=5e-5)
    assert rows["student_lead"]["Δ R@100"] is None
    layers = parse_markdown_table(section(text, "Per-layer quality"))
    assert layers == [{"layer": 0, "teacher": 0.2, "student_lead": 0.3},
                      {"layer": 1, "teacher": 0.4, "student_lead": 0.5},
                      {"layer": 2, "teacher": 0.6, "student_lead": None}]
    assert "LEAD changed test nDCG@10 by +0.0121 (0.5900 → 0.6021) over the warmed-up student." in text


def test_a_folder_with_only_logs_one_truncated_one_broken(tmp_path):
    run = make_run(tmp_path / "run", None, stages=("distill",))
    with open(run / "stages" / "distill" / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 301, "loss": 0.9, "layer_weig')  # cut by a crash
    write_jsonl(run / "stages" / "warmup" / "metrics.jsonl", [{"step": 1, "loss": 1.0}], tail="oops\n{}\n")
    (run / "stages" / "mine").mkdir()
    text = build_report(run).read_text(encoding="utf-8")
    for line in ("No test metrics: `results.json` not found.", "No per-layer results: `results.json` not found.",
                 "Stage `warmup` skipped: stages/warmup/metrics.jsonl:2: not valid JSON",
                 "Stage `mine`: no `metrics.jsonl`.",
                 "Stage `distill`: 300 logged training rows up to step 300"):
        assert line in text
    assert "No warmup logs" not in text  # its folder is there; the line above says what is wrong with it
    assert_png(run / "training_curves.png")
    assert_png(run / "layer_weights.png")
    assert not (run / "per_layer.png").exists()
    assert "LEAD changed" not in text


def test_an_empty_folder_still_gets_a_report(tmp_path):
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert "Nothing to summarise" in text
    assert not list(tmp_path.glob("*.png"))


def test_distill_without_the_layer_loss(tmp_path):
    run = make_run(tmp_path / "run", None, stages=("distill",))
    log = run / "stages" / "distill" / "metrics.jsonl"
    rows = [{k: v for k, v in row.items() if k not in ("pairs", "layer_weights", "layer_pair_kl", "layer_kl")}
            for row in load_metrics(log)]
    write_jsonl(log, rows)
    text = build_report(run).read_text(encoding="utf-8")
    assert "No layer-selection data: the distill logs have no `pairs` (the LEAD layer loss was off)." in text


def test_bad_inputs(tmp_path):
    with pytest.raises(LeadkdError, match="no such run folder"):
        build_report(tmp_path / "nope")
    (tmp_path / "results.json").write_text('{"models": ', encoding="utf-8")
    with pytest.raises(InputError, match="results.json:1: not valid JSON"):
        build_report(tmp_path)


# --------------------------------------------------------------------------- metrics.jsonl


def test_a_truncated_last_line_is_dropped(tmp_path):
    rows = stage_rows(40, 0, lead=True)
    log = tmp_path / "m.jsonl"
    write_jsonl(log, rows, tail='{"step": 41, "loss": 1.2, "pai')
    assert load_metrics(log) == rows
    write_jsonl(log, rows, tail='{"step": 41, "loss": 1.2, "pai\n\n')  # blank lines after it change nothing
    assert load_metrics(log) == rows


def test_a_bad_line_in_the_middle_is_an_error_with_its_line(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n{"step": 2, "lo\n{"step": 3, "loss": 1}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"m.jsonl:2: not valid JSON"):
        load_metrics(log)
    log.write_text('{"step": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"m.jsonl:2: expected a JSON object"):
        load_metrics(log)
    with pytest.raises(InputError, match="no such file"):
        load_metrics(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- tables


def test_markdown_table_round_trip_and_bold_rules():
    rows = [{"name": "a|b", "x": 0.5, "y": 3, "z": None}, {"name": "c", "x": 0.70001, "y": 7, "z": 1.0},
            {"name": "d", "x": 0.7, "y": 7}]
    text = markdown_table(rows, ["name", "x", "y", "z"])
    lines = text.splitlines()
    assert lines[1] == "|---|---:|---:|---:|"
    assert "a\\|b" in text
    assert "| **0.7000** | **7** |" in lines[3] and "| **0.7000** | **7** |" in lines[4]  # ties, as displayed
    assert "**1.0000**" not in text  # one number in a column is nothing to compare
    parsed = parse_markdown_table(text)
    assert parsed == [{"name": "a|b", "x": 0.5, "y": 3, "z": None}, {"name": "c", "x": 0.7, "y": 7, "z": 1.0},
                      {"name": "d", "x": 0.7, "y": 7, "z": None}]
    assert "**" not in markdown_table(rows, ["name", "x", "y"], bold_best=False)
    only_y = markdown_table(rows, ["name", "x", "y"], bold_best=["y"])
    assert "**7**" in only_y and "**0.7000**" not in only_y
    assert markdown_table(rows, ["x"], digits=2, headers={"x": "X"}).startswith("| X |\n|---:|\n| 0.50 |")


def test_parse_markdown_table_picks_a_table_and_reads_signs():
    text = "intro\n\n| a | b |\n|:--|--:|\n| x | +0.0120 |\n| y | −0.5 |\n\nmore\n\n| c |\n|---|\n| 1 |\n"
    assert parse_markdown_table(text) == [{"a": "x", "b": 0.012}, {"a": "y", "b": -0.5}]
    assert parse_markdown_table(text, index=1) == [{"c": 1}]
    with pytest.raises(ValueError, match="no Markdown table number 2"):
        parse_markdown_table(text, index=2)


def test_a_stage_and_the_model_it_produced_share_a_colour_in_every_plot():
    from leadkd.report import _named_colors

    stages = _named_colors(["warmup", "distill", "response_kd", "custom_stage"])
    models = _named_colors(["student_init", "student_warmup", "student_response_kd", "student_lead", "other"])
    assert stages["distill"] == models["student_lead"] and stages["response_kd"] == models["student_response_kd"]
    assert stages["warmup"] == models["student_warmup"]
    assert len(set(stages.values())) == 4 and stages["custom_stage"] not in set(models.values()) - {models["other"]}
