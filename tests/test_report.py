"""`leadkd report`: the Markdown report and its plots from synthetic run folders (no models, no data)."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from leadkd.reporting.report import PLOTS, build_report, markdown_table
from leadkd.reporting.results import Model, RunResults, Stage, read_results, write_results
from leadkd.reporting.stage_logs import load_metrics
from leadkd.runtime.errors import InputError, LeadkdError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MODELS = {
    "teacher": {"nDCG@10": 0.6452, "R@100": 0.9312},
    "student_init": {"nDCG@10": 0.4123, "R@100": 0.8011},
    "student_warmup": {"nDCG@10": 0.5904, "R@100": 0.9020},
    "student_lead": {"nDCG@10": 0.6021, "R@100": 0.9105},
}
ROLES = {"teacher": ("teacher", "the teacher"), "student_init": ("student", "the initial student"),
         "student_warmup": ("student", "the warmed-up student"), "student_lead": ("lead", "the LEAD student")}
STAGES = (Stage("warmup", "warmup", "stages/warmup", 300, "student_init", "student_warmup"),
          Stage("distill", "distill", "stages/distill", 300, "student_warmup", "student_lead"))


def per_layer(depth: int, top: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(top * (0.3 + 0.7 * (layer + 1) / depth) + rng.uniform(-0.01, 0.01), 4) for layer in range(depth)]


LAYERS = {"teacher": per_layer(12, 0.64, 0), "student_init": per_layer(6, 0.41, 1),
          "student_lead": per_layer(6, 0.60, 2)}


def results(models: dict = MODELS, layers: dict = LAYERS, stages: tuple = STAGES, **changes) -> RunResults:
    """A quickstart-like run's results, built as the quickstart builds them."""
    made = tuple(Model(name, *ROLES[name], metrics={"test": scores},
                       layers={"nDCG@10": layers[name]} if name in layers else {}) for name, scores in models.items())
    base = RunResults("scifact", {"train": "train-nodev", "dev": "dev", "test": "test"}, ("nDCG@10", "R@100"), made,
                      stages, settings={"teacher": "all-MiniLM-L12-v2", "student_layers": [0, 2, 4, 6, 8, 10],
                                        "steps": {"warmup": 300, "distill": 300}, "batch_size": 8, "lr": 2e-5,
                                        "seconds": 812.4})
    return replace(base, **changes)


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
            row.update(terms, loss=sum(terms.values()), pairs=[list(p) for p in zip(student, teacher, strict=True)],
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


def make_run(root: Path, result: RunResults | None = None, stages: tuple[str, ...] = ("warmup", "distill")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if result is not None:
        write_results(root / "results.json", result)
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


def table_lines(text: str) -> list[str]:
    """The lines of the first table in ``text`` (header, separator, rows)."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))


def test_the_test_table_shows_the_results_numbers_with_deltas_and_bold_best(full_run):
    run, text = full_run
    table = section(text, "Test results")
    lines = table_lines(table)
    assert lines[:2] == ["| model | nDCG@10 | R@100 | Δ nDCG@10 | Δ R@100 |", "|---|---:|---:|---:|---:|"]
    written = read_results(run / "results.json")
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [model.name for model in written.models]
    assert lines[2:] == ["| teacher | **0.6452** | **0.9312** | +0.0548 | +0.0292 |",
                         "| student_init | 0.4123 | 0.8011 | -0.1781 | -0.1009 |",
                         "| student_warmup | 0.5904 | 0.9020 | — | — |",  # the baseline itself
                         "| student_lead | 0.6021 | 0.9105 | +0.0117 | +0.0085 |"]
    assert table.count("**") == 2 * 2 + 2  # two bold cells, plus the bold word in the caption
    assert "Metrics on the test split (`test`)" in table and "difference to `student_warmup`" in table


def test_per_layer_table_and_images_are_linked(full_run):
    run, text = full_run
    lines = table_lines(section(text, "Per-layer quality"))
    assert lines[0] == "| layer | teacher | student_init | student_lead |"
    rows = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert [int(row[0]) for row in rows] == list(range(12))
    for column, name in enumerate(("teacher", "student_init", "student_lead"), start=1):
        shown = [float(row[column].strip("*")) for row in rows if row[column] != "—"]
        assert shown == pytest.approx(LAYERS[name], abs=5e-5)
        best = max(range(len(LAYERS[name])), key=lambda layer: LAYERS[name][layer])
        assert rows[best][column].startswith("**")  # each model's best layer in bold
    assert all(row[3] == "—" for row in rows[6:])  # the student has 6 layers
    for name in PLOTS.values():
        assert f"]({name})" in text
        assert_png(run / name)


def test_what_happened_states_the_deltas(full_run):
    _, text = full_run
    facts = section(text, "What happened")
    assert "LEAD changed test nDCG@10 by +0.0117 (0.5904 → 0.6021)" in facts
    assert "over the warmed-up student" in facts
    assert "Warm-up took the student's test nDCG@10 from 0.4123 to 0.5904 (+0.1781)." in facts
    assert "The teacher scores 0.6452 test nDCG@10; the LEAD student reaches 93.3% of that." in facts
    assert "the best single layer of `teacher`, `student_init`, `student_lead` is each one's final layer" in facts
    assert "Stage `warmup`: 300 logged training rows up to step 300 in 240 s" in facts
    assert "dev nDCG@10 0.4000 (step 0) → 0.5900 (step 300)" in facts
    assert "distinct (student, teacher) layer pairs; the most frequent" in facts
    assert "Dataset: scifact" in text and "train = `train-nodev`" in text
    settings = table_lines(section(text, "Run"))
    assert "| steps.distill | 300 |" in settings
    assert "| student_layers | 0, 2, 4, 6, 8, 10 |" in settings
    assert "- Training stages: `warmup` (300 steps), `distill` (300 steps)" in text


def test_stages_are_laid_out_as_results_json_says(tmp_path):
    """Arms that start from the same model lie side by side, after the stage that made it, in the declared
    order (here not the folders' name order)."""
    from leadkd.reporting.stage_logs import read_stage_logs

    arms = STAGES + (Stage("response_kd", "distill", "stages/response_kd", 300, "student_warmup", None),)
    run = make_run(tmp_path / "run", None, stages=("warmup", "response_kd", "distill", "zzz_extra"))
    logs, notes = read_stage_logs(run, arms)
    assert [(log.name, log.offset) for log in logs] == [("warmup", 0), ("distill", 300), ("response_kd", 300),
                                                        ("zzz_extra", 600)]
    assert notes == []
    logs, _ = read_stage_logs(run)  # nothing declared: every folder by name, one after another
    assert [(log.name, log.offset) for log in logs] == [("distill", 0), ("response_kd", 300), ("warmup", 600),
                                                        ("zzz_extra", 900)]


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
    models = {name: MODELS[name] for name in ("teacher", "student_init", "student_lead")}
    # no warm-up model: LEAD's stage starts from the initial student, its delta is measured against that
    data = results(models, layers={}, stages=(Stage("distill", "distill", "stages/distill", 300, "student_init",
                                                    "student_lead"),), settings={})
    run = make_run(tmp_path / "run", data, stages=("warmup",))
    (run / "per_layer.png").write_bytes(b"stale")  # from an earlier build: must not survive
    text = build_report(run).read_text(encoding="utf-8")
    assert "No per-layer results: `results.json` has no `layers`." in text
    assert "No settings recorded in `results.json`." in text
    assert "No distill logs (`stages/distill/metrics.jsonl` not found)." in text
    assert "No layer-selection data: no distill stage logs." in text
    assert not (run / "per_layer.png").exists() and not (run / "layer_weights.png").exists()
    assert_png(run / "training_curves.png")  # the warm-up log on disk, though results.json does not list it
    assert "](per_layer.png)" not in text and "](layer_weights.png)" not in text
    assert "| student_lead | 0.6021 | 0.9105 | +0.1898 | +0.1094 |" in table_lines(section(text, "Test results"))
    assert "difference to `student_init`" in text and "over the initial student" in text


def test_a_folder_with_only_results_and_no_logs(tmp_path):
    models = {"teacher": {"nDCG@10": 0.6452, "R@100": None}, "student_warmup": {"nDCG@10": 0.59},
              "student_lead": {"nDCG@10": 0.6021, "R@100": 0.9105}}
    data = results(models, layers={"teacher": [0.2, 0.4, 0.6], "student_lead": [0.3, 0.5]}, stages=STAGES[1:])
    run = make_run(tmp_path / "run", data, stages=())
    text = build_report(run).read_text(encoding="utf-8")
    assert "No training logs: `stages/` not found." in text
    assert "No layer-selection data" in text
    assert_png(run / "per_layer.png")
    assert not (run / "training_curves.png").exists()
    # a value that is null or not there is a blank; one number in a column is nothing to bold
    assert table_lines(section(text, "Test results"))[2:] == [
        "| teacher | **0.6452** | — | +0.0552 | — |",
        "| student_warmup | 0.5900 | — | — | — |",
        "| student_lead | 0.6021 | 0.9105 | +0.0121 | — |"]
    assert table_lines(section(text, "Per-layer quality")) == [
        "| layer | teacher | student_lead |", "|---:|---:|---:|",
        "| 0 | 0.2000 | 0.3000 |", "| 1 | 0.4000 | **0.5000** |", "| 2 | **0.6000** | — |"]
    assert "LEAD changed test nDCG@10 by +0.0121 (0.5900 → 0.6021) over the warmed-up student." in text


def test_a_run_still_training_lists_its_stages_before_any_score(tmp_path):
    """The quickstart writes results.json before it trains: a report built meanwhile knows the stages."""
    unscored = results()
    unscored = replace(unscored, models=tuple(replace(model, metrics={}, layers={}) for model in unscored.models))
    run = make_run(tmp_path / "run", unscored, stages=("warmup",))
    text = build_report(run).read_text(encoding="utf-8")
    assert "No test metrics: no model in `results.json` has been scored on the test split." in text
    assert "No distill logs (`stages/distill/metrics.jsonl` not found)." in text
    assert "Stage `warmup`: 300 logged training rows" in text and "LEAD changed" not in text


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
    data = results().to_dict()
    data["models"][1]["metrics"]["test"]["nDCG@10"] = "n/a"
    (tmp_path / "results.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputError, match=r"results.json: field 'models\[1\].metrics.test.nDCG@10': expected a "
                                         r"number or null, got 'n/a'$"):
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


def test_markdown_table_bold_rules_alignment_and_escapes():
    rows = [{"name": "a|b", "x": 0.5, "y": 3, "z": None}, {"name": "c", "x": 0.70001, "y": 7, "z": 1.0},
            {"name": "d", "x": 0.7, "y": 7}]
    text = markdown_table(rows, ["name", "x", "y", "z"])
    assert text.splitlines() == ["| name | x | y | z |", "|---|---:|---:|---:|",
                                 "| a\\|b | 0.5000 | 3 | — |",
                                 "| c | **0.7000** | **7** | 1.0000 |",  # ties all bold, as displayed
                                 "| d | **0.7000** | **7** | — |"]  # one number in a column: nothing to bold
    assert "**" not in markdown_table(rows, ["name", "x", "y"], bold_best=False)
    only_y = markdown_table(rows, ["name", "x", "y"], bold_best=["y"])
    assert "**7**" in only_y and "**0.7000**" not in only_y
    assert markdown_table(rows, ["x"], digits=2, headers={"x": "X"}).startswith("| X |\n|---:|\n| 0.50 |")
    signed = markdown_table([{"a": "x", "b": "+0.0120"}, {"a": "y", "b": "−0.5"}, {"a": "z", "b": "n/a"}], ["a", "b"])
    assert signed.splitlines()[1] == "|---|---|"  # a column with a word in it is text
    assert markdown_table([{"b": "+0.0120"}, {"b": "−0.5"}, {"b": None}], ["b"]).splitlines()[1] == "|---:|"


def test_a_stage_and_the_model_it_produced_share_a_colour_in_every_plot():
    from leadkd.reporting.plots import UNTRAINED, run_colors

    stages = ["warmup", "distill", "response_kd", "custom_stage"]
    made_by = {"student_init": None, "student_warmup": "warmup", "student_response_kd": "response_kd",
               "student_lead": "distill", "other": None}
    colors = run_colors(stages, made_by)
    assert colors["distill"] == colors["student_lead"] and colors["response_kd"] == colors["student_response_kd"]
    assert colors["warmup"] == colors["student_warmup"]
    assert len({colors[name] for name in stages}) == 4
    assert colors["student_init"] == UNTRAINED  # no stage made it: the untrained start is gray
    assert colors["other"] not in {colors[name] for name in stages} | {UNTRAINED}
    assert colors["custom_stage"] not in {colors[name] for name in made_by if made_by[name] != "custom_stage"}
