"""`leadkd compare` on tiny models: 2 variants x 2 seeds, resumed after an interruption, and its statistics."""

from __future__ import annotations

import contextlib
import io
import math
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.cli import main
from leadkd.compare import run as compare_module
from leadkd.compare.report import paired_comparison, render_compare
from leadkd.compare.run import load_ledger, load_spec, run_compare
from leadkd.runtime.errors import ConfigError, LeadkdError


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    data = make_tiny_beir(root / "data")
    with open(data / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6, 12)))
    base = {"teacher": {"path": str(make_tiny_bert_folder(root / "teacher", layers=4, seed=5)),
                        "max_query_length": 16, "max_passage_length": 32},
            "student": {"init": "teacher_layers=[0,2]", "max_query_length": 16, "max_passage_length": 32},
            "data": {"corpus": str(data), "train_groups": str(make_tiny_groups(root / "groups.jsonl")),
                     "num_negatives": 3},
            "optim": {"steps": 2, "batch_size": 4, "lr": 1e-3}, "layers": {"k": 2},
            "checkpoint": {"every": None}, "eval": {"split": "dev", "every": 1}, "output_dir": "unused"}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return {"root": root, "base": root / "base.yaml", "data": data}


def write_spec(setup, folder: Path, **changes) -> Path:
    spec = {"kind": "compare", "base": str(setup["base"]),
            "variants": {"response_kd": {"loss.layer": "none"}, "lead": {}}, "reference": "response_kd",
            "seeds": [0, 1], "evaluate": {"test": {"split": "test"}}, "measures": ["nDCG@10", "R@100"],
            "output_dir": str(folder / "runs")}
    spec.update(changes)
    path = folder / "spec.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_rows_run_once_resume_after_an_interruption_and_render(setup, tmp_path, monkeypatch, capsys):
    spec = load_spec(write_spec(setup, tmp_path))
    trained = []
    import leadkd.distill.trainer as trainer

    original = trainer.run_job

    def counting(config, resume=False, log=None):
        trained.append(Path(config.output_dir).relative_to(tmp_path / "runs").as_posix())
        return original(config, resume=resume, log=log)

    monkeypatch.setattr(trainer, "run_job", counting)  # compare imports run_job when it runs

    # Interrupted during the third row's scoring: the two finished rows are in the ledger.
    real_score = compare_module.score_model
    calls = {"n": 0}

    def failing_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(compare_module, "score_model", failing_third)
    with pytest.raises(KeyboardInterrupt):
        run_compare(spec, log=lambda m: None)
    assert sorted(load_ledger(spec.ledger)["rows"]) == ["lead/seed0", "response_kd/seed0"]
    monkeypatch.setattr(compare_module, "score_model", real_score)

    lines = []
    ledger = run_compare(spec, log=lines.append)
    assert trained == ["response_kd/seed0", "lead/seed0", "response_kd/seed1", "response_kd/seed1", "lead/seed1"]
    assert lines[0] == "compare: 2 of 4 rows done, 2 to run now"
    assert lines[1].startswith("[1/2] response_kd/seed1: test nDCG@10 ") and "s CPU)" in lines[1]
    assert sorted(ledger["rows"]) == ["lead/seed0", "lead/seed1", "response_kd/seed0", "response_kd/seed1"]
    row = ledger["rows"]["lead/seed1"]
    assert row["config"]["seed"] == 1 and row["config"]["loss"]["layer"] == "lead"
    assert ledger["rows"]["response_kd/seed1"]["config"]["loss"]["layer"] == "none"
    assert row["model"].endswith("best") and row["cpu_seconds"] > 0 and [p[0] for p in row["dev"]] == [0, 1, 2]
    assert row["dev_metric"] == "nDCG@10" and row["code"]["leadkd"]
    per_query = row["splits"]["test"]["per_query"]
    assert sorted(per_query) == sorted(f"q{i}" for i in range(6, 12))
    assert row["splits"]["test"]["aggregate"]["nDCG@10"] == pytest.approx(
        statistics.fmean(q["nDCG@10"] for q in per_query.values()))
    card = (Path(row["model"]) / "README.md").read_text()  # the row's model card has the comparison's figures
    assert f"{row['splits']['test']['aggregate']['nDCG@10']:.4f}" in next(
        line for line in card.splitlines() if line.startswith("| test: "))

    assert run_compare(spec, log=lines.append) == ledger and len(trained) == 5  # nothing left to do
    assert load_ledger(str(spec.ledger)) == ledger  # a path given as text works too
    page = render_compare(ledger, tmp_path)
    text = page.read_text()
    assert "| lead | " in text and "| response_kd | " in text and "reference" in text
    for image in ("dev_curves.png", "deltas.png"):
        assert (tmp_path / image).stat().st_size > 10_000

    assert main(["report", str(spec.ledger)]) == 0
    assert "compare.md" in capsys.readouterr().err


def test_a_row_made_with_another_config_is_refused(setup, tmp_path):
    path = write_spec(setup, tmp_path, seeds=[0])
    run_compare(load_spec(path), log=lambda m: None, max_rows=1)
    changed = write_spec(setup, tmp_path, seeds=[0], variants={"response_kd": {"loss.layer": "none",
                                                                              "loss.temperature": 2.0}, "lead": {}})
    with pytest.raises(LeadkdError, match=r"response_kd/seed0 was made with another config "
                                          r"\(loss.temperature: 1.0 -> 2.0\)"):
        run_compare(load_spec(changed), log=lambda m: None)


def test_an_option_added_later_at_its_default_is_no_change():
    stored = {"loss": {"layer": "lead"}, "seed": 0}
    assert compare_module.config_changes(stored, {"loss": {"layer": "lead", "mask_duplicate_positives": True},
                                                  "seed": 0}, "distill") == []
    assert compare_module.config_changes(stored, {"loss": {"layer": "lead", "mask_duplicate_positives": False},
                                                  "seed": 0}, "distill") == [
        "loss.mask_duplicate_positives: '(absent)' -> False"]


def test_a_train_variant_trains_the_base_student_alone(setup, tmp_path):
    init = tmp_path / "init"
    from leadkd.models import load_model

    load_model(setup["root"] / "teacher").save_pretrained(init)
    path = write_spec(setup, tmp_path, seeds=[3], set={"student.init": None, "student.path": str(init)},
                      variants={"ground_truth": {"job": "train"}, "lead": {}}, reference="ground_truth")
    ledger = run_compare(load_spec(path), log=lambda m: None, only={"ground_truth"})
    (row,) = ledger["rows"].values()
    assert row["job"] == "train" and row["config"]["model"]["path"] == str(init) and row["config"]["seed"] == 3
    assert "teacher" not in row["config"]


def test_a_model_is_scored_once_and_an_ablation_runs_on_its_own_seeds(setup, tmp_path):
    """``job: evaluate`` scores a folder as it is (one row, under the first seed); a variant's ``seeds``
    narrows the spec's; the report pairs them over the seeds they share."""
    path = write_spec(setup, tmp_path, seeds=[0, 1],
                      variants={"teacher": {"job": "evaluate", "model": str(setup["root"] / "teacher")},
                                "response_kd": {"loss.layer": "none", "seeds": [1]}, "lead": {}})
    spec = load_spec(path)
    assert [(v.name, s) for v, s in spec.rows()] == [("teacher", 0), ("lead", 0), ("response_kd", 1), ("lead", 1)]
    ledger = run_compare(spec, log=lambda m: None)
    teacher = ledger["rows"]["teacher/seed0"]
    assert teacher["job"] == "evaluate" and teacher["config"] == {"model": str(setup["root"] / "teacher")}
    assert "dev" not in teacher and teacher["splits"]["test"]["per_query"]
    from leadkd.data.datasets import load_dataset
    from leadkd.models.dual_encoder import DualEncoder
    from leadkd.retrieval.evaluate import evaluate
    from leadkd.retrieval.pipeline import encode_corpus, encode_queries, search_run

    test = load_dataset(setup["data"], split="test")  # the naive way: score the folder by hand
    model = DualEncoder.from_pretrained(setup["root"] / "teacher")
    expected, _ = evaluate(search_run(encode_queries(model, test.queries), encode_corpus(model, test.corpus), 100),
                           test.qrels, measures=["nDCG@10"])
    assert teacher["splits"]["test"]["aggregate"]["nDCG@10"] == pytest.approx(expected["nDCG@10"], abs=1e-12)
    assert paired_comparison(ledger, "test", "nDCG@10", "lead", "response_kd")["seeds"] == [1]
    assert "| teacher | " in render_compare(ledger, tmp_path).read_text()


@pytest.mark.parametrize("changes,message", [
    ({"reference": "nope"}, "reference: 'nope' is not one of the variants"),
    ({"variants": {"only": {}}}, "at least two variants"),
    ({"seeds": [0, 0]}, "seeds: expected a list of distinct integers"),
    ({"evaluate": {"dev": {"split": "dev"}}}, "evaluate.dev: split 'dev' also chooses the checkpoints"),
    ({"measures": ["nDGC@10"]}, "unknown measure 'nDGC@10'"),
    ({"varients": {}}, "varients: unknown key"),
    ({"variants": {"a": 3, "b": {}}, "reference": "b"}, "variants.a: expected a mapping"),
    ({"variants": {"a": {"eval.split": None}, "b": {}}, "reference": "b"}, "variants.a: sets no eval.split"),
    ({"variants": {"a": {"job": "eval"}, "b": {}}, "reference": "b"}, "variants.a.job: expected 'distill', 'train' or"),
    ({"variants": {"a": {"job": "evaluate"}, "b": {}}, "reference": "b"},
     "variants.a: a 'job: evaluate' variant names"),
    ({"variants": {"a": {"seeds": [7]}, "b": {}}, "reference": "b"}, "variants.a.seeds: expected a non-empty list"),
    ({"variants": {"a": {"loss.layr": "none"}, "b": {}}, "reference": "b"}, "variant 'a'"),
])
def test_bad_specs_are_one_clear_line(setup, tmp_path, changes, message):
    with pytest.raises((ConfigError, LeadkdError), match=message) as info:
        load_spec(write_spec(setup, tmp_path, **changes))
    assert "\n" not in str(info.value)


def _ledger(values: dict[str, dict[int, list[float]]]) -> dict:
    """A hand-made ledger: variant -> seed -> per-query nDCG@10."""
    rows = {}
    for variant, seeds in values.items():
        for seed, per_query in seeds.items():
            rows[f"{variant}/seed{seed}"] = {
                "variant": variant, "seed": seed, "model": "m", "dev": [],
                "splits": {"test": {"aggregate": {"nDCG@10": statistics.fmean(per_query)},
                                    "per_query": {f"q{i}": {"nDCG@10": v} for i, v in enumerate(per_query)}}}}
    return {"spec": {"reference": "ref", "variants": {"ref": {}, "new": {}}, "evaluate": {"test": {}},
                     "measures": ["nDCG@10"]}, "rows": rows}


def test_paired_delta_interval_and_p_value_against_naive_computations():
    ref = {0: [0.5, 0.2, 0.9, 0.4], 1: [0.6, 0.1, 0.8, 0.4], 2: [0.5, 0.3, 0.7, 0.5]}
    new = {0: [0.6, 0.3, 0.9, 0.5], 1: [0.6, 0.2, 0.9, 0.5], 2: [0.7, 0.3, 0.8, 0.5]}
    found = paired_comparison(_ledger({"ref": ref, "new": new}), "test", "nDCG@10", "new", "ref")
    deltas = [statistics.fmean(new[s]) - statistics.fmean(ref[s]) for s in (0, 1, 2)]
    half = 4.302652730 * statistics.stdev(deltas) / math.sqrt(3)   # t_{0.975, 2}
    assert found["delta"] == pytest.approx(statistics.fmean(deltas), abs=1e-12)
    assert (found["low"], found["high"]) == (pytest.approx(found["delta"] - half, abs=1e-9),
                                             pytest.approx(found["delta"] + half, abs=1e-9))
    # per-query means over the seeds, then every sign pattern of the 4 differences
    d = [statistics.fmean(new[s][q] for s in new) - statistics.fmean(ref[s][q] for s in ref) for q in range(4)]
    observed = abs(sum(d) / 4)
    patterns = [[1 if (bits >> i) & 1 else -1 for i in range(4)] for bits in range(16)]
    extreme = sum(abs(sum(s * v for s, v in zip(p, d, strict=True)) / 4) >= observed - 1e-12 for p in patterns)
    assert found["p"] == pytest.approx(extreme / 16, abs=1e-12) and found["seeds"] == [0, 1, 2]
    only_shared = paired_comparison(_ledger({"ref": ref, "new": {0: new[0]}}), "test", "nDCG@10", "new", "ref")
    assert only_shared["seeds"] == [0] and only_shared["low"] is None


def test_a_set_with_a_relevance_threshold_reports_its_binary_measures_under_their_thresholded_names(tmp_path):
    """TREC DL (rel 2): ir-measures names recall R(rel=2)@100; the table finds it under the spec's R@100,
    heads the column with the thresholded name, and pairs per-query values by it too."""
    from leadkd.compare.report import measure_key, variant_values

    ledger = _ledger({"ref": {0: [0.1, 0.2]}, "new": {0: [0.3, 0.2]}})
    ledger["spec"]["evaluate"] = {"test": {"rel": 2}}
    ledger["spec"]["measures"] = ["nDCG@10", "R@100"]
    for row in ledger["rows"].values():
        recall = [0.5, 1.0] if row["variant"] == "ref" else [1.0, 1.0]
        row["splits"]["test"]["aggregate"]["R(rel=2)@100"] = statistics.fmean(recall)
        for i, value in enumerate(recall):
            row["splits"]["test"]["per_query"][f"q{i}"]["R(rel=2)@100"] = value
    assert (measure_key(ledger, "test", "R@100") == "R(rel=2)@100"
            and measure_key(ledger, "test", "nDCG@10") == "nDCG@10")
    assert variant_values(ledger, "test", "R@100") == {"ref": {0: 0.75}, "new": {0: 1.0}}
    assert paired_comparison(ledger, "test", "R@100", "new", "ref")["delta"] == pytest.approx(0.25)
    text = render_compare(ledger, tmp_path).read_text()
    assert "| variant | nDCG@10 | R(rel=2)@100 |" in text and "| new | 0.2500 | 1.0000 |" in text


LEDGER_HOLDER = ("import sys, time\n"
                 "from leadkd.runtime.run_lock import file_lock\n"
                 "with file_lock(sys.argv[1], option='ledger'):\n"
                 "    print('held', flush=True)\n"
                 "    time.sleep(120)\n")


def test_a_ledger_outside_the_output_folder_is_held_like_an_output_folder(setup, tmp_path, monkeypatch):
    """Two comparisons with their own output folders but one ``results:`` ledger would each rewrite it with
    only their own rows: the second is refused in one line before it trains anything."""
    import os
    import subprocess
    import sys

    import leadkd
    from leadkd.cli import main

    ledger = tmp_path / "results" / "shared.json"
    spec_path = write_spec(setup, tmp_path / "b", results=str(ledger))
    assert load_spec(spec_path).ledger == ledger
    env = {**os.environ, "PYTHONPATH": str(Path(leadkd.__file__).resolve().parents[1])}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    holder = subprocess.Popen([sys.executable, "-c", LEDGER_HOLDER, str(ledger)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        import leadkd.distill.trainer as trainer

        monkeypatch.setattr(trainer, "run_job", lambda *a, **k: pytest.fail("trained under a held ledger"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(["compare", str(spec_path)]) == 2
        (line,) = err.getvalue().strip().splitlines()
        assert line.startswith(f"leadkd: error: {ledger} is in use by pid {holder.pid} on ")
        assert line.endswith(f"(its lock {ledger.parent / '.shared.json.lock'}); wait for it or choose another ledger")
        assert not ledger.exists()
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (killed: its lock file stays behind), the comparison takes the ledger over.
    monkeypatch.setattr(trainer, "run_job", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.warns(RuntimeWarning, match="taking over the lock"), pytest.raises(KeyboardInterrupt):
        run_compare(load_spec(spec_path), log=lambda m: None)
    assert not (ledger.parent / ".shared.json.lock").exists()
