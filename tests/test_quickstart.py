"""`leadkd quickstart --fast` end to end on a SciFact slice, and its report (CI runs this)."""

from __future__ import annotations

import json

import pytest

from leadkd.cli import main
from leadkd.report import parse_markdown_table


@pytest.mark.slow
def test_quickstart_fast_writes_a_report_people_can_read(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEADKD_DATA_DIR", str(data_dir))
    output = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--output", str(output)]) == 0
    report = (output / "report.md").read_text()
    table = parse_markdown_table(report.split("## Test results", 1)[1])
    names = [row[next(iter(row))] for row in table]
    assert names == ["teacher", "student_init", "student_warmup", "student_lead"]
    for row in table:
        assert 0.0 <= row["nDCG@10"] <= 1.0
    results = json.loads((output / "results.json").read_text())
    assert len(results["layers"]["teacher"]) == 6 and len(results["layers"]["student_lead"]) == 3
    assert results["splits"] == {"train": "train-nodev", "dev": "dev", "test": "test"}
    # The teacher retrieves far better than chance even on 64-token passages of a 400-passage slice.
    assert results["models"]["teacher"]["nDCG@10"] > 0.5
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
