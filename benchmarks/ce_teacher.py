"""A cross-encoder teacher on real data, end to end through the formats users bring (issue #14).

1. Warm a cross-encoder up on SciFact's training groups with `leadkd train`: all-MiniLM-L6-v2's backbone
   under the Hugging Face sequence-classification head (``model.cross_encoder_head:
   sequence_classification``: BERT's pooler and a fresh, seeded classifier), so the run saves a plain
   ``BertForSequenceClassification`` folder that transformers and sentence-transformers open as they are.
2. Reopen that folder through the new path (``load_model``: kind, head and activation read from it) and
   check its scores against transformers' own logits and sentence-transformers' ``CrossEncoder.predict``.
3. Score the teacher on dev and test by reranking all-MiniLM-L6-v2's top 100 (a cross-encoder cannot
   search), beside that first stage.
4. Distil the 3-layer student (MiniLM's blocks 0, 2, 4; the quality table's init, lengths and negatives)
   from the frozen cross-encoder with LEAD, checkpoint chosen on dev; score it on test.

    LEADKD_DATA_DIR=../shared/data nice python benchmarks/ce_teacher.py

Every stage resumes (training jobs from their checkpoints, scores from the results file), and the
results go to benchmarks/results/ce_teacher.json (docs/teachers.md shows them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "ce_teacher.json"

import quality  # noqa: E402  (its prepare(): the MiniLM teacher folder, the student init and mined groups)

#: 120 steps at lr 1e-4: at 3e-5 the fresh classifier had barely moved after 80 steps (loss 1.358 against
#: ln 4 = 1.386 for a uniform guess over the 4 candidates); the encoder under it is MiniLM's, already trained.
TEACHER_STEPS = 120
DISTILL_STEPS = 100
RERANK_DEPTH = 100
CE_SETTINGS = {"model.kind": "cross_encoder", "model.cross_encoder_head": "sequence_classification",
               "model.max_passage_length": 160, "optim.lr": 1e-4}


def _overrides(values: dict) -> list[str]:
    return [f"{key}={json.dumps(value) if value is None else value}" for key, value in values.items()]


def warm_up_teacher(data: dict, out: Path) -> Path:
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    settings = quality.SETTINGS
    run_job(load_config(None, _overrides({
        "model.path": str(data["teacher"]), **CE_SETTINGS, "data.corpus": str(data["folder"]),
        "data.train_groups": str(data["groups"]), "data.num_negatives": settings["negatives"],
        "optim.batch_size": settings["batch_size"], "optim.steps": TEACHER_STEPS, "optim.cpu_dropout": False,
        "eval.split": None, "checkpoint.every": 40, "seed": 0, "output_dir": str(out)}), kind="train"),
        resume=True, log=lambda m: print(m, flush=True))
    return out / "final"


def check_formats(folder: Path, data: dict) -> dict:
    """The saved teacher is a sequence-classification folder; leadkd, transformers and sentence-transformers
    give it the same scores."""
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from leadkd.data.datasets import load_dataset
    from leadkd.models import load_model

    dataset = load_dataset(data["folder"], split=data["splits"]["dev"])
    queries = [dataset.queries.text(i) for i in range(4)]
    passages = [dataset.corpus.passage(i) for i in range(4)]
    ours = load_model(folder)
    mine = ours.score_pairs(queries, passages)
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        inputs = tokenizer(queries, passages, truncation="only_second", max_length=ours.max_length, padding=True,
                           return_tensors="pt")
        logits = hf(**inputs).logits[:, 0].numpy()
    st = STCrossEncoder(str(folder), max_length=ours.max_length, device="cpu")
    predicted = st.predict(list(zip(queries, passages, strict=True)), activation_fn=torch.nn.Identity())
    config = json.loads((folder / "config.json").read_text())
    return {"architectures": config.get("architectures"), "kind": ours.kind, "head": ours.options.head,
            "max_abs_diff_transformers": float(np.abs(mine - logits).max()),
            "max_abs_diff_sentence_transformers": float(np.abs(mine - np.asarray(predicted)).max())}


def first_stage_and_rerank(teacher: Path, data: dict, split: str) -> dict:
    """MiniLM's exact top-100 and the cross-encoder's rerank of it: the measures of both."""
    from leadkd.data.datasets import load_dataset
    from leadkd.models import load_model
    from leadkd.models.dual_encoder import DualEncoder
    from leadkd.retrieval.evaluate import evaluate
    from leadkd.retrieval.pipeline import encode_corpus, encode_queries, search_run
    from leadkd.retrieval.rerank import rerank_run

    dataset = load_dataset(data["folder"], split=split)
    first = DualEncoder.from_pretrained(data["teacher"])
    run = search_run(encode_queries(first, dataset.queries, show_progress=False),
                     encode_corpus(first, dataset.corpus, show_progress=False), RERANK_DEPTH)
    started = time.perf_counter()
    reranked = rerank_run(load_model(teacher), run, dataset.queries, dataset.corpus, depth=RERANK_DEPTH)
    seconds = time.perf_counter() - started
    measures = ["nDCG@10", "R@100"]
    return {"first_stage": evaluate(run, dataset.qrels, measures=measures)[0],
            "reranked": evaluate(reranked, dataset.qrels, measures=measures)[0], "rerank_seconds": round(seconds, 1)}


def distil(teacher: Path, data: dict, base: Path, out: Path) -> Path:
    from leadkd.config import load_config
    from leadkd.distill.trainer import run_job

    run_job(load_config(base, _overrides({
        "teacher.path": str(teacher), "teacher.kind": "cross_encoder", "teacher.train": False,
        "teacher.max_passage_length": CE_SETTINGS["model.max_passage_length"],
        "optim.steps": DISTILL_STEPS, "eval.every": DISTILL_STEPS // 2, "checkpoint.every": DISTILL_STEPS // 2,
        "output_dir": str(out)}), kind="distill"), resume=True, log=lambda m: print(m, flush=True))
    return out / "best" if (out / "best").is_dir() else out / "final"


def score_dense(folder: Path, data: dict, split: str) -> dict:
    from leadkd.data.datasets import load_dataset
    from leadkd.models.dual_encoder import DualEncoder
    from leadkd.retrieval.pipeline import evaluate_layers

    rows = evaluate_layers(DualEncoder.from_pretrained(folder), load_dataset(data["folder"], split=split),
                           measures=["nDCG@10", "R@100"])
    return {m: rows[-1][m] for m in ("nDCG@10", "R@100")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(HERE / "runs" / "quality"), help="models and runs (not committed)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from leadkd.runtime.fileio import atomic_write

    torch.set_num_threads(args.threads)
    os.chdir(HERE.parent)
    work = Path(os.path.relpath(args.work))
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}

    def stage(name, compute):
        if name not in results:
            wall, cpu = time.perf_counter(), time.process_time()
            value = compute()
            results[name] = {"value": value, "wall_seconds": round(time.perf_counter() - wall, 1),
                             "cpu_seconds": round(time.process_time() - cpu, 1)}
            with atomic_write(RESULTS) as handle:
                json.dump(results, handle, indent=1)
                handle.write("\n")
        print(f"{name}: {results[name]['value']}", flush=True)
        return results[name]["value"]

    base, data = quality.base_config("scifact", work)
    data = {**data, **quality.prepare("scifact", work)}
    teacher = work / "scifact" / f"teacher-ce-hf-{TEACHER_STEPS}"
    stage("teacher_warmup", lambda: str(warm_up_teacher(data, teacher)))
    stage("formats", lambda: check_formats(teacher / "final", data))
    for split in ("dev", "test"):
        stage(f"teacher_{split}",
              lambda split=split: first_stage_and_rerank(teacher / "final", data, data["splits"][split]))
    stage("student_init_test", lambda: score_dense(data["init"], data, data["splits"]["test"]))
    student = Path(stage("student_lead_distill", lambda: str(distil(teacher / "final", data, base, work / "scifact"
                                                                     / f"ce-hf-lead-{DISTILL_STEPS}"))))
    stage("student_lead_test", lambda: score_dense(student, data, data["splits"]["test"]))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
