"""The result table: LEAD against the baselines at the scale this CPU allows, as `leadkd compare` specs.

Every row uses the same teacher (all-MiniLM-L6-v2: mean pooling, cosine x 20), the same student init
(its blocks 0, 2, 4), the same mined hard negatives, steps, batch and lengths; only the loss differs.
Checkpoints are chosen on a dev split (SciFact: the derived dev; NFCorpus: 10% of train held out by a
hash of the query id) and the chosen one is scored once on the test split (NFCorpus: its dev split).

This script only prepares the data, teacher and student init and writes one comparison spec per dataset
(the methods are its variants, response-KD its reference; the ablations run on seed 0; the teacher and the
init are scored as they are); `leadkd compare` trains and scores the rows. Ledgers:
benchmarks/results/quality/<dataset>.json, each with its compare.md; docs/results.md is regenerated from
them every time.

    LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py            # everything still missing
    LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py --max-rows 3 --only scifact
    LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py --rerun scifact/lead/seed0 --why "..."

A rerun skips finished rows. ``--rerun KEY`` trains a finished row again from scratch (after a change to
the code it measures): its old values move to the row's ``history`` with the reason given by ``--why``,
so nothing is lost. Rows finished before the table moved onto `leadkd compare` kept aggregates only (no
per-query metrics or dev curves); they say so in ``migrated``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quality"
TABLE = HERE.parent / "docs" / "results.md"

SETTINGS = {"teacher": "all-MiniLM-L6-v2", "similarity_scale": 20.0, "student_layers": [0, 2, 4],
            "max_query_length": 48, "max_passage_length": 128, "steps": 60, "eval_every": 30, "batch_size": 8,
            "negatives": 3, "lr": 5e-5, "layer_k": 2, "mine": {"depth": 100, "range": [5, 50], "negatives": 20}}
SEEDS = (0, 1, 2)
DATASETS = ("scifact", "nfcorpus")

#: method -> its variant in the dataset's comparison (the teacher and the init are scored as they are)
MAIN = {
    "teacher": {"job": "evaluate"},
    "student_init": {"job": "evaluate"},
    "ground_truth": {"job": "train"},
    "response_kl": {"loss.layer": "none"},
    "margin_mse": {"loss.layer": "none", "loss.response": "margin_mse"},
    "hidden_mse": {"loss.layer": "hidden_mse"},
    "lead": {},
}
#: SciFact, seed 0
ABLATIONS = {
    "lead_last": {"layers.strategy": "last"},
    "lead_skip": {"layers.strategy": "skip"},
    "lead_no_reweight": {"loss.reweight": False},
    "lead_frozen_teacher": {"teacher.train": False},
    "lead_detached_targets": {"loss.detach_teacher_targets": True},
    "lead_k1": {"layers.k": 1},
    "lead_k3": {"layers.k": 3},
    # the paper's code: a copy of a query's positive in another group counts as a negative
    "lead_unmasked_duplicates": {"loss.mask_duplicate_positives": False},
}
OOD = "dl19"  # SciFact-trained models on the TREC DL 2019 judged pool (relevance >= 2 for recall)


def key(dataset: str, method: str, seed: int) -> str:
    return f"{dataset}/{method}/seed{seed}"


def prepare(dataset: str, work: Path) -> dict:
    """Dataset folder with train/dev/test splits, teacher, mined groups and the student init (cached)."""
    from leadkd.data.datasets import available_splits, load_dataset, resolve_dataset
    from leadkd.data.formats import write_beir_qrels
    from leadkd.data.groups import write_training_groups
    from leadkd.distill.build import student_from_teacher
    from leadkd.models.dual_encoder import DualEncoder
    from leadkd.retrieval.mine import mine_hard_negatives

    source = Path(resolve_dataset(dataset))
    root = work / dataset
    root.mkdir(parents=True, exist_ok=True)
    if "train-nodev" in available_splits(source):
        folder, splits = source, {"train": "train-nodev", "dev": "dev", "test": "test"}
    else:  # NFCorpus: hold out 10% of train for checkpoint choice; its dev split is the test
        folder, splits = root / "data", {"train": "train-nodev", "dev": "dev-heldout", "test": "dev"}
        if not (folder / "qrels" / "dev.tsv").is_file():
            (folder / "qrels").mkdir(parents=True, exist_ok=True)
            for name in ("corpus.jsonl", "queries.jsonl"):
                if not (folder / name).exists():
                    (folder / name).unlink(missing_ok=True)  # a dangling link from an earlier try
                    (folder / name).symlink_to((source / name).resolve())  # absolute: $LEADKD_DATA_DIR may be relative
            train = load_dataset(source, split="train").qrels
            held = {q for q in train if int(hashlib.sha1(q.encode()).hexdigest(), 16) % 10 == 0}
            write_beir_qrels(folder / "qrels" / "dev-heldout.tsv", {q: d for q, d in train.items() if q in held})
            write_beir_qrels(folder / "qrels" / "train-nodev.tsv", {q: d for q, d in train.items() if q not in held})
            write_beir_qrels(folder / "qrels" / "dev.tsv", dict(load_dataset(source, split="dev").qrels))
    lengths = {k: SETTINGS[k] for k in ("max_query_length", "max_passage_length")}
    teacher_dir, init_dir, groups = work / "teacher", work / "student-init", root / "groups.jsonl"
    if not teacher_dir.is_dir() or not init_dir.is_dir() or not groups.is_file():
        teacher = DualEncoder.from_pretrained(SETTINGS["teacher"], similarity_scale=SETTINGS["similarity_scale"],
                                              **lengths)
        if not teacher_dir.is_dir():
            teacher.save_pretrained(teacher_dir)
        if not init_dir.is_dir():
            class Lengths:
                max_query_length, max_passage_length = lengths["max_query_length"], lengths["max_passage_length"]
                pooling = normalize = similarity_scale = None
            student_from_teacher(teacher, tuple(SETTINGS["student_layers"]), Lengths).save_pretrained(init_dir)
        if not groups.is_file():
            mine = SETTINGS["mine"]
            found, report = mine_hard_negatives(teacher, load_dataset(folder, split=splits["train"]),
                                                depth=mine["depth"], rank_range=tuple(mine["range"]),
                                                negatives=mine["negatives"], seed=0, show_progress=True)
            print(report.summary(), flush=True)
            write_training_groups(found, groups)
    return {"folder": folder, "splits": splits, "teacher": teacher_dir, "init": init_dir, "groups": groups}


def _portable(path: Path, dataset: str) -> str:
    """A dataset by its name under $LEADKD_DATA_DIR, anything else relative to the repository root, so the
    committed ledgers name no folder of this machine."""
    from leadkd.data.datasets import resolve_dataset

    if Path(path).resolve() == Path(resolve_dataset(dataset)).resolve():
        return dataset
    return os.path.relpath(path)


def base_config(dataset: str, work: Path, init: Path | None = None, name: str = "base.yaml") -> tuple[Path, dict]:
    """The table's distill config for ``dataset`` (written beside its runs), and what prepare() made.
    ``init``: another student to start from (the study's warmed-up student)."""
    prepared = prepare(dataset, work)
    data = {**prepared, "folder": _portable(prepared["folder"], dataset), "init": init or prepared["init"]}
    config = {
        "teacher": {"path": os.path.relpath(data["teacher"]), "train": True},
        "student": {"path": os.path.relpath(data["init"])},
        "data": {"corpus": data["folder"], "train_groups": os.path.relpath(data["groups"]),
                 "num_negatives": SETTINGS["negatives"]},
        "layers": {"k": SETTINGS["layer_k"]},
        # The table was made with torch's own dropout, before optim.cpu_dropout existed: a row run again
        # draws the same masks, and a resumed row the masks it started with.
        "optim": {"batch_size": SETTINGS["batch_size"], "lr": SETTINGS["lr"], "steps": SETTINGS["steps"],
                  "cpu_dropout": False},
        "eval": {"split": data["splits"]["dev"], "every": SETTINGS["eval_every"]},
        "checkpoint": {"every": SETTINGS["eval_every"]}, "log_every": 1, "output_dir": str(work / "unused"),
        "seed": 0,
    }
    path = work / dataset / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, data


def spec_file(dataset: str, work: Path) -> Path:
    """The dataset's comparison: every method over SEEDS, the ablations (SciFact) on seed 0."""
    base, data = base_config(dataset, work)
    variants = {method: dict(variant) for method, variant in MAIN.items()}
    variants["teacher"]["model"] = os.path.relpath(data["teacher"])
    variants["student_init"]["model"] = os.path.relpath(data["init"])
    evaluate = {"test": {"data": data["folder"], "split": data["splits"]["test"]}}
    if dataset == "scifact":
        variants.update({method: {**variant, "seeds": [0]} for method, variant in ABLATIONS.items()})
        evaluate[OOD] = {"data": "trec-dl19-passage-pool", "split": "test", "rel": 2}
    spec = {"kind": "compare", "base": str(base), "variants": variants, "reference": "response_kl",
            "seeds": list(SEEDS), "evaluate": evaluate, "measures": ["nDCG@10", "R@100"],
            "output_dir": str(work / dataset), "results": os.path.relpath(RESULTS / f"{dataset}.json")}
    path = work / dataset / "quality.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def training_seconds(run_dir: Path) -> tuple[float, float] | None:
    """From a row's log: the wall time of its training loop (its steps, the mid-run dev evaluation and
    checkpoint), and of its optimizer steps alone: the step that follows an evaluation also pays for it
    and its checkpoint, so the steps' time is the mean of the other steps' times, times the step count."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    previous, after_eval, plain = 0.0, False, []
    for record in records:
        if "eval" in record:
            after_eval = record["step"] > 0
        elif isinstance(record.get("seconds"), (int, float)):
            if not after_eval:
                plain.append(record["seconds"] - previous)
            previous, after_eval = record["seconds"], False
    steps = sum(1 for record in records if "eval" not in record and "seconds" in record)
    return (round(previous, 1), round(sum(plain) / len(plain) * steps, 1)) if plain else None


def ledger_path(dataset: str) -> Path:
    return RESULTS / f"{dataset}.json"


def table_rows(ledgers: dict[str, dict]) -> tuple[dict, dict, float]:
    """The ledgers as the table reads them: ``{dataset/method/seedS: {nDCG@10, R@100, seconds, ...}}``,
    the out-of-domain scores of SciFact's seed-0 rows, and the compute of every row ever trained."""
    rows, ood, compute = {}, {}, 0.0
    for dataset, ledger in ledgers.items():
        for row in ledger["rows"].values():
            found = {**row["splits"]["test"]["aggregate"], "seconds": row.get("wall_seconds") or 0.0}
            found.update({k: row[k] for k in ("train_seconds", "step_seconds") if k in row})
            rows[key(dataset, row["variant"], row["seed"])] = found
            if OOD in row["splits"] and row["seed"] == 0 and row["variant"] in MAIN:
                ood[row["variant"]] = row["splits"][OOD]["aggregate"]
            compute += found["seconds"] + sum(old.get("wall_seconds") or 0.0 for old in row.get("history", []))
    return rows, ood, compute


def expected_rows() -> list[str]:
    return [key(d, m, s) for s in SEEDS for d in DATASETS for m in MAIN
            if not (MAIN[m].get("job") == "evaluate" and s)] + [key("scifact", m, 0) for m in ABLATIONS]


def _cell(values: list[float]) -> str:
    from leadkd.compare.report import mean_std

    return mean_std(values)


DISCUSSION_MARKER = "<!-- hand-written below this line; quality.py keeps it -->"


def _paired_delta(rows_: dict, dataset: str, method: str, baseline: str = "response_kl") -> str:
    """nDCG@10 of ``method`` minus ``baseline`` within each seed (same data order and init), mean ± std."""
    deltas = []
    for seed in SEEDS:
        a, b = rows_.get(key(dataset, method, seed)), rows_.get(key(dataset, baseline, seed))
        if a and b:
            deltas.append(a["nDCG@10"] - b["nDCG@10"])
    if not deltas:
        return "—"
    return f"{deltas[0]:+.4f}" if len(deltas) == 1 else \
        f"{statistics.mean(deltas):+.4f} ± {statistics.stdev(deltas):.4f}"


def write_table(ledgers: dict[str, dict]) -> None:
    """docs/results.md from the ledgers: main rows mean ± std over seeds, ablations, out-of-domain.

    Everything below DISCUSSION_MARKER in the existing page is kept, so the analysis can be written by hand.
    """
    from leadkd.runtime.fileio import atomic_write

    rows_, ood, compute = table_rows(ledgers)
    trained = [r["train_seconds"] for r in rows_.values() if r.get("train_seconds")]
    stepped = [r["step_seconds"] for r in rows_.values() if r.get("step_seconds")]
    done = set(expected_rows()) <= set(rows_)
    lines = ["# Results", "", ("Generated by `benchmarks/quality.py` from the `leadkd compare` ledgers "
                              "`benchmarks/results/quality/<dataset>.json`; see that script's docstring for the "
                              "protocol. Mean ± sample std over the seeds finished so far (n in brackets). Rows not "
                              "yet run show —. Δ is the difference to response-KD within the same seed."),
             "", "```bash",
             "LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py   # resumable; fills what is missing",
             "```", "",
             f"Settings: `{json.dumps(SETTINGS)}`", "",
             f"{'Total compute' if done else 'Compute so far'}: {compute / 3600:.2f} h "
             f"on a 2-core CPU, {len(rows_)} of {len(expected_rows())} rows"
             + (f"; a row's 60 optimizer steps take {min(stepped) / 60:.1f}–{max(stepped) / 60:.1f} min, its "
                f"training loop (the steps, one mid-run dev evaluation and a checkpoint) "
                f"{min(trained) / 60:.1f}–{max(trained) / 60:.1f} min, the whole row (plus step-0 and final dev "
                "evaluations, test and TREC DL scoring) up to "
                f"{max(r['seconds'] for r in rows_.values()) / 60:.1f} min" if stepped else "") + ".", ""]
    for dataset, test in (("scifact", "test"), ("nfcorpus", "dev (train held-out 10% for selection)")):
        lines += [f"## {dataset} — {test}", "", "| method | nDCG@10 | R@100 | Δ nDCG@10 vs response_kl | n |",
                  "|---|---:|---:|---:|---:|"]
        for method in MAIN:
            found = [r for k, r in rows_.items() if k.startswith(f"{dataset}/{method}/")]
            delta = (_paired_delta(rows_, dataset, method)
                     if method not in ("teacher", "student_init", "response_kl") else "")
            lines.append(f"| {method} | {_cell([r['nDCG@10'] for r in found])} | "
                         f"{_cell([r['R@100'] for r in found])} | {delta} | {len(found)} |")
        lines.append("")
    lines += ["## Ablations — scifact test, seed 0", "", "| variant | nDCG@10 | R@100 |", "|---|---:|---:|"]
    for method in ["lead", *ABLATIONS]:
        row = rows_.get(key("scifact", method, 0))
        lines.append(f"| {method} | {_cell([row['nDCG@10']] if row else [])} | "
                     f"{_cell([row['R@100']] if row else [])} |")
    lines += ["", "## Out of domain — SciFact-trained models (seed 0) on the TREC DL 2019 judged pool",
              "", "nDCG@10 graded; R@100 with relevance ≥ 2.", "", "| method | nDCG@10 | R(rel=2)@100 |",
              "|---|---:|---:|"]
    for method in MAIN:
        row = ood.get(method)
        lines.append(f"| {method} | {_cell([row['nDCG@10']] if row else [])} | "
                     f"{_cell([row['R(rel=2)@100']] if row else [])} |")
    kept = ""
    if TABLE.is_file() and DISCUSSION_MARKER in TABLE.read_text(encoding="utf-8"):
        kept = TABLE.read_text(encoding="utf-8").split(DISCUSSION_MARKER, 1)[1]
    with atomic_write(TABLE) as handle:
        handle.write("\n".join(lines) + "\n\n" + DISCUSSION_MARKER + (kept or "\n"))


def retire(ledger: dict, name: str, work: Path, why: str) -> None:
    """Move a finished row into the ledger's ``retired`` history and its run folder aside, so `leadkd
    compare` trains it from scratch; the new row takes that history over."""
    dataset, method, seed = name.split("/")
    old = ledger["rows"].pop(f"{method}/{seed}", None)
    history = ledger.setdefault("retired", {}).get(f"{method}/{seed}") or (old or {}).pop("history", [])
    if old is not None:
        history.append({**old, "why": why, "replaced": time.strftime("%Y-%m-%d")})
    ledger["retired"][f"{method}/{seed}"] = history
    run_dir = work / dataset / method / seed
    if run_dir.is_dir():
        run_dir.rename(run_dir.with_name(f"{seed}.before-{time.strftime('%Y%m%d-%H%M%S')}"))


def finish_rows(ledger: dict, work: Path) -> None:
    """What the table adds to compare's rows: training-loop and step times, and a retired row's history."""
    for row_key, row in ledger["rows"].items():
        if "step_seconds" not in row and row.get("job") != "evaluate" and not row.get("migrated") \
                and (times := training_seconds(Path(row["model"]).parent)):
            row["train_seconds"], row["step_seconds"] = times
        if history := ledger.get("retired", {}).pop(row_key, None):
            row["history"] = history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.relpath(HERE / "runs" / "quality"),
                        help="models and logs (not committed)")
    parser.add_argument("--only", choices=DATASETS, default=None)
    parser.add_argument("--max-rows", type=int, default=None, help="stop after this many new rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerun", nargs="+", default=[], metavar="KEY",
                        help="finished rows to train again from scratch, e.g. scifact/lead/seed0")
    parser.add_argument("--why", default=None, help="the reason for --rerun, kept in each row's history")
    args = parser.parse_args()
    if args.rerun and not args.why:
        parser.error("--rerun needs --why (the reason is kept beside the old values)")
    for name in args.rerun:
        if name not in expected_rows():
            parser.error(f"--rerun {name}: no such row; rows look like {expected_rows()[0]}")
    import torch

    from leadkd.compare.report import render_compare
    from leadkd.compare.run import load_ledger, load_spec, run_compare, save_ledger

    torch.set_num_threads(args.threads)
    os.chdir(HERE.parent)  # every path in the specs and ledgers is relative to the repository root
    work, budget = Path(os.path.relpath(args.work)), args.max_rows
    for dataset in DATASETS:
        if args.only not in (None, dataset):
            continue
        spec = load_spec(spec_file(dataset, work))
        ledger = load_ledger(spec.ledger)
        for name in [n for n in args.rerun if n.startswith(f"{dataset}/")]:
            retire(ledger, name, work, args.why)
        save_ledger(spec.ledger, ledger)
        if budget is None or budget > 0:
            before = len(ledger["rows"])
            ledger = run_compare(spec, log=lambda m, d=dataset: print(f"{d}: {m}", flush=True), max_rows=budget)
            budget = None if budget is None else budget - (len(ledger["rows"]) - before)
        finish_rows(ledger, work)
        save_ledger(spec.ledger, ledger)
        render_compare(ledger, RESULTS / dataset)
    write_table({d: load_ledger(ledger_path(d)) for d in DATASETS})


if __name__ == "__main__":
    main()
