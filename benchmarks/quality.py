"""The result table: LEAD against the baselines at the scale this CPU allows, resumable row by row.

Every row uses the same teacher (all-MiniLM-L6-v2: mean pooling, cosine x 20), the same student init
(its blocks 0, 2, 4), the same mined hard negatives, steps, batch and lengths; only the loss differs.
Checkpoints are chosen on a dev split (SciFact: the derived dev; NFCorpus: 10% of train held out by a
hash of the query id) and the chosen one is scored once on the test split (NFCorpus: its dev split).

    LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py            # everything still missing
    LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py --max-rows 3 --only scifact
    LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py --rerun scifact/lead/seed0 --why "..."

Finished rows live in benchmarks/results/quality.json (rewritten atomically after each row); a rerun
skips them, so the table can be filled across sessions. docs/results.md is regenerated each time.
``--rerun KEY`` trains a finished row again from scratch (after a change to the code it measures): its
old values move to the row's ``history`` with the reason given by ``--why``, so nothing is lost.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quality.json"
TABLE = HERE.parent / "docs" / "results.md"

SETTINGS = {"teacher": "all-MiniLM-L6-v2", "similarity_scale": 20.0, "student_layers": [0, 2, 4],
            "max_query_length": 48, "max_passage_length": 128, "steps": 60, "eval_every": 30, "batch_size": 8,
            "negatives": 3, "lr": 5e-5, "layer_k": 2, "mine": {"depth": 100, "range": [5, 50], "negatives": 20}}
SEEDS = (0, 1, 2)
DATASETS = ("scifact", "nfcorpus")

#: method -> (job kind or None for evaluation only, config overrides)
MAIN = {
    "teacher": (None, {}),
    "student_init": (None, {}),
    "ground_truth": ("train", {}),
    "response_kl": ("distill", {"loss.layer": "none"}),
    "margin_mse": ("distill", {"loss.layer": "none", "loss.response": "margin_mse"}),
    "hidden_mse": ("distill", {"loss.layer": "hidden_mse"}),
    "lead": ("distill", {}),
}
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


def rows() -> list[tuple[str, str, int]]:
    """(dataset, method, seed) in the order they run: seed 0 of everything first, then ablations."""
    out = [(d, m, s) for s in SEEDS for d in DATASETS for m in MAIN if not (m in ("teacher", "student_init") and s)]
    out += [("scifact", m, 0) for m in ABLATIONS]
    return out


def key(dataset: str, method: str, seed: int) -> str:
    return f"{dataset}/{method}/seed{seed}"


def prepare(dataset: str, work: Path) -> dict:
    """Dataset folder with train/dev/test splits, teacher, mined groups and the student init (cached)."""
    from leadkd.data.datasets import available_splits, load_dataset, resolve_dataset
    from leadkd.data.formats import write_beir_qrels
    from leadkd.data.groups import write_training_groups
    from leadkd.distill.trainer import student_from_teacher
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
        teacher = DualEncoder.from_pretrained(SETTINGS["teacher"], similarity_scale=SETTINGS["similarity_scale"], **lengths)
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


def train_row(data: dict, method: str, seed: int, output: Path) -> Path:
    """Train one row (resumable through the trainer's checkpoints); returns the dev-chosen model."""
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    kind, extra = MAIN.get(method) or ("distill", ABLATIONS[method])
    common = [f"data.corpus={data['folder']}", f"data.train_groups={data['groups']}",
              f"data.num_negatives={SETTINGS['negatives']}", f"optim.batch_size={SETTINGS['batch_size']}",
              f"optim.lr={SETTINGS['lr']}", f"optim.steps={SETTINGS['steps']}", f"seed={seed}",
              f"eval.split={data['splits']['dev']}", f"eval.every={SETTINGS['eval_every']}", "log_every=1",
              f"checkpoint.every={SETTINGS['eval_every']}", f"output_dir={output}",
              # The table was made with torch's own dropout, before optim.cpu_dropout existed: a row run
              # again draws the same masks, and a resumed row the masks it started with.
              "optim.cpu_dropout=false"]
    if kind == "train":
        overrides = common + [f"model.path={data['init']}"]
    else:
        overrides = common + [f"teacher.path={data['teacher']}", f"student.path={data['init']}",
                              f"layers.k={SETTINGS['layer_k']}"] + [f"{k}={json.dumps(v)}" for k, v in extra.items()]
    run_job(load_config(None, overrides, kind=kind), resume=True, log=lambda m: print(m, flush=True))
    return output / "best" if (output / "best").is_dir() else output / "final"


def score(model_dir: Path, folder, split: str, rel: int | None = None) -> dict[str, float]:
    from leadkd.data.datasets import load_dataset
    from leadkd.evaluate import evaluate
    from leadkd.models.dual_encoder import DualEncoder
    from leadkd.retrieval.pipeline import encode_corpus, encode_queries, search_run

    dataset = load_dataset(folder, split=split)
    model = DualEncoder.from_pretrained(model_dir)
    run = search_run(encode_queries(model, dataset.queries, show_progress=False),
                     encode_corpus(model, dataset.corpus, show_progress=False), 100)
    aggregate, _ = evaluate(run, dataset.qrels, measures=["nDCG@10", "R@100"], rel=rel)
    return aggregate


def load_results() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"settings": SETTINGS, "rows": {}, "ood": {}, "compute_seconds": 0.0}


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


def save_results(results: dict) -> None:
    from leadkd.fileio import atomic_write

    with atomic_write(RESULTS) as handle:
        json.dump(results, handle, indent=2)
    write_table(results)


def _cell(values: list[float]) -> str:
    from leadkd.compare_report import mean_std

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


def write_table(results: dict) -> None:
    """docs/results.md from the JSON: main rows mean ± std over seeds, ablations, out-of-domain.

    Everything below DISCUSSION_MARKER in the existing page is kept, so the analysis can be written by hand.
    """
    from leadkd.fileio import atomic_write

    rows_ = results["rows"]
    trained = [r["train_seconds"] for r in rows_.values() if r.get("train_seconds")]
    stepped = [r["step_seconds"] for r in rows_.values() if r.get("step_seconds")]
    done = len(rows_) == len(rows())
    lines = ["# Results", "", "Generated by `benchmarks/quality.py` from `benchmarks/results/quality.json`; "
             "see that script's docstring for the protocol. Mean ± sample std over the seeds finished so far "
             "(n in brackets). Rows not yet run show —. Δ is the difference to response-KD within the same seed.",
             "", "```bash", "LEADKD_DATA_DIR=../shared/data python benchmarks/quality.py   # resumable; fills what is missing",
             "```", "",
             f"Settings: `{json.dumps(results['settings'])}`", "",
             f"{'Total compute' if done else 'Compute so far'}: {results.get('compute_seconds', 0) / 3600:.2f} h "
             f"on a 2-core CPU, {len(rows_)} of {len(rows())} rows"
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
            delta = _paired_delta(rows_, dataset, method) if method not in ("teacher", "student_init", "response_kl") else ""
            lines.append(f"| {method} | {_cell([r['nDCG@10'] for r in found])} | "
                         f"{_cell([r['R@100'] for r in found])} | {delta} | {len(found)} |")
        lines.append("")
    lines += ["## Ablations — scifact test, seed 0", "", "| variant | nDCG@10 | R@100 |", "|---|---:|---:|"]
    for method in ["lead", *ABLATIONS]:
        row = rows_.get(key("scifact", method, 0))
        lines.append(f"| {method} | {_cell([row['nDCG@10']] if row else [])} | {_cell([row['R@100']] if row else [])} |")
    lines += ["", "## Out of domain — SciFact-trained models (seed 0) on the TREC DL 2019 judged pool",
              "", "nDCG@10 graded; R@100 with relevance ≥ 2.", "", "| method | nDCG@10 | R(rel=2)@100 |", "|---|---:|---:|"]
    for method in MAIN:
        row = results.get("ood", {}).get(method)
        lines.append(f"| {method} | {_cell([row['nDCG@10']] if row else [])} | "
                     f"{_cell([row['R(rel=2)@100']] if row else [])} |")
    kept = ""
    if TABLE.is_file() and DISCUSSION_MARKER in TABLE.read_text(encoding="utf-8"):
        kept = TABLE.read_text(encoding="utf-8").split(DISCUSSION_MARKER, 1)[1]
    with atomic_write(TABLE) as handle:
        handle.write("\n".join(lines) + "\n\n" + DISCUSSION_MARKER + (kept or "\n"))


def retire(results: dict, name: str, work: Path, why: str) -> None:
    """Move a finished row's values into its history and its run folder aside, so it trains from scratch."""
    old = results["rows"].pop(name, None)
    dataset, method, seed = name.split("/")
    history = (old or {}).pop("history", [])
    if old is not None:
        entry = {**old, "why": why, "replaced": time.strftime("%Y-%m-%d")}
        if dataset == "scifact" and seed == "seed0" and method in results.get("ood", {}):
            entry["ood"] = results["ood"].pop(method)
        history.append(entry)
    results.setdefault("retired", {})[name] = history
    run_dir = work / dataset / method / seed
    if run_dir.is_dir():
        run_dir.rename(run_dir.with_name(f"{seed}.before-{time.strftime('%Y%m%d-%H%M%S')}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(HERE / "runs" / "quality"), help="models and logs (not committed)")
    parser.add_argument("--only", choices=DATASETS, default=None)
    parser.add_argument("--max-rows", type=int, default=None, help="stop after this many new rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerun", nargs="+", default=[], metavar="KEY",
                        help="finished rows to train again from scratch, e.g. scifact/lead/seed0")
    parser.add_argument("--why", default=None, help="the reason for --rerun, kept in each row's history")
    args = parser.parse_args()
    if args.rerun and not args.why:
        parser.error("--rerun needs --why (the reason is kept beside the old values)")
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    results = load_results()
    for row in results["rows"].values():  # rows finished before these times were recorded
        if "step_seconds" not in row and "/" in row["model"] and (times := training_seconds((work / row["model"]).parent)):
            row["train_seconds"], row["step_seconds"] = times
    known = {key(*r): r for r in rows()}
    for name in args.rerun:
        if name not in known:
            parser.error(f"--rerun {name}: no such row; rows look like {key(*rows()[0])}")
        retire(results, name, work, args.why)
    pending = [r for r in rows() if key(*r) not in results["rows"] and (args.only in (None, r[0]))]
    if args.max_rows is not None:
        pending = pending[:args.max_rows]
    prepared: dict[str, dict] = {}
    for dataset, method, seed in tqdm(pending, desc="quality rows", unit="row"):
        started = time.perf_counter()
        data = prepared.setdefault(dataset, prepare(dataset, work))
        if method == "teacher":
            model_dir = data["teacher"]
        elif method == "student_init":
            model_dir = data["init"]
        else:
            model_dir = train_row(data, method, seed, work / dataset / method / f"seed{seed}")
        row = score(model_dir, data["folder"], data["splits"]["test"])
        row.update(seconds=round(time.perf_counter() - started, 1), model=str(model_dir.relative_to(work)))
        if method not in ("teacher", "student_init") and (times := training_seconds(model_dir.parent)):
            row["train_seconds"], row["step_seconds"] = times
        if dataset == "scifact" and seed == 0 and method in MAIN:
            results.setdefault("ood", {})[method] = score(model_dir, "trec-dl19-passage-pool", "test", rel=2)
        history = results.get("retired", {}).pop(key(dataset, method, seed), None)
        if history:
            row["history"] = history
        results["rows"][key(dataset, method, seed)] = row
        results["compute_seconds"] = results.get("compute_seconds", 0.0) + row["seconds"]
        save_results(results)
        print(f"{key(dataset, method, seed)}: nDCG@10 {row['nDCG@10']:.4f} ({row['seconds']:.0f} s)", flush=True)
    save_results(results)  # also keeps times filled in for older rows


if __name__ == "__main__":
    main()
