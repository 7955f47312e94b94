"""`leadkd quickstart --fast` end to end on a SciFact slice, and its report (CI runs this)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leadkd.cli import main
from leadkd.reporting.results import read_results


@pytest.mark.slow
def test_quickstart_fast_writes_a_report_people_can_read(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEADKD_DATA_DIR", str(data_dir))
    output = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--output", str(output)]) == 0
    report = (output / "report.md").read_text()
    results = read_results(output / "results.json")
    names = [model.name for model in results.models]
    assert names == ["teacher", "student_init", "student_warmup", "student_response_kd", "student_lead"]
    assert [stage.name for stage in results.stages] == ["warmup", "distill", "response_kd"]
    table = report.split("## Test results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]  # below the header and separator
    assert [row.split(" | ")[0][2:] for row in rows] == names  # the report's table, in the results' order
    for model, row in zip(results.models, rows, strict=True):
        score = model.metrics["test"]["nDCG@10"]
        assert 0.0 <= score <= 1.0 and f"{score:.4f}" in row.split(" | ")[1]
    assert (len(results.model("teacher").layers["nDCG@10"]) == 6
            and len(results.model("student_lead").layers["R@100"]) == 3)
    assert results.splits == {"train": "train-nodev", "dev": "dev", "test": "test"}
    assert results.dataset == "scifact" and "- Dataset: scifact" in report  # not the last model's name
    lead_card = output / "stages" / "distill" / "best" / "README.md"
    score = results.model("student_lead").metrics["test"]["nDCG@10"]
    assert f"| test | {score:.4f} |" in lead_card.read_text()  # the model card got the test figures
    paired = results.lead_vs_response_kd
    lead, base = paired.per_query["student_lead"], paired.per_query["student_response_kd"]
    assert paired.queries == len(lead) == len(base) > 0 and 0.0 < paired.p <= 1.0
    assert paired.delta == pytest.approx(results.model("student_lead").metrics["test"]["nDCG@10"]
                                         - results.model("student_response_kd").metrics["test"]["nDCG@10"], abs=1e-12)
    assert "**LEAD against response-only KD**" in report and f"p = {paired.p:.3g}" in report
    stages = {"mining", "warmup", "distill", "response_kd"} | {f"test_{name}" for name in names}
    assert set(results.timings) == stages and all(v > 0 for v in results.timings.values())
    assert "Wall time by stage" in report
    # Both arms distil from the frozen teacher through one cache (LEAD's, holding every layer), and neither
    # scores its start again (the warm-up's chosen checkpoint, scored on test as student_warmup).
    assert json.loads((output / "teacher-cache" / "rank0" / "meta.json").read_text())["layers"] == list(range(6))
    # ...filled ahead with every passage from the teacher's mining encoding (training alone would have seen
    # a few per query), so no training step ran the teacher on a passage.
    import numpy as np

    assert np.count_nonzero(np.load(output / "teacher-cache" / "rank0" / "passages.hash.npy")) == 400
    for arm in ("distill", "response_kd"):
        config = (output / "stages" / arm / "config.yaml").read_text()
        assert "train: false" in config and not (output / "stages" / arm / "teacher-cache").exists()
        evals = [json.loads(line)["step"]
                 for line in (output / "stages" / arm / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
        assert evals and 0 not in evals
    # The teacher retrieves far better than chance even on 64-token passages of a 400-passage slice.
    assert results.model("teacher").metrics["test"]["nDCG@10"] > 0.5
    for name in ("per_layer.png", "training_curves.png", "layer_weights.png"):
        png = (output / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "nDCG@10" in capsys.readouterr().out
    # A second run finds every stage done and only rebuilds the report.
    before = (output / "results.json").stat().st_mtime_ns
    assert main(["quickstart", "--fast", "--output", str(output)]) == 0
    assert (output / "results.json").stat().st_mtime_ns == before


def test_quickstart_without_data_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LEADKD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LEADKD_DATA_DIR" in err[0] and "scifact" in err[0]


def test_without_data_and_without_ir_datasets_one_line_says_both_ways(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.delenv("LEADKD_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "ir_datasets", None)  # import raises ImportError
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "$LEADKD_DATA_DIR" in err[0] and "leadkd[irds]" in err[0]
    assert "irds:beir/scifact" in err[0] and "not installed" in err[0]


def test_without_data_an_unreachable_ir_datasets_says_both_ways(tmp_path, monkeypatch, capsys):
    import sys
    import types

    def offline(name):
        raise ConnectionError(f"cannot download {name}: network is unreachable")

    monkeypatch.delenv("LEADKD_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "ir_datasets", types.SimpleNamespace(load=offline))
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--fast", "--output", str(tmp_path / "qs")]) == 2
    *progress, error = capsys.readouterr().err.strip().splitlines()  # progress: "using irds:...", "exporting ..."
    assert all("irds:beir/scifact" in line for line in progress)
    assert "network is unreachable" in error and "$LEADKD_DATA_DIR" in error and "leadkd[irds]" in error
    assert not (tmp_path / "qs" / "irds-data").exists()


def _fake_irds_scifact(local: Path):
    """ir_datasets as it serves SciFact: train and test only, the local copy's texts and judgments."""
    from conftest import Doc, FakeIrds, Judgment, Query, fake_module
    from leadkd.data import read_beir_qrels

    rows = [json.loads(line) for line in (local / "corpus.jsonl").read_text().splitlines()]
    docs = [Doc(r["_id"], r["text"], r.get("title", "")) for r in rows]
    queries = [Query(r["_id"], r["text"]) for r in map(json.loads, (local / "queries.jsonl").read_text().splitlines())]
    splits = {split: FakeIrds(docs, queries, [Judgment(q, d, s, "0") for q, judged in
                                              read_beir_qrels(local / "qrels" / f"{split}.tsv").items()
                                              for d, s in judged.items()])
              for split in ("train", "test")}
    return fake_module({f"beir/scifact/{s}": ds for s, ds in splits.items()})


def test_a_name_missing_locally_falls_back_to_ir_datasets(data_dir, tmp_path, monkeypatch):
    """``leadkd quickstart`` with no $LEADKD_DATA_DIR: SciFact comes through ir_datasets instead."""
    import sys

    from leadkd.quickstart import QuickstartPlan, choose_splits, run_quickstart
    from leadkd.runtime.errors import LeadkdError

    monkeypatch.setitem(sys.modules, "ir_datasets", _fake_irds_scifact(data_dir / "scifact"))
    monkeypatch.delenv("LEADKD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    said = []
    with pytest.raises(LeadkdError, match="no/such/teacher"):  # stops after the data, before any model work
        run_quickstart("scifact", tmp_path / "qs", QuickstartPlan(teacher=str(tmp_path / "no/such/teacher")),
                       log=said.append)
    assert any("irds:beir/scifact" in line for line in said)
    assert choose_splits(tmp_path / "qs" / "irds-data") == {"train": "train-nodev", "dev": "dev", "test": "test"}


def test_an_irds_dataset_is_exported_with_the_local_copys_dev_split(data_dir, tmp_path, monkeypatch):
    """``--data irds:beir/scifact``: ir_datasets has SciFact's train and test only; the quickstart exports
    them into its run folder and derives the very dev split ``$LEADKD_DATA_DIR``'s copy holds."""
    import sys

    from leadkd.data import load_dataset, read_beir_qrels
    from leadkd.quickstart import QuickstartPlan, choose_splits, run_quickstart
    from leadkd.runtime.errors import LeadkdError

    local = data_dir / "scifact"
    monkeypatch.setitem(sys.modules, "ir_datasets", _fake_irds_scifact(local))
    output = tmp_path / "qs"
    with pytest.raises(LeadkdError, match="no/such/teacher"):  # stops after the data, before any model work
        run_quickstart("irds:beir/scifact/test", output, QuickstartPlan(teacher=str(tmp_path / "no/such/teacher")),
                       log=lambda m: None)
    exported = output / "irds-data"
    assert choose_splits(exported) == {"train": "train-nodev", "dev": "dev", "test": "test"}
    for split in ("train-nodev", "dev", "test"):
        assert read_beir_qrels(exported / "qrels" / f"{split}.tsv") == read_beir_qrels(local / "qrels" / f"{split}.tsv")
    assert len(load_dataset(exported, split="dev").queries) == 100
