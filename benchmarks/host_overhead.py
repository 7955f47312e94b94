"""Host time per training step outside the models: what the training process spends on each batch besides
the forward, backward and optimizer, before and after the loader's workers (issue #25).

At the GPU benchmark's shapes (``benchmarks/gpu/speed.py``: 32 queries x (1 + 7) SciFact passages, queries
32 and passages 128 tokens), with all-MiniLM-L6-v2's BERT tokenizer for the student and a ColBERT-format
teacher input on the same tokenizer ([Q]/[D] markers, [MASK]-padded queries):

- **in the step** (``data.workers: 0``, what every step did before): drawing the batch (sampling and
  collating in the training process), then tokenising the student's and the teacher's views there;
- **workers** (``data.workers: 2``, the CUDA default): the time the training process waits in
  ``next(loader)`` for a batch the workers sampled and tokenised, while each step's device work is stood
  in for by an idle wait of the predicted H200 step (34 ms, docs/benchmarks.md), during which the
  workers run;
- **sentence-transformers**: its MultipleNegativesRankingLoss step's host part, the data collator's
  ``model.tokenize`` of the batch's 9 columns, in the training process (its trainer's default
  ``dataloader_num_workers=0``);
- **handover**: one worker and a 1 s stand-in step, so the worker has filled its queue and idles: what
  is left is handing a batch over (the floor on a host whose cores keep up);
- **loader throughput**: tokenised passages per second (both views) the loader delivers with 1, 2 and 4
  workers when nothing else runs;
- **pre-tokenised**: the student's passage view made once per passage, then each batch gathered from the
  stored ids and padded (what a memory-mapped token store would cost per batch);
- **the CPU step with workers**: seconds per LEAD step on this CPU (MiniLM teacher, 3-layer student) with
  ``data.workers`` 0 and 2, why 0 is the CPU default.

Medians over ``--batches`` batches. What the models' code reads back from the device each step (the
non-finite check and the logged figures before; transformers' padding-mask check in every forward) costs
GPU waits, not host compute, and cannot be timed here: ``tests/test_trainer.py`` shows the step now reads
nothing between log steps. On this 2-core machine the workers share the cores with the timing process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/host_overhead.py [--batches 40]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: The predicted H200 step of the GPU benchmark's 12-layer teacher + 6-layer student (docs/benchmarks.md).
H200_STEP_S = 0.034


def loader(dataset, batch: int, workers: int, tokenizers):
    from leadkd.data.batches import group_loader

    return group_loader(dataset, batch, seed=0, num_workers=workers, tokenizers=tokenizers if workers else None)


def batches_forever(made):
    while True:
        yield from made


def in_step(dataset, args, tokenizers) -> list[float]:
    """Seconds per batch: drawing it in the training process, then tokenising both views there."""
    source = batches_forever(loader(dataset, args.batch, 0, None))
    times = []
    for _ in range(args.batches + 2):
        started = time.perf_counter()
        batch = next(source)
        for tokenize in tokenizers.values():
            tokenize(batch.queries, batch.passages)
        times.append(time.perf_counter() - started)
    return times[2:]


def with_workers(dataset, args, tokenizers, workers: int, step_s: float = H200_STEP_S) -> list[float]:
    """Seconds the training process waits for each batch while an idle wait of ``step_s`` stands in for the
    device step (a long one: the workers are always ahead, and what is left is handing a batch over)."""
    source = batches_forever(loader(dataset, args.batch, workers, tokenizers))
    next(source)  # the workers start and fill their queues
    time.sleep(2.0)
    times = []
    for _ in range(args.batches):
        started = time.perf_counter()
        batch = next(source)
        times.append(time.perf_counter() - started)
        assert set(batch.inputs.unpacked()) == set(tokenizers)
        time.sleep(step_s)
    return times


def cpu_steps(folder: Path, groups_file: Path, student_dir: str, workers: int, steps: int) -> float:
    """Seconds per LEAD step on this CPU (MiniLM teacher trained jointly, its blocks 0, 2, 4 as the student,
    8 queries x (1 + 7) passages at 32/128 tokens) with ``data.workers`` loader workers."""
    from leadkd.config import load_config
    from leadkd.distill.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        settings = [f"data.corpus={folder}", f"data.train_groups={groups_file}", "data.num_negatives=7",
                    f"data.workers={workers}", "optim.batch_size=8", "optim.steps=100000", "eval.split=null",
                    "checkpoint.every=null", "log_every=1000", f"output_dir={out}", f"teacher.path={student_dir}",
                    "student.init=teacher_layers=[0,2,4]", "layers.k=2", "teacher.max_query_length=32",
                    "teacher.max_passage_length=128", "student.max_query_length=32", "student.max_passage_length=128"]
        trainer = Trainer(load_config(None, settings, kind="distill"), log=lambda m: None, show_progress=False)
        trainer._iterator = trainer._batches()
        for _ in range(2):
            trainer.train_step()
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        seconds = (time.perf_counter() - started) / steps
        trainer.close()
    return seconds


def throughput(dataset, args, tokenizers, workers: int) -> float:
    """Tokenised passages per second the loader delivers, nothing else running."""
    source = batches_forever(loader(dataset, args.batch, workers, tokenizers))
    next(source)
    count = max(args.batches, 4 * workers)
    started = time.perf_counter()
    passages = sum(len(next(source).passages) for _ in range(count))
    return passages / (time.perf_counter() - started)


def pretokenised(dataset, args, tokenizer) -> dict:
    """The alternative to tokenising each batch: every passage's token ids made once (a flat int32 array and
    row offsets, as a memory-mapped store would hold them), then each batch's passages gathered and padded.
    Returns the one-off cost per passage and the per-batch cost, for the student's view."""
    groups = dataset.groups
    keys = sorted({int(k) for g in range(len(groups)) for k in (*groups.positive_keys(g), *groups.negative_keys(g))})
    started = time.perf_counter()
    rows = []
    for start in range(0, len(keys), 256):
        texts = [groups.passage(k) for k in keys[start:start + 256]]
        prepared, limit = tokenizer.prepared(texts, "passage")
        rows += tokenizer.tokenizer(prepared, truncation=True, max_length=limit)["input_ids"]
    once_s = time.perf_counter() - started
    flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows])
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    where = {groups.passage_id(k): i for i, k in enumerate(keys)}
    pad = tokenizer.tokenizer.pad_token_id
    source = batches_forever(loader(dataset, args.batch, 0, None))
    times = []
    for _ in range(args.batches):
        batch = next(source)
        wanted = [where[pid] for pid in batch.passage_ids]
        started = time.perf_counter()
        lengths = offsets[np.add(wanted, 1)] - offsets[wanted]
        ids = np.full((len(wanted), int(lengths.max())), pad, dtype=np.int64)
        for row, (i, n) in enumerate(zip(wanted, lengths, strict=True)):
            ids[row, :n] = flat[offsets[i]:offsets[i] + n]
        mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
        torch.from_numpy(ids), torch.from_numpy(mask)
        times.append(time.perf_counter() - started)
    return {"once_ms_per_passage": round(1000 * once_s / len(keys), 3),
            "gather_ms_per_batch": round(1000 * statistics.median(times), 3)}


def sentence_transformers_host(student_dir: str, dataset, args) -> list[float]:
    """Seconds per batch of its collator's tokenisation of the 9 columns (anchor, positive, 7 negatives)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(student_dir, device="cpu")
    group = args.negatives + 1
    source = batches_forever(loader(dataset, args.batch, 0, None))
    times = []
    for _ in range(args.batches + 2):
        batch = next(source)
        started = time.perf_counter()
        for j, texts in enumerate([batch.queries] + [batch.passages[j::group] for j in range(group)]):
            model.max_seq_length = args.query_length if j == 0 else args.passage_length
            model.tokenize(texts)
        times.append(time.perf_counter() - started)
    return times[2:]


#: MS MARCO passages' mean length in characters (the collection's 8.8M passages: ~56 words).
MSMARCO_PASSAGE_CHARS = 330


def cut_texts(corpus_file: Path, chars: int) -> None:
    """Cut every passage of a BEIR corpus to its first ``chars`` characters, in place."""
    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    corpus_file.write_text("".join(json.dumps({**row, "title": "", "text": (row.get("title", "") + " "
                                                                          + row["text"]).strip()[:chars]}) + "\n"
                                   for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--cpu-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=7)
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--passage-length", type=int, default=128)
    parser.add_argument("--output", default=str(HERE / "results" / "host_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from leadkd.data.batches import GroupDataset
    from leadkd.data.datasets import load_corpus, load_queries
    from leadkd.data.groups import read_training_groups
    from leadkd.models.base import resolve_model_path
    from leadkd.models.colbert import ColBERT
    from leadkd.models.dual_encoder import DualEncoder
    from train_speed import make_data

    student_dir = resolve_model_path("all-MiniLM-L6-v2")
    lengths = {"max_query_length": args.query_length, "max_passage_length": args.passage_length}
    tokenizers = {"student": DualEncoder.from_pretrained(student_dir, **lengths).batch_tokenizer(),
                  "teacher": ColBERT.from_pretrained(student_dir, **lengths).batch_tokenizer()}
    needed = args.batch * (1 + args.negatives) / H200_STEP_S
    result: dict = {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("batch", "negatives", "query_length", "passage_length")},
        "views": {"student": "dual encoder (BERT tokenizer)", "teacher": "ColBERT ([Q]/[D] markers, [MASK] queries)"},
        "goal_ms": 5.0, "h200_step_s": H200_STEP_S, "passages_per_s_an_h200_step_needs": round(needed),
        "texts": {}}
    # SciFact's abstracts as they are (~1,500 characters), and cut to MS MARCO's mean passage (~330 characters)
    for name, chars in (("scifact", None), ("msmarco_length", MSMARCO_PASSAGE_CHARS)):
        with tempfile.TemporaryDirectory() as tmp:
            folder, groups_file = make_data(Path(tmp), docs=2000, groups=512, negatives=args.negatives)
            if chars:
                cut_texts(folder / "corpus.jsonl", chars)
            corpus = load_corpus(str(folder))
            groups = read_training_groups(groups_file, corpus=corpus, queries=load_queries(str(folder)))
            dataset = GroupDataset(groups, negatives=args.negatives, seed=0)
            ms = {"in_step": [1000 * t for t in in_step(dataset, args, tokenizers)]}
            for workers in (1, 2, 4):
                ms[f"workers_{workers}"] = [1000 * t for t in with_workers(dataset, args, tokenizers, workers)]
            # one worker, a 1 s stand-in step: the worker has filled its queue and idles, so the wait is the
            # handing over itself, not a core shared with busy workers (this machine has two)
            ms["handover"] = [1000 * t for t in with_workers(dataset, args, tokenizers, 1, step_s=1.0)]
            ms["sentence_transformers"] = [1000 * t for t in sentence_transformers_host(student_dir, dataset, args)]
            if name == "msmarco_length":  # why data.workers is 0 on a CPU host: the step's own threads
                torch.set_num_threads(os.cpu_count() or 1)
                result["cpu_lead_step_ms"] = {f"workers_{w}": round(1000 * cpu_steps(folder, groups_file, student_dir,
                                                                                       w, args.cpu_steps), 1)
                                              for w in (0, 2)}
                torch.set_num_threads(1)
            rates = {f"workers_{w}": round(throughput(dataset, args, tokenizers, w)) for w in (1, 2, 4)}
            stored = pretokenised(dataset, args, tokenizers["student"])
            result["texts"][name] = {
                "mean_chars": round(statistics.mean(len(corpus.passages([i])[0]) for i in range(len(corpus)))),
                "main_process_ms_per_step": {k: round(statistics.median(v), 2) for k, v in ms.items()},
                "p90_ms": {k: round(sorted(v)[int(0.9 * (len(v) - 1))], 2) for k, v in ms.items()},
                "loader_passages_per_s": rates, "pretokenised_student_view": stored}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
