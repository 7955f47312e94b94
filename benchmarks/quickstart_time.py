"""Wall time of `leadkd quickstart` by stage: the default run (both arms) and `--fast`, from scratch.

Targets (issue #12): the default quickstart with both arms <= 15 minutes on the 2-core CPU, `--fast` <= 2.
Each run starts in an empty folder and records the quickstart's own `timings.json` (mining, warm-up, each
arm, each test evaluation) plus the total; what is left over is loading, the teacher's folder and the
report. Dev evaluations inside a stage are read from its metrics.jsonl (`eval_seconds`), so the table
says how much of each arm is training and how much choosing checkpoints.

    LEADKD_DATA_DIR=../shared/data OMP_WAIT_POLICY=PASSIVE python benchmarks/quickstart_time.py [--only fast]

Writes benchmarks/results/quickstart_time.json; docs/benchmarks.md shows the table. Run it on an idle
machine: a concurrent job doubles every figure.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"default": 15 * 60, "fast": 2 * 60}


def dev_eval_seconds(stage_dir: Path) -> float:
    """Seconds a stage spent in its dev evaluations (each logged with ``eval_seconds``)."""
    log = stage_dir / "metrics.jsonl"
    if not log.is_file():
        return 0.0
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return round(sum(row.get("eval_seconds", 0.0) for row in rows if "eval" in row), 1)


def time_quickstart(mode: str, data: str, root: Path) -> dict:
    from leadkd.quickstart import QuickstartPlan, run_quickstart
    from leadkd.reporting.results import read_results

    output = root / mode
    plan = QuickstartPlan.fast() if mode == "fast" else QuickstartPlan()
    started, cpu = time.perf_counter(), time.process_time()
    run_quickstart(data, output, plan, log=lambda m: None)
    total = time.perf_counter() - started
    results = read_results(output / "results.json")
    stages = results.timings
    paired = results.lead_vs_response_kd
    return {"total_seconds": round(total, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "target_seconds": TARGETS[mode], "meets_target": total <= TARGETS[mode],
            "stages": stages, "other_seconds": round(total - sum(stages.values()), 1),
            "dev_eval_seconds": {stage.name: dev_eval_seconds(output / stage.folder) for stage in results.stages},
            "steps": results.settings["steps"], "teacher_training": results.settings.get("teacher_training"),
            "test_nDCG@10": {model.name: model.metrics[results.test_split]["nDCG@10"] for model in results.models},
            "lead_vs_response_kd": {"delta": paired.delta, "p": paired.p, "queries": paired.queries}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="scifact")
    parser.add_argument("--only", choices=sorted(TARGETS), default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "quickstart_time.json"))
    parser.add_argument("--keep", default=None, help="run the quickstarts in this folder and keep them (reports, "
                                                     "plots); it must not hold an earlier run (default: a temporary "
                                                     "one)")
    args = parser.parse_args()
    import torch

    from leadkd.runtime.fileio import atomic_write

    torch.set_num_threads(args.threads)
    path = Path(args.output)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(machine={"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                           "torch": torch.__version__}, data=args.data)
    modes = [args.only] if args.only else ["fast", "default"]
    if args.keep and any((Path(args.keep) / mode).exists() for mode in modes):
        parser.error(f"--keep {args.keep}: holds an earlier run, which the quickstart would continue, not time")
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="quickstart-time-")) as root:
        for mode in modes:
            record[mode] = time_quickstart(mode, args.data, Path(root))
            print(f"{mode}: {record[mode]['total_seconds'] / 60:.1f} min (target {TARGETS[mode] / 60:.0f}): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in record[mode]["stages"].items()), flush=True)
            with atomic_write(path) as handle:
                json.dump(record, handle, indent=2)
                handle.write("\n")


if __name__ == "__main__":
    main()
