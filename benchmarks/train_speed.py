"""Training-step speed: LEAD vs response-only KD vs our contrastive step vs sentence-transformers'.

Same student (all-MiniLM-L6-v2's blocks 0, 2, 4), same teacher (all-MiniLM-L6-v2, trained jointly as
in the paper), same batch (B queries x (1 + n) SciFact passages), same lengths and threads, all in one
process, interleaved in a rotating order with one untimed step before each timed block (steady-state
steps, as in a long run); each ratio is the median over repeats of the ratio within a repeat (wall time,
and CPU time alongside). Reported as ratios:

- LEAD / response-KD step time           (target <= 1.10)
- sentence-transformers / ours, contrastive step of the student alone   (target >= 1.1)
- LEAD with a frozen, cached teacher / the student-only contrastive step (target <= 1.10): the step the
  long runs rely on, once the teacher's vectors are cached (one untimed epoch fills the cache first)
- LEAD from a teacher score file (``teacher.scores``, the MiniLM teacher's, every layer) / the student-only
  contrastive step (target <= 1.05), and LEAD from a cross-encoder teacher's score file / the same step
  with that cross-encoder frozen and run online on each query's own group (the step it replaces)
- ``leadkd score-teacher`` throughput (groups/s, every layer) / the same teacher's plain scoring of the
  same pairs (target >= 0.9): for the cross-encoder its ``score_pairs`` (final score only, pairs sorted
  by length, what ``leadkd rerank`` runs), for the dual encoder its final-score-only ``encode_batch`` of
  the same groups

The sentence-transformers step is its MultipleNegativesRankingLoss (in-batch + hard negatives, scale
20, the loss it trains retrievers with) on the same texts, then fused AdamW as its trainer's default;
ours is the leadkd trainer's own step (also fused AdamW), so both pay for the same optimizer.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_speed.py [--steps 5 --repeats 3]
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
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_data(root: Path, docs: int, groups: int, negatives: int) -> tuple[Path, Path]:
    """A SciFact slice as a BEIR folder and a training-groups file over it (random negatives)."""
    import random

    from leadkd.data.datasets import load_dataset
    from leadkd.data.formats import write_beir_qrels, write_corpus_jsonl, write_queries_jsonl

    data = load_dataset("scifact", split="train")
    rng = random.Random(0)
    query_rows = list(range(min(groups, len(data.queries))))
    positives = [next(iter(data.qrels[data.queries.id_at(i)])) for i in query_rows]
    keep = list(dict.fromkeys(positives + [data.corpus.id_at(i) for i in range(docs)]))
    folder = root / "data"
    write_corpus_jsonl(folder / "corpus.jsonl", data.corpus.subset([data.corpus.index(d) for d in keep]))
    write_queries_jsonl(folder / "queries.jsonl", data.queries.subset(query_rows))
    write_beir_qrels(folder / "qrels" / "train.tsv",
                     {data.queries.id_at(i): {p: 1} for i, p in zip(query_rows, positives, strict=True)})
    groups_file = root / "groups.jsonl"
    with open(groups_file, "w") as handle:
        for i, positive in zip(query_rows, positives, strict=True):
            negs = rng.sample([d for d in keep if d != positive], negatives)
            handle.write(json.dumps({"query_id": data.queries.id_at(i), "positives": [positive],
                                     "negatives": negs}) + "\n")
    return folder, groups_file


def make_trainer(kind: str, root: Path, args, folder: Path, groups: Path, student_dir: Path):
    from leadkd.config import load_config
    from leadkd.distill.trainer import Trainer

    common = [f"data.corpus={folder}", f"data.train_groups={groups}", f"data.num_negatives={args.negatives}",
              f"optim.batch_size={args.batch}", "optim.steps=100000", "eval.split=null", "checkpoint.every=null",
              f"output_dir={root / kind}"]
    lengths = [f"max_query_length={args.query_length}", f"max_passage_length={args.passage_length}"]
    if kind == "contrastive":
        config = load_config(None, common + [f"model.path={student_dir}"] + [f"model.{x}" for x in lengths],
                             kind="train")
    else:
        layer = "none" if kind == "response_kd" else "lead"
        frozen = ["teacher.train=false", "teacher.cache=true"] if kind == "lead_frozen_cached" else []
        teacher = ["teacher.path=all-MiniLM-L6-v2"] + [f"teacher.{x}" for x in lengths]
        if kind in ("lead_scores", "lead_ce_scores"):  # no teacher runs: its scores are read from the file
            teacher = [f"teacher.scores={root / kind.replace('lead_', '')}", "teacher.train=false"]
        elif kind == "lead_online_ce":
            teacher = [f"teacher.path={root / 'ce'}", "teacher.kind=cross_encoder", "teacher.train=false",
                       "loss.teacher_candidates=own_group"]  # its folder's pair length: query + passage tokens
        config = load_config(None, common + frozen + teacher + [f"student.path={student_dir}", f"loss.layer={layer}",
                                                                f"layers.k={args.k}"]
                             + [f"student.{x}" for x in lengths], kind="distill")
    trainer = Trainer(config, log=lambda m: None, show_progress=False)
    trainer._iterator = trainer._batches()
    return trainer


class SentenceTransformersStep:
    """sentence-transformers' own contrastive training step on the same batches (``bf16``: under autocast,
    as its trainer runs with ``bf16=True``; queries are cut at ``query_length`` tokens as ours are)."""

    def __init__(self, student_dir: Path, trainer, args, device: str = "cpu", bf16: bool = False):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import MultipleNegativesRankingLoss

        self.model = SentenceTransformer(str(student_dir), device=device)
        self.query_length, self.passage_length = args.query_length, args.passage_length
        self.model.train()
        self.loss = MultipleNegativesRankingLoss(self.model)
        # Fused AdamW: what its trainer (transformers' Trainer, optim="adamw_torch_fused") uses on torch >= 2.8.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.0, fused=True)
        self.batches = trainer._batches()
        self.group = args.negatives + 1
        self.autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def tokenize(self, texts: list[str], length: int) -> dict[str, torch.Tensor]:
        self.model.max_seq_length = length  # what its Transformer module truncates at
        return {key: value.to(self.model.device) if isinstance(value, torch.Tensor) else value
                for key, value in self.model.tokenize(texts).items()}

    def step(self) -> None:
        batch = next(self.batches)
        columns = [batch.queries] + [batch.passages[j::self.group] for j in range(self.group)]
        features = [self.tokenize(texts, self.query_length if j == 0 else self.passage_length)
                    for j, texts in enumerate(columns)]
        with self.autocast:
            loss = self.loss(features, labels=None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_steps(step, count: int) -> tuple[float, float]:
    """Wall and CPU seconds per step (CPU time is the steadier one on a shared machine)."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    return (time.perf_counter() - started) / count, (time.process_time() - cpu) / count


def scoring_throughput(root: Path, folder: Path, groups: Path, args) -> dict:
    """Groups per second of ``score-teacher`` (every layer) and of the same teacher's plain scoring, for the
    MiniLM dual encoder and a cross-encoder on MiniLM's backbone; alternated over ``args.repeats`` rounds,
    the ratio the median of each round's. Leaves the score folders ``root/scores`` and ``root/ce_scores``."""
    import shutil

    from leadkd.config import teacher_config
    from leadkd.data.datasets import load_corpus, load_queries
    from leadkd.data.groups import read_training_groups
    from leadkd.distill.score_teacher import score_teacher
    from leadkd.models import CrossEncoder
    from leadkd.models.base import resolve_model_path
    from leadkd.models.dual_encoder import DualEncoder

    CrossEncoder.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"),
                                 max_length=args.query_length + args.passage_length).save_pretrained(root / "ce")
    lengths = [f"max_query_length={args.query_length}", f"max_passage_length={args.passage_length}"]
    teachers = {"scores": teacher_config("all-MiniLM-L6-v2", ["kind=dual_encoder", *lengths]),
                "ce_scores": teacher_config(str(root / "ce"), ["kind=cross_encoder"])}  # the folder's pair length
    every = read_training_groups(groups, corpus=load_corpus(str(folder)), queries=load_queries(str(folder)))
    pairs = [(every.query_text(g), every.passage(k)) for g in range(len(every))
             for k in [*every.positive_keys(g), *every.negative_keys(g)]]
    ce = CrossEncoder.from_pretrained(root / "ce")
    de = DualEncoder.from_pretrained("all-MiniLM-L6-v2", max_query_length=args.query_length,
                                     max_passage_length=args.passage_length)
    size = 1 + args.negatives

    def plain_ce() -> None:
        ce.score_pairs([q for q, _ in pairs], [p for _, p in pairs], batch_size=args.score_batch * size)

    def plain_de() -> None:
        with torch.no_grad():
            for start in range(0, len(every), args.score_batch):
                chunk = range(start, min(start + args.score_batch, len(every)))
                passages = [p for _, p in pairs[start * size:(start + len(chunk)) * size]]
                de.encode_batch([every.query_text(g) for g in chunk], passages, [], final=True).scores()

    def scored(name: str):
        def run() -> None:
            shutil.rmtree(root / name, ignore_errors=True)
            score_teacher(teachers[name], str(folder), str(groups), root / name, batch_size=args.score_batch,
                          log=lambda m: None, show_progress=False)
        return run

    runs = {"de_score_teacher": scored("scores"), "de_plain": plain_de,
            "ce_score_teacher": scored("ce_scores"), "ce_plain": plain_ce}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {"groups": len(every), "pairs": len(pairs), "groups_per_forward": args.score_batch,
            "groups_per_second": {name: len(every) / statistics.median(v) for name, v in seconds.items()},
            "all_seconds": seconds,
            "ratios": {"de_score_teacher_over_plain": paired_ratio(seconds["de_plain"], seconds["de_score_teacher"]),
                       "ce_score_teacher_over_plain": paired_ratio(seconds["ce_plain"], seconds["ce_score_teacher"])}}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of the ratio within each repeat: the two were timed back to back, so a slow
    spell of the machine hits both and cancels out, unlike a ratio of two separate medians."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--query-length", type=int, default=48)
    parser.add_argument("--passage-length", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--score-batch", type=int, default=8, help="groups per score-teacher forward")
    parser.add_argument("--output", default=str(HERE / "results" / "train_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from leadkd.distill.build import student_from_teacher
    from leadkd.models.dual_encoder import DualEncoder

    root = Path(tempfile.mkdtemp(prefix="leadkd-train-speed-"))
    folder, groups = make_data(root, docs=400, groups=200, negatives=args.negatives)
    teacher = DualEncoder.from_pretrained("all-MiniLM-L6-v2", max_query_length=args.query_length,
                                          max_passage_length=args.passage_length)

    class Lengths:
        max_query_length, max_passage_length, pooling, normalize = args.query_length, args.passage_length, None, None

    student_dir = root / "student"
    student_from_teacher(teacher, (0, 2, 4), Lengths).save_pretrained(student_dir)
    scoring = scoring_throughput(root, folder, groups, args)
    print(f"scoring: {json.dumps(scoring['ratios'])}", flush=True)
    variants = {name: make_trainer(name, root, args, folder, groups, student_dir)
                for name in ("lead", "response_kd", "contrastive", "lead_frozen_cached", "lead_scores",
                             "lead_ce_scores", "lead_online_ce")}
    steps = {name: trainer.train_step for name, trainer in variants.items()}
    steps["sentence_transformers"] = SentenceTransformersStep(student_dir, variants["contrastive"], args).step
    for step in steps.values():  # warm-up: first-call allocations, lazy imports
        step()
    for _ in range(len(variants["lead_frozen_cached"].loader)):  # one epoch: every text's teacher vectors cached
        steps["lead_frozen_cached"]()
    cache_fill = variants["lead_frozen_cached"].objective.teacher_cache.filled()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(args.repeats):
        # The order rotates, and each timed block starts after one untimed step of its own: the first step
        # after a different variant pays for re-growing the heap (page faults), which a real run pays once.
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            step = steps[name]
            step()
            wall, used = time_steps(step, args.steps)
            times[name].append(wall)
            cpu[name].append(used)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "seconds_per_step": median,
        "cpu_seconds_per_step": {name: statistics.median(values) for name, values in cpu.items()},
        "all_seconds": times,
        "all_cpu_seconds": cpu,
        "ratios": {"lead_over_response_kd": paired_ratio(times["lead"], times["response_kd"]),
                   "sentence_transformers_over_ours_contrastive": paired_ratio(times["sentence_transformers"],
                                                                               times["contrastive"]),
                   "lead_frozen_cached_over_contrastive": paired_ratio(times["lead_frozen_cached"],
                                                                       times["contrastive"]),
                   "lead_scores_over_contrastive": paired_ratio(times["lead_scores"], times["contrastive"]),
                   "lead_ce_scores_over_lead_online_ce": paired_ratio(times["lead_ce_scores"],
                                                                      times["lead_online_ce"])},
        "cpu_time_ratios": {"lead_over_response_kd": paired_ratio(cpu["lead"], cpu["response_kd"]),
                            "sentence_transformers_over_ours_contrastive": paired_ratio(
                                cpu["sentence_transformers"], cpu["contrastive"]),
                            "lead_frozen_cached_over_contrastive": paired_ratio(
                                cpu["lead_frozen_cached"], cpu["contrastive"]),
                            "lead_scores_over_contrastive": paired_ratio(cpu["lead_scores"], cpu["contrastive"]),
                            "lead_ce_scores_over_lead_online_ce": paired_ratio(cpu["lead_ce_scores"],
                                                                               cpu["lead_online_ce"])},
        "score_teacher": scoring,
        "setup": {"student": "all-MiniLM-L6-v2 blocks 0,2,4", "teacher": "all-MiniLM-L6-v2 (trained jointly)",
                  "batch": f"{args.batch} queries x (1 + {args.negatives}) passages, in-batch negatives",
                  "query_length": args.query_length, "passage_length": args.passage_length, "k": args.k,
                  "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
                  "lead_frozen_cached": f"teacher frozen, its vectors cached after one untimed epoch ({cache_fill})",
                  "lead_scores": "teacher.scores: the MiniLM teacher's score file (every layer, float16)",
                  "lead_ce_scores": "teacher.scores: the cross-encoder teacher's score file (every layer, float16)",
                  "lead_online_ce": "the cross-encoder (MiniLM's backbone, linear head) frozen, run online on "
                                    "each query's own group (loss.teacher_candidates: own_group)"},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "sentence_transformers": __import__("sentence_transformers").__version__,
                     "transformers": __import__("transformers").__version__},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"wall": result["ratios"], "cpu": result["cpu_time_ratios"]}, indent=2))


if __name__ == "__main__":
    main()
