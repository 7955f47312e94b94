"""leadkd.reporting.results: the typed results object, its round trip through results.json, and one-line errors."""

from __future__ import annotations

import json

import pytest

from leadkd.reporting.results import (
    SCHEMA,
    Model,
    PairedComparison,
    RunResults,
    Stage,
    read_json_object,
    read_results,
    write_results,
)
from leadkd.runtime.errors import InputError


def quickstart_like() -> RunResults:
    models = (Model("teacher", "teacher", "the teacher", {"test": {"nDCG@10": 0.65, "R@100": 0.93}},
                    {"nDCG@10": [0.2, 0.4, 0.65]}),
              Model("student_warmup", "student", "the warmed-up student", {"test": {"nDCG@10": 0.59, "R@100": None}}),
              Model("student_response_kd", "response_kd", "the response-KD student", {"test": {"nDCG@10": 0.6}}),
              Model("student_lead", "lead", "the LEAD student", {"test": {"nDCG@10": 0.61, "R@100": 0.91}},
                    {"nDCG@10": [0.3, None], "R@100": [0.8, 0.9]}))
    stages = (Stage("distill", "distill", "stages/distill", 150, "student_warmup", "student_lead"),
              Stage("response_kd", "distill", "stages/response_kd", 150, "student_warmup", "student_response_kd"))
    paired = PairedComparison("student_lead", "student_response_kd", "test", "nDCG@10", 0.01, 2, 0.5,
                              {"student_lead": {"q1": 0.5, "q2": 0.7}, "student_response_kd": {"q1": 0.5, "q2": 0.68}})
    return RunResults("scifact", {"train": "train-nodev", "dev": "dev", "test": "test"}, ("nDCG@10", "R@100"),
                      models, stages, {"teacher": "all-MiniLM-L6-v2", "steps": {"warmup": 40}, "fast": False},
                      {"mining": 12.5, "warmup": 30.0}, paired)


def test_round_trip_through_the_file(tmp_path):
    results = quickstart_like()
    path = write_results(tmp_path / "results.json", results)
    assert read_results(path) == results
    data = json.loads(path.read_text(encoding="utf-8"))
    assert next(iter(data)) == "schema" and data["schema"] == SCHEMA  # the first thing a reader sees
    assert data["models"][3]["layers"] == {"nDCG@10": [0.3, None], "R@100": [0.8, 0.9]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically, nothing left over


def test_what_the_results_say_about_their_models():
    results = quickstart_like()
    assert results.test_split == "test" and results.evaluated
    assert results.with_role("lead").name == "student_lead"
    assert results.start_of("student_lead").name == "student_warmup"  # LEAD's Δ baseline: where its stage began
    assert results.start_of("teacher") is None and results.model("nope") is None
    unscored = RunResults.from_dict({**results.to_dict(), "models": [
        {**model, "metrics": {}} for model in results.to_dict()["models"]]})
    assert not unscored.evaluated


def _broken(change) -> dict:
    data = json.loads(json.dumps(quickstart_like().to_dict()))
    change(data)
    return data


def _set(path: str, value):
    """A change that sets ``data[...]`` along ``path`` (keys and list indices, dotted)."""
    def change(data):
        *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
        for part in parents:
            data = data[part]
        data[last] = value
    return change


@pytest.mark.parametrize("change, field, message", [
    (_set("models.1.metrics.test.nDCG@10", "n/a"), "models[1].metrics.test.nDCG@10",
     "expected a number or null, got 'n/a'"),
    (_set("models.0.metrics.test.MRR@10", 0.3), "models[0].metrics.test.MRR@10", "'MRR@10' is not a measure"),
    (_set("models.0.metrics.dev-2", {"nDCG@10": 0.3}), "models[0].metrics.dev-2", "'dev-2' is not a split"),
    (lambda data: data["models"][2].pop("role"), "models[2].role", "missing"),
    (_set("models.2.role", "baseline"), "models[2].role", "'baseline' is not a known value"),
    (_set("models.3.name", "teacher"), "models[3].name", "'teacher' is used twice"),
    (_set("models.3.layers.nDCG@10", 0.3), "models[3].layers.nDCG@10", "expected a list, got 0.3"),
    (_set("models.3.layers.nDCG@10", [0.3, "x"]), "models[3].layers.nDCG@10[1]", "expected a number or null"),
    (_set("models.3.layers.nDCG@10", [0.3, float("nan")]), "models[3].layers.nDCG@10[1]", "expected a number"),
    (_set("stages.0.steps", True), "stages[0].steps", "expected an integer, got True"),
    (_set("stages.1.start", "student_init"), "stages[1].start", "'student_init' is not a model of 'models'"),
    (_set("lead_vs_response_kd.reference", "student_x"), "lead_vs_response_kd.reference", "is not a model"),
    (_set("lead_vs_response_kd.p", None), "lead_vs_response_kd.p", "expected a number, got null"),
    (_set("splits", {"train": "train"}), "splits.test", "missing"),
    (_set("modles", []), "modles", "unknown field; expected one of dataset, splits"),
    (lambda data: data.pop("schema"), "schema", "got missing: written by another version of leadkd"),
    (_set("schema", "leadkd-results/0"), "schema", "got 'leadkd-results/0'"),
    (_set("timings.mining", "12 s"), "timings.mining", "expected a number, got '12 s'"),
])
def test_a_malformed_file_is_one_line_naming_the_file_and_the_field(tmp_path, change, field, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_broken(change)), encoding="utf-8")
    with pytest.raises(InputError) as caught:
        read_results(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: field {field!r}: ") and message in text
    assert caught.value.field == field


@pytest.mark.parametrize("text, message", [("[1, 2]", r"results.json: expected a JSON object, got a list$"),
                                           ('{"schema": \n', r"results.json:2: not valid JSON")])
def test_a_file_that_is_not_a_json_object(tmp_path, text, message):
    path = tmp_path / "results.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_results(path)
    with pytest.raises(InputError, match="no such file"):
        read_json_object(tmp_path / "missing.json")


def test_a_value_that_cannot_be_json_is_refused_before_the_file_is_touched(tmp_path):
    path = write_results(tmp_path / "results.json", quickstart_like())
    before = path.read_bytes()
    broken = quickstart_like()
    broken.timings["warmup"] = float("nan")
    with pytest.raises(ValueError):
        write_results(path, broken)
    assert path.read_bytes() == before
