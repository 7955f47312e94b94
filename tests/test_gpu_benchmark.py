"""benchmarks/gpu: the pure parts (FLOP count, GPU busy share, the table, the JUnit summary) against
naive computations, and the whole of run.sh in its dry run (tiny shapes on the CPU), so that the one
call on the accelerator machine works first time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", ROOT / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _load("speed")


@pytest.fixture(scope="module")
def table():
    return _load("table")


def test_encoder_flops_count_every_matrix_product_of_every_layer(speed):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 257, size=50)
    layers, h, f = 3, 48, 80
    naive = 0.0
    for t in lengths:
        for _ in range(layers):
            naive += 3 * 2 * t * h * h       # Q, K, V projections
            naive += 2 * t * t * h           # Q K^T
            naive += 2 * t * t * h           # softmax(...) V
            naive += 2 * t * h * h           # attention output projection
            naive += 2 * t * h * f + 2 * t * f * h  # feed-forward in and out
    assert speed.encoder_flops(lengths, layers, h, f) == pytest.approx(naive, rel=1e-12)


def test_busy_share_counts_overlapping_kernels_once(speed):
    intervals = [(0, 10), (5, 15), (20, 30), (22, 25), (40, 41)]  # microseconds
    covered = 15 + 10 + 1
    assert speed.busy_share(intervals, 100e-6) == pytest.approx(covered / 100)
    assert speed.busy_share([], 1.0) == 0.0


def test_the_table_states_each_target_and_marks_a_dry_run(table):
    result = {"dry_run": True, "date": "2026-12-01", "machine": {"device": "cpu"}, "versions": {},
              "matmul": {"n": 8, "tflops": 1.5},
              "correctness": {"tests": 3, "passed": 2, "failures": 1, "errors": 0, "skipped": 0,
                              "failed_tests": ["test_x[cuda]"]},
              "targets": {"lead_over_response_kd": {"value": 1.2, "target": "<= 1.1", "met": False},
                          "encode_over_st_best": {"value": None, "target": ">= 1.2", "met": None}},
              "train": {"variants": {"lead": {"ms_per_step": 12.0, "tflops": 3.0, "fraction_of_matmul": 0.5,
                                              "gpu_busy_share": 0.93}}}}
    text = table.render_table(result)
    assert text.startswith("**Dry run")
    assert "| LEAD step / response-only step (time) | 1.200 | <= 1.1 | **no** |" in text
    assert "| encode, leadkd / best sentence-transformers batch size (speed) | — | >= 1.2 | — |" in text
    assert "1 failed" in text and "test_x[cuda]" in text
    assert "| lead | 12.0 | 3.0 | 50.0% | 93% |" in text
    document = f"# B\n\nbefore\n{table.BEGIN}\nold\n{table.END}\nafter\n"
    replaced = table.replace_block(document, text)
    assert "old" not in replaced and replaced.startswith("# B\n\nbefore\n") and replaced.endswith("after\n")
    assert table.replace_block(replaced, "x\n").count(table.BEGIN) == 1
    with pytest.raises(ValueError, match="gpu-table"):
        table.replace_block("no markers", text)


def test_targets_are_judged_in_their_direction(speed):
    result = {"train": {"ratios": {"lead_over_response_kd": 1.05, "ours_contrastive_speed_over_st": 0.97}},
              "encode": {"ratios": {"leadkd_over_st_best": 1.25}}}
    judged = speed.targets(result)
    assert {name: row["met"] for name, row in judged.items()} == {
        "lead_over_response_kd": True, "ours_contrastive_speed_over_st": False, "encode_over_st_best": True}
    assert all(row["met"] is None for row in speed.targets({}).values())


def test_read_junit_counts_outcomes_and_names_the_failures(speed, tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1" time="2.5">'
                   '<testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
                   '<testcase name="c"><skipped/></testcase><testcase name="d"/></testsuite></testsuites>')
    assert speed.read_junit(xml) == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
                                     "failed_tests": ["b"], "seconds": 2.5}
    assert speed.read_junit(tmp_path / "missing.xml") is None


@pytest.mark.slow
def test_run_sh_dry_run_writes_every_result_and_a_table(tmp_path, table):
    """The accelerator machine's command end to end on the CPU (~1 minute): tests, speed, compiled step."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"gpu_speed_dry_run.json", "gpu_speed_dry_run_profiles.txt", "gpu_speed_compiled_dry_run.json",
            "gpu_host_path_dry_run.json", "gpu_tests.xml", "gpu_tests.log", "run.log"} <= files
    assert len(files) <= 8  # what the device tool brings back from $OUT
    result = json.loads((out / "gpu_speed_dry_run.json").read_text())
    assert result["dry_run"] is True and result["correctness"]["failures"] == 0
    assert set(result["targets"]) == set(table.TARGETS)
    assert all(row["value"] is not None and np.isfinite(row["value"]) for row in result["targets"].values())
    assert set(result["encode"]["variants"]) >= {"leadkd", "leadkd_without_accel", "sentence_transformers_bs32"}
    assert all(a["min_cosine_to_st"] > 0.99 for a in result["encode"]["agreement"].values())
    assert set(result["train"]["variants"]) == {"lead", "response_kd", "contrastive", "sentence_transformers"}
    host = json.loads((out / "gpu_host_path_dry_run.json").read_text())
    assert set(host["steps"]) == {"workers_0", "workers_4"}
    assert all(row["ms_per_step"] > 0 for row in host["steps"].values())
    assert host["search"]["cpu_exact_s"] > 0 and host["search"]["faiss_cpu_s"] > 0
    compiled = json.loads((out / "gpu_speed_compiled_dry_run.json").read_text())
    assert compiled["encode_compiled"]["max_abs_diff_compiled_vs_plain"] < 1e-2
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"x\n{table.BEGIN}\n{table.END}\n")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "speed.py"), "--table",
                    str(out / "gpu_speed_dry_run.json"), "--docs", str(docs)], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=120)
    assert "**Dry run" in docs.read_text() and "compiled backbone" in docs.read_text()
