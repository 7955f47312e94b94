"""Where LEAD pays off: one factor at a time against response-only KD, with `leadkd compare`.

Base (the quality table's protocol, benchmarks/quality.py): all-MiniLM-L6-v2 teacher (mean pooling,
cosine x 20), a 3-layer student cut from its blocks 0, 2, 4, hard negatives mined by the teacher, batch 8,
3 negatives, lr 5e-5, K = 2, the teacher trained jointly; checkpoints chosen on dev, scored on test
(NFCorpus: on its dev split, with 10% of train held out for the choice). Each cell below is one
comparison (a ledger under benchmarks/results/study/); it is screened with seed 0, and a promising cell
is confirmed by adding seeds 1 and 2 to the same ledger (``--seeds 0 1 2``).

    LEADKD_DATA_DIR=../shared/data nice python benchmarks/study.py --cells scifact-150
    LEADKD_DATA_DIR=../shared/data nice python benchmarks/study.py --cells scifact-150 --seeds 0 1 2

Rows are resumable: a rerun skips what the committed ledger holds. benchmarks/results/study/<cell>.md is
the cell's table, rebuilt after every row.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "study"

import quality  # noqa: E402  (its prepare(): teacher, student init and mined groups per dataset)

RESPONSE_KD = {"loss.layer": "none"}

#: cell -> (dataset, overrides of every row, variants). Every cell holds its own response-KD reference.
CELLS = {
    # Budget: the quickstart's hint (150 steps: LEAD +0.007 on one seed) and 2.5x / 10x / 40x the table's 60.
    "scifact-150": ("scifact", {"optim.steps": 150, "eval.every": 50, "checkpoint.every": 50}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
        "lead_tl1": {"loss.layer_temperature": 1.0},          # sharper layer weights
        "lead_skip": {"layers.strategy": "skip"},              # the table's best ablation
        "lead_k3": {"layers.k": 3},
    }),
    "scifact-600-frozen": ("scifact", {"optim.steps": 600, "eval.every": 150, "checkpoint.every": 150,
                                       "teacher.train": False, "teacher.cache": True}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }),
    "nfcorpus-150": ("nfcorpus", {"optim.steps": 150, "eval.every": 50, "checkpoint.every": 50}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }),
    # The quickstart's own condition, where one seed gave LEAD +0.007: the student warmed up on ground
    # truth for 40 steps first (one shared warm-up, seed 0), then 150 distillation steps.
    "scifact-warm-150": ("scifact", {"optim.steps": 150, "eval.every": 50, "checkpoint.every": 50}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }, {"warmup_steps": 40}),
}


def _portable(path: Path, dataset: str) -> str:
    """A dataset by its name under $LEADKD_DATA_DIR, anything else relative to the repository root, so the
    committed ledgers name no folder of this machine."""
    from leadkd.data.datasets import resolve_dataset

    if Path(path).resolve() == Path(resolve_dataset(dataset)).resolve():
        return dataset
    return os.path.relpath(path)


def warm_student(data: dict, steps: int, work: Path, dataset: str) -> Path:
    """The student after ``steps`` ground-truth steps (seed 0), chosen on dev: one warm start for every row."""
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    out = work / dataset / f"warm-{steps}"
    settings = quality.SETTINGS
    overrides = [f"model.path={data['init']}", f"data.corpus={data['folder']}", f"data.train_groups={data['groups']}",
                 f"data.num_negatives={settings['negatives']}", f"optim.batch_size={settings['batch_size']}",
                 f"optim.lr={settings['lr']}", f"optim.steps={steps}", "optim.cpu_dropout=false", "seed=0",
                 f"eval.split={data['splits']['dev']}", f"eval.every={steps}", "checkpoint.every=null",
                 f"output_dir={out}"]
    run_job(load_config(None, overrides, kind="train"), resume=True, log=lambda m: print(m, flush=True))
    return out / "best" if (out / "best").is_dir() else out / "final"


def base_config(dataset: str, work: Path, warmup_steps: int = 0) -> tuple[Path, dict]:
    """The cell's base distill config, written beside its runs."""
    data = quality.prepare(dataset, work)
    if warmup_steps:
        data = {**data, "init": warm_student(data, warmup_steps, work, dataset)}
    data = {**data, "folder": _portable(data["folder"], dataset)}
    settings = quality.SETTINGS
    config = {
        "teacher": {"path": os.path.relpath(data["teacher"]), "train": True},
        "student": {"path": os.path.relpath(data["init"])},
        "data": {"corpus": data["folder"], "train_groups": os.path.relpath(data["groups"]),
                 "num_negatives": settings["negatives"]},
        "layers": {"k": settings["layer_k"]},
        "optim": {"batch_size": settings["batch_size"], "lr": settings["lr"], "steps": settings["steps"],
                  "cpu_dropout": False},
        "eval": {"split": data["splits"]["dev"], "every": settings["eval_every"]},
        "checkpoint": {"every": settings["eval_every"]}, "log_every": 1, "output_dir": str(work / "unused"),
        "seed": 0,
    }
    path = work / dataset / (f"study-base-warm{warmup_steps}.yaml" if warmup_steps else "study-base.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, data


def cell_spec(name: str, seeds: list[int], work: Path) -> Path:
    dataset, common, variants, *base_changes = CELLS[name]
    base, data = base_config(dataset, work, **(base_changes[0] if base_changes else {}))
    spec = {"kind": "compare", "base": str(base), "set": common, "variants": variants, "reference": "response_kd",
            "seeds": seeds, "evaluate": {"test": {"data": str(data["folder"]), "split": data["splits"]["test"]}},
            "measures": ["nDCG@10", "R@100"], "output_dir": str(work / "study" / name),
            "results": os.path.relpath(RESULTS / f"{name}.json")}
    path = work / "study" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--work", default=str(HERE / "runs" / "quality"), help="models and runs (not committed)")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from leadkd.compare import load_spec, run_compare
    from leadkd.compare_report import render_compare

    torch.set_num_threads(args.threads)
    os.chdir(HERE.parent)  # every path in the specs and ledgers is relative to the repository root
    work = Path(os.path.relpath(args.work))
    for name in args.cells:
        spec = load_spec(cell_spec(name, args.seeds, work))
        ledger = run_compare(spec, log=lambda m, name=name: print(f"{name}: {m}", flush=True), max_rows=args.max_rows)
        print(f"{name}: wrote {render_compare(ledger, RESULTS / name)}", flush=True)


if __name__ == "__main__":
    main()
