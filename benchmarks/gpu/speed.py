"""GPU speed, in one run: the chip's bf16 matrix rate, passage encoding and training steps, leadkd against
sentence-transformers on the same models, each as achieved TFLOP/s and as a fraction of that rate.

Models are built from configs with random weights (nothing heavy travels to the accelerator machine);
the tokenizer is BERT-base's (all-MiniLM-L6-v2 ships it) and the texts are SciFact's when found.

- matmul: an 8192^3 bf16 product, the ceiling every other figure is a fraction of;
- encode: BERT-base (12 x 768) at 256 tokens, both libraries with bf16 weights (sentence-transformers'
  recommendation for GPU inference: ``model_kwargs={"torch_dtype": torch.bfloat16}``, which equals its
  ``.to(torch.bfloat16)``), sentence-transformers at its default batch size 32 and at 128 and 256, leadkd
  as ``leadkd encode --dtype bfloat16`` runs it (leadkd.accel.cuda) and without the accelerator module;
- train: a 12-layer teacher and a 6-layer student (both 768 wide) trained jointly, 32 queries x (1 + 7)
  passages, 32/128 tokens, bf16 autocast: the LEAD step, the response-only step, the student's
  contrastive step, and sentence-transformers' MultipleNegativesRankingLoss step of the same student;
- a profile of each training step (top kernels, share of the wall time the GPU was busy), so that any
  figure that falls short of its target comes with what explains it.

Usage (benchmarks/gpu/run.sh is the accelerator machine's one command)::

    python benchmarks/gpu/speed.py --output-dir benchmarks/results        # on a GPU
    python benchmarks/gpu/speed.py --dry-run --output-dir /tmp/gpu         # tiny shapes on the CPU
    python benchmarks/gpu/speed.py --table benchmarks/results/gpu_speed.json --docs docs/benchmarks.md
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from table import TARGETS, render_table, replace_block  # noqa: E402

from train_speed import SentenceTransformersStep, paired_ratio  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

#: Shapes of the real run and of the dry run (tiny, CPU: it checks the script, not the speed).
SHAPES = {
    "gpu": dict(matmul=8192, matmul_repeats=20, encoder=dict(layers=12, hidden=768, heads=12, intermediate=3072),
                teacher=dict(layers=12, hidden=768, heads=12, intermediate=3072),
                student=dict(layers=6, hidden=768, heads=12, intermediate=3072),
                passages=16384, compiled_passages=4096, max_length=256, rounds=3, st_batch_sizes=(32, 128, 256),
                batch=32, negatives=7, query_length=32, passage_length=128, k=5, steps=10, repeats=5,
                profile_steps=3),
    "dry": dict(matmul=256, matmul_repeats=3, encoder=dict(layers=2, hidden=64, heads=2, intermediate=128),
                teacher=dict(layers=4, hidden=64, heads=2, intermediate=128),
                student=dict(layers=2, hidden=64, heads=2, intermediate=128),
                passages=96, compiled_passages=48, max_length=64, rounds=2, st_batch_sizes=(32, 64),
                batch=4, negatives=3, query_length=16, passage_length=32, k=2, steps=2, repeats=2, profile_steps=1),
}


# ------------------------------------------------------------------------------------------ timing

class Clock:
    """Wall seconds of a callable, the device drained before and after (kernels run asynchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def matmul_rate(device: torch.device, n: int, repeats: int) -> dict:
    """TFLOP/s of an n^3 bf16 product on random data (zeros run faster and would flatter every fraction),
    the median over ``repeats`` products after three warm-ups, timed with CUDA events on a GPU."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(Clock(device).seconds(lambda: a @ b))
    seconds = statistics.median(times)
    return {"n": n, "dtype": "bfloat16", "tflops": 2 * n ** 3 / seconds / 1e12,
            "ms": [round(t * 1e3, 4) for t in times]}


def encoder_flops(lengths, layers: int, hidden: int, intermediate: int) -> float:
    """Forward FLOPs of a BERT encoder over sequences of these token counts: per layer and token, the
    Q/K/V/output projections (8 h^2) and the feed-forward (4 h f); per layer and sequence, the attention
    products (4 t^2 h). Embeddings, norms and softmax are left out (under 1% here)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    per_token = 8 * hidden ** 2 + 4 * hidden * intermediate
    return float(layers * (lengths.sum() * per_token + 4 * hidden * (lengths ** 2).sum()))


# ------------------------------------------------------------------------------------------ inputs

def find_assets(assets: Path | None) -> Path:
    """A folder with BERT-base's tokenizer files: ``--assets`` (run.sh carries one), else the
    all-MiniLM-L6-v2 package leadkd depends on."""
    if assets is not None:
        return assets
    from leadkd.models.base import resolve_model_path

    return Path(resolve_model_path("all-MiniLM-L6-v2"))


def read_texts(corpus: Path | None, count: int, tokenizer_dir: Path, seed: int = 0) -> tuple[list[str], str]:
    """``count`` passages ("title text", as BEIR encodes them): the corpus file's, repeated in a seeded
    order when it has fewer; without one, seeded word salad from the tokenizer's vocabulary."""
    rng = random.Random(seed)
    if corpus is not None and corpus.is_file():
        from leadkd.data.formats import read_corpus_jsonl

        collection = read_corpus_jsonl(corpus)
        docs = collection.passages(range(len(collection)))
        order = [docs[i % len(docs)] for i in range(count)]
        rng.shuffle(order)
        return order, f"{corpus.parent.name} corpus ({len(docs)} passages, cycled to {count})"
    words = [w for w in (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").split() if w.isalpha()][:20000]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 300))) for _ in range(count)]
    return texts, f"synthetic word salad ({count} passages)"


def build_model_folder(path: Path, tokenizer_dir: Path, shape: dict, max_length: int, seed: int) -> Path:
    """A sentence-transformers folder (BERT from ``shape``, random weights, mean pooling, normalised):
    what both libraries load, so both run the very same weights."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    hf = path.parent / f"{path.name}-hf"
    hf.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab = sum(1 for _ in (tokenizer_dir / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(vocab_size=vocab, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                        max_position_embeddings=512)
    BertModel(config).save_pretrained(hf)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, hf / name)
    transformer = Transformer(str(hf), max_seq_length=max_length)
    SentenceTransformer(modules=[transformer, Pooling(shape["hidden"], "mean"), Normalize()],
                        device="cpu").save(str(path))
    shutil.rmtree(hf)
    return path


# ------------------------------------------------------------------------------------------ encode

def cli_batch_size(device: torch.device) -> int:
    """What `leadkd encode` batches by default on this device."""
    from leadkd.cli import CPU_BATCH_SIZE, GPU_BATCH_SIZE

    return GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def load_encoders(device: torch.device, folder: Path, max_length: int, copies: int = 1):
    """``copies`` leadkd models and one sentence-transformers model of ``folder``, all with bf16 weights."""
    from sentence_transformers import SentenceTransformer

    from leadkd.models import DualEncoder

    ours = [DualEncoder.from_pretrained(folder, max_passage_length=max_length).to(device=device, dtype=torch.bfloat16)
            for _ in range(copies)]
    theirs = SentenceTransformer(str(folder), device=str(device)).to(torch.bfloat16)
    theirs.max_seq_length = max_length
    return ours, theirs


def passage_flops(model, texts: list[str], shapes: dict) -> tuple[float, list[int]]:
    """The forward FLOPs of encoding ``texts`` at their token counts, and those counts."""
    shape = shapes["encoder"]
    lengths = [len(ids) for ids in
               model.tokenizer(texts, truncation=True, max_length=shapes["max_length"])["input_ids"]]
    return encoder_flops(lengths, shape["layers"], shape["hidden"], shape["intermediate"]), lengths


def time_rounds(runs: dict, rounds: int, clock: Clock, label: str, count: int) -> dict[str, list[float]]:
    """Seconds of each run per round, the order rotated every round so no variant always runs first."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(clock.seconds(runs[name]))
            print(f"{label} round {round_ + 1} {name:>32}: {count / seconds[name][-1]:9.1f} passages/s", flush=True)
    return seconds


def encode_variants(seconds: dict[str, list[float]], count: int, flops: float, matmul: float) -> dict:
    """Per variant: passages/s, its seconds, achieved TFLOP/s and share of the matmul rate (medians)."""
    variants = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        variants[name] = {"passages_per_s": count / median, "seconds": [round(v, 4) for v in values],
                          "tflops": flops / median / 1e12, "fraction_of_matmul": flops / median / 1e12 / matmul}
    return variants


def bench_encode(device: torch.device, folder: Path, texts: list[str], shapes: dict, matmul: float) -> dict:
    from leadkd import accel
    from leadkd.models import DualEncoder

    max_length, shape = shapes["max_length"], shapes["encoder"]
    (ours,), theirs = load_encoders(device, folder, max_length)
    flops, lengths = passage_flops(ours, texts, shapes)
    gpu_batch = cli_batch_size(device)
    ours_fp32 = DualEncoder.from_pretrained(folder, max_passage_length=max_length).to(device)
    runs = {
        "leadkd": lambda: accel.encode_passages(ours, texts, batch_size=gpu_batch),
        "leadkd_without_accel": lambda: ours.encode_passages(texts, batch_size=gpu_batch),
        # fp32 weights under bf16 autocast: what the trainer's dev evaluation runs.
        "leadkd_autocast_fp32_weights": lambda: accel.encode_passages(ours_fp32, texts, batch_size=gpu_batch,
                                                                      bf16=True),
    }
    for size in shapes["st_batch_sizes"]:
        runs[f"sentence_transformers_bs{size}"] = (
            lambda size=size: theirs.encode(texts, batch_size=size, convert_to_numpy=True))
    clock = Clock(device)
    outputs = {name: run() for name, run in runs.items()}  # warm-up; each output kept for the agreement check
    seconds = time_rounds(runs, shapes["rounds"], clock, "encode", len(texts))
    variants = encode_variants(seconds, len(texts), flops, matmul)
    st_names = [f"sentence_transformers_bs{size}" for size in shapes["st_batch_sizes"]]
    best_st = min(st_names, key=lambda n: statistics.median(seconds[n]))
    reference = np.asarray(outputs[st_names[0]], dtype=np.float32)
    agreement = {}
    for name in runs:
        vectors = np.asarray(outputs[name], dtype=np.float32)
        cosine = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
        agreement[name] = {"min_cosine_to_st": float(cosine.min()),
                           "max_abs_diff_to_st": float(np.abs(vectors - reference).max())}
    subset = texts[:4096]
    profiled = {"leadkd": lambda: accel.encode_passages(ours, subset, batch_size=gpu_batch),
                "leadkd_without_accel": lambda: ours.encode_passages(subset, batch_size=gpu_batch),
                best_st: lambda: theirs.encode(subset, batch_size=int(best_st.rsplit("bs", 1)[1]),
                                               convert_to_numpy=True)}
    profiles = {f"encode {name} ({len(subset)} passages)": profile_steps(fn, device, 1)
                for name, fn in profiled.items()}
    for name, prof in zip(profiled, profiles.values(), strict=True):
        variants[name]["gpu_busy_share"] = prof["gpu_busy_share"]
    return {
        "model": {**shape, "pooling": "mean", "normalize": True, "weights": "random (config-built)"},
        "passages": len(texts), "max_length": max_length, "mean_tokens": statistics.mean(lengths),
        "truncated_share": sum(n >= max_length for n in lengths) / len(lengths), "dtype": "bfloat16 weights",
        "leadkd_batch_size": gpu_batch, "variants": variants, "agreement": agreement,
        "best_sentence_transformers": best_st,
        "ratios": {"leadkd_over_st_default": paired_ratio(seconds[st_names[0]], seconds["leadkd"]),
                   "leadkd_over_st_best": paired_ratio(seconds[best_st], seconds["leadkd"]),
                   "accel_gain": paired_ratio(seconds["leadkd_without_accel"], seconds["leadkd"])},
        "profiles": profiles,
    }


# ------------------------------------------------------------------------------------------ train

def write_training_data(root: Path, texts: list[str], groups: int, negatives: int, seed: int = 0) -> tuple[Path, Path]:
    """A BEIR folder over ``texts`` and a training-groups file: query i is passage i's first 40 words
    (so it fills 32 tokens), its positive passage i, its negatives drawn at random."""
    from leadkd.data.formats import write_beir_qrels

    rng = random.Random(seed)
    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    docs = texts[:max(groups * 2, negatives + 2)]
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(docs):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as handle:
        for i in range(groups):
            handle.write(json.dumps({"_id": f"q{i}", "text": " ".join(docs[i].split()[:40])}) + "\n")
    write_beir_qrels(folder / "qrels" / "train.tsv", {f"q{i}": {f"d{i}": 1} for i in range(groups)})
    groups_file = root / "groups.jsonl"
    with open(groups_file, "w", encoding="utf-8") as handle:
        for i in range(groups):
            others = rng.sample([j for j in range(len(docs)) if j != i], negatives)
            handle.write(json.dumps({"query_id": f"q{i}", "positives": [f"d{i}"],
                                     "negatives": [f"d{j}" for j in others]}) + "\n")
    return folder, groups_file


def make_trainer(kind: str, root: Path, folder: Path, groups: Path, teacher: Path, student: Path, shapes: dict):
    from leadkd.config import load_config
    from leadkd.distill.trainer import Trainer

    common = [f"data.corpus={folder}", f"data.train_groups={groups}", f"data.num_negatives={shapes['negatives']}",
              f"optim.batch_size={shapes['batch']}", "optim.steps=100000", "optim.bf16=true", "eval.split=null",
              "checkpoint.every=null", f"output_dir={root / kind}"]
    lengths = [f"max_query_length={shapes['query_length']}", f"max_passage_length={shapes['passage_length']}"]
    if kind == "contrastive":
        config = load_config(None, common + [f"model.path={student}"] + [f"model.{x}" for x in lengths], kind="train")
    else:
        layer = "none" if kind == "response_kd" else "lead"
        config = load_config(None, common + [f"teacher.path={teacher}", f"student.path={student}",
                                             f"loss.layer={layer}", f"layers.k={shapes['k']}"]
                             + [f"teacher.{x}" for x in lengths] + [f"student.{x}" for x in lengths], kind="distill")
    trainer = Trainer(config, log=lambda m: None, show_progress=False)
    trainer._iterator = trainer._batches()
    return trainer


def busy_share(intervals, wall_s: float) -> float:
    """Share of ``wall_s`` covered by the union of ``(start_us, end_us)`` kernel intervals (kernels on
    other streams may overlap; counted once)."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        covered += stop - max(start, end)
        end = stop
    return covered / 1e6 / wall_s


def profile_steps(step, device: torch.device, count: int) -> dict:
    """torch.profiler over ``count`` steps: the top operators by device (else CPU) time, and the share of
    the wall time the GPU spent in kernels (low: the step waits on the host, launches or syncs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clock = Clock(device)
    with profile(activities=activities) as prof:
        wall = clock.seconds(lambda: [step() for _ in range(count)])
    averages = prof.key_averages()
    busy, sort = None, "self_cpu_time_total"
    if device.type == "cuda":
        sort = "self_device_time_total"
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = busy_share(kernels, wall) if kernels else sum(e.self_device_time_total for e in averages) / 1e6 / wall
    return {"wall_s": wall, "steps": count, "gpu_busy_share": busy,
            "table": averages.table(sort_by=sort, row_limit=18, max_name_column_width=60)}


def tokenize_time(folder: Path, batch, shapes: dict) -> float:
    """Host seconds to tokenise one training batch once (its queries and passages at their lengths), the
    median of five: what each step pays on the host before the GPU can start, per model that tokenises."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def once() -> None:
        tokenizer(batch.queries, truncation=True, max_length=shapes["query_length"], padding=True, return_tensors="pt")
        tokenizer(batch.passages, truncation=True, max_length=shapes["passage_length"], padding=True,
                  return_tensors="pt")

    once()
    return statistics.median(Clock(torch.device("cpu")).seconds(once) for _ in range(5))


def bench_train(device: torch.device, root: Path, texts: list[str], tokenizer_dir: Path, shapes: dict,
                matmul: float) -> dict:
    teacher = build_model_folder(root / "teacher", tokenizer_dir, shapes["teacher"], shapes["passage_length"], 1)
    student = build_model_folder(root / "student", tokenizer_dir, shapes["student"], shapes["passage_length"], 2)
    groups = max(4 * shapes["batch"], 64)
    folder, groups_file = write_training_data(root, texts, groups, shapes["negatives"])
    trainers = {kind: make_trainer(kind, root, folder, groups_file, teacher, student, shapes)
                for kind in ("lead", "response_kd", "contrastive")}
    steps = {kind: trainer.train_step for kind, trainer in trainers.items()}
    st_args = SimpleNamespace(query_length=shapes["query_length"], passage_length=shapes["passage_length"],
                              negatives=shapes["negatives"])
    steps["sentence_transformers"] = SentenceTransformersStep(student, trainers["contrastive"], st_args,
                                                              device=str(device), bf16=True).step
    clock = Clock(device)
    for step in steps.values():  # warm-up: allocator growth, cuBLAS handles, autotuning
        for _ in range(3):
            step()
        clock.sync()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(shapes["repeats"]):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            steps[name]()  # one untimed step after switching variants
            seconds[name].append(
                clock.seconds(lambda: [steps[name]() for _ in range(shapes["steps"])])  # noqa: B023  (called at once)
                / shapes["steps"])
        print(f"train repeat {repeat + 1}: " + ", ".join(f"{n} {v[-1] * 1e3:.1f} ms" for n, v in seconds.items()),
              flush=True)
    host_tokenize_ms = tokenize_time(student, next(trainers["contrastive"]._batches()), shapes) * 1e3
    b, n = shapes["batch"], shapes["batch"] * (1 + shapes["negatives"])
    tokens_q, tokens_p = [shapes["query_length"]] * b, [shapes["passage_length"]] * n

    def forward(shape: dict) -> float:
        return (encoder_flops(tokens_q, shape["layers"], shape["hidden"], shape["intermediate"])
                + encoder_flops(tokens_p, shape["layers"], shape["hidden"], shape["intermediate"]))

    # Forward + backward = 3 forwards for each trained model; both models train in the joint steps.
    flops = {"lead": 3 * (forward(shapes["teacher"]) + forward(shapes["student"]))}
    flops["response_kd"] = flops["lead"]
    flops["contrastive"] = flops["sentence_transformers"] = 3 * forward(shapes["student"])
    variants = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        variants[name] = {"ms_per_step": median * 1e3, "ms": [round(v * 1e3, 3) for v in values],
                          "tflops": flops[name] / median / 1e12,
                          "fraction_of_matmul": flops[name] / median / 1e12 / matmul}
    profiles = {f"train {name}": profile_steps(steps[name], device, shapes["profile_steps"]) for name in steps}
    for name, prof in zip(steps, profiles.values(), strict=True):
        variants[name]["gpu_busy_share"] = prof["gpu_busy_share"]
    return {
        "shapes": {"teacher": shapes["teacher"], "student": shapes["student"],
                   "batch": f"{b} queries x (1 + {shapes['negatives']}) passages, in-batch negatives",
                   "query_length": shapes["query_length"], "passage_length": shapes["passage_length"],
                   "k": trainers["lead"].config.layers.k, "precision": "bf16 autocast, fp32 weights (both libraries)",
                   "flops_counted_at": "the padded lengths (queries are cut to fill them, passages too)"},
        "steps_per_block": shapes["steps"], "repeats": shapes["repeats"], "variants": variants,
        "host_tokenize_ms_per_batch": host_tokenize_ms,
        "ratios": {"lead_over_response_kd": paired_ratio(seconds["lead"], seconds["response_kd"]),
                   "ours_contrastive_speed_over_st": paired_ratio(seconds["sentence_transformers"],
                                                                  seconds["contrastive"])},
        "profiles": profiles,
    }


# ------------------------------------------------------------------------------------------ report

def read_junit(path: Path | None) -> dict | None:
    """The pytest -m gpu outcome (run.sh runs it first and writes JUnit XML)."""
    if path is None or not path.is_file():
        return None
    suites = ElementTree.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_tests": failed, "seconds": float(suite.get("time", 0.0))}


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2 ** 30, 1))
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def targets(result: dict) -> dict:
    """Each issue-16 target with its measured value and whether it is met (None when not measured)."""
    values = {
        "lead_over_response_kd": result.get("train", {}).get("ratios", {}).get("lead_over_response_kd"),
        "ours_contrastive_speed_over_st":
            result.get("train", {}).get("ratios", {}).get("ours_contrastive_speed_over_st"),
        "encode_over_st_best": result.get("encode", {}).get("ratios", {}).get("leadkd_over_st_best"),
    }
    out = {}
    for name, (bound, direction) in TARGETS.items():
        value = values[name]
        met = None if value is None else (value <= bound if direction == "<=" else value >= bound)
        out[name] = {"value": value, "target": f"{direction} {bound}", "met": met}
    return out


def bench_compiled_encode(device: torch.device, folder: Path, texts: list[str], shapes: dict, matmul: float,
                          st_batch: int) -> dict:
    """leadkd's encode with its backbone compiled (leadkd.accel.cuda.compiled; experimental) against its
    plain encode and sentence-transformers at ``st_batch``, paired as in :func:`bench_encode`; the time
    the compilation took is reported apart (it is paid once per process)."""
    from leadkd import accel
    from leadkd.accel import cuda

    max_length = shapes["max_length"]
    (plain, to_compile), theirs = load_encoders(device, folder, max_length, copies=2)
    flops, _ = passage_flops(plain, texts, shapes)
    batch = cli_batch_size(device)
    clock = Clock(device)
    runs = {"leadkd": lambda: accel.encode_passages(plain, texts, batch_size=batch),
            "leadkd_compiled": lambda: accel.encode_passages(to_compile, texts, batch_size=batch),
            f"sentence_transformers_bs{st_batch}": lambda: theirs.encode(texts, batch_size=st_batch,
                                                                         convert_to_numpy=True)}
    with cuda.compiled(to_compile):
        compile_s = clock.seconds(runs["leadkd_compiled"])  # compiles, for the first batch shapes and then dynamic
        outputs = {name: run() for name, run in runs.items()}
        seconds = time_rounds(runs, shapes["rounds"], clock, "compiled", len(texts))
    difference = float(np.abs(outputs["leadkd_compiled"] - outputs["leadkd"]).max())
    st = f"sentence_transformers_bs{st_batch}"
    return {
        "passages": len(texts), "max_length": max_length, "first_call_s": compile_s,
        "max_abs_diff_compiled_vs_plain": difference,
        "variants": encode_variants(seconds, len(texts), flops, matmul),
        "ratios": {"compiled_over_st": paired_ratio(seconds[st], seconds["leadkd_compiled"]),
                   "compiled_over_plain": paired_ratio(seconds["leadkd"], seconds["leadkd_compiled"])},
    }


def write_result(result: dict, output_dir: Path, name: str) -> None:
    """The result so far, written atomically after each section (a timeout loses only the section it
    cuts short); the profiles go beside it as text."""
    from leadkd.runtime.fileio import atomic_write

    result = {**result, "targets": targets(result)}
    profiles = {}
    for section in ("encode", "train"):
        if section in result:
            block = dict(result[section])
            profiles.update(block.pop("profiles", {}))
            result[section] = block
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(output_dir / f"{name}.json") as handle:
        handle.write(json.dumps(result, indent=2) + "\n")
    if profiles:
        with atomic_write(output_dir / f"{name}_profiles.txt") as handle:
            for variant, prof in profiles.items():
                busy = "-" if prof["gpu_busy_share"] is None else f"{100 * prof['gpu_busy_share']:.0f}%"
                handle.write(f"== {variant}: {prof['steps']} call(s) in {prof['wall_s'] * 1e3:.1f} ms, "
                             f"GPU busy {busy}\n{prof['table']}\n\n")


def pick_device(dry_run: bool) -> torch.device:
    """The CPU (two threads) for a dry run, else the first GPU; without one, stop with what to run instead."""
    if dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    sys.exit("no CUDA device: run with --dry-run to check the script on the CPU")


def default_corpus(corpus: Path | None) -> Path | None:
    """``--corpus``, else SciFact's under ``$LEADKD_DATA_DIR`` (else None: read_texts makes texts up)."""
    if corpus is None and os.environ.get("LEADKD_DATA_DIR"):
        return Path(os.environ["LEADKD_DATA_DIR"]) / "scifact" / "corpus.jsonl"
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU: checks the script, not the speed")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--assets", type=Path, default=None, help="folder with BERT-base tokenizer files "
                        "(default: all-MiniLM-L6-v2's, from its package)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="BEIR corpus.jsonl to take texts from (default: $LEADKD_DATA_DIR/scifact/corpus.jsonl)")
    parser.add_argument("--tests-junit", type=Path, default=None, help="pytest -m gpu's JUnit XML, to report with")
    parser.add_argument("--only", choices=("encode", "train", "compiled"), nargs="+", default=None,
                        help="sections to run (default: encode and train; 'compiled' alone writes "
                             "gpu_speed_compiled.json, run.sh runs it last under its own timeout)")
    parser.add_argument("--table", type=Path, default=None,
                        help="render this result JSON (and its _compiled sibling, if any) as a table and stop")
    parser.add_argument("--docs", type=Path, default=None,
                        help="with --table: the markdown file whose GPU block to replace")
    args = parser.parse_args()
    if args.table is not None:
        table = render_table(*read_results(args.table))
        if args.docs is not None:
            args.docs.write_text(replace_block(args.docs.read_text(encoding="utf-8"), table), encoding="utf-8")
        print(table)
        return

    shapes = SHAPES["dry" if args.dry_run else "gpu"]
    device = pick_device(args.dry_run)
    only = set(args.only or ("encode", "train"))
    compiled_only = only == {"compiled"}
    if "compiled" in only and not compiled_only:
        sys.exit("--only compiled runs alone (it has its own timeout in run.sh)")
    tokenizer_dir = find_assets(args.assets)
    texts, source = read_texts(default_corpus(args.corpus), shapes["passages"], tokenizer_dir)
    import sentence_transformers
    import transformers

    import leadkd

    name = "gpu_speed" + ("_compiled" if compiled_only else "") + ("_dry_run" if args.dry_run else "")
    result: dict = {"benchmark": name, "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "machine": machine(device), "texts": source,
                    "versions": {"leadkd": leadkd.__version__, "torch": torch.__version__,
                                 "cuda": torch.version.cuda, "transformers": transformers.__version__,
                                 "sentence_transformers": sentence_transformers.__version__,
                                 "python": platform.python_version()},
                    "correctness": read_junit(args.tests_junit)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leadkd-gpu-") as scratch:
        root = Path(scratch)
        result["matmul"] = matmul_rate(device, shapes["matmul"], shapes["matmul_repeats"])
        rate = result["matmul"]["tflops"]
        print(f"bf16 matmul {shapes['matmul']}^3: {rate:.1f} TFLOP/s", flush=True)
        write_result(result, args.output_dir, name)
        if "encode" in only or compiled_only:
            folder = build_model_folder(root / "encoder", tokenizer_dir, shapes["encoder"], shapes["max_length"], 0)
        if compiled_only:  # against the batch size the main run found best for sentence-transformers
            main_result = args.output_dir / f"{name.replace('_compiled', '')}.json"
            main_encode = json.loads(main_result.read_text()).get("encode", {}) if main_result.is_file() else {}
            best = main_encode.get("best_sentence_transformers")
            st_batch = int(best.rsplit("bs", 1)[1]) if best else shapes["st_batch_sizes"][-1]
            result["encode_compiled"] = bench_compiled_encode(device, folder, texts[:shapes["compiled_passages"]],
                                                              shapes, rate, st_batch)
            print(json.dumps(result["encode_compiled"]["ratios"]), flush=True)
        if "encode" in only:
            result["encode"] = bench_encode(device, folder, texts, shapes, rate)
            print(json.dumps(result["encode"]["ratios"]), flush=True)
            write_result(result, args.output_dir, name)
        if "train" in only:
            result["train"] = bench_train(device, root, texts, tokenizer_dir, shapes, rate)
            print(json.dumps(result["train"]["ratios"]), flush=True)
    result["seconds"] = time.perf_counter() - started
    write_result(result, args.output_dir, name)
    print(render_table(*read_results(args.output_dir / f"{name}.json")) if not compiled_only else "")
    print(f"wrote {args.output_dir / (name + '.json')} in {result['seconds']:.0f} s")


def read_results(path: Path) -> tuple[dict, dict | None]:
    """A result JSON and its ``_compiled`` sibling (None when that step did not run or was cut short)."""
    result = json.loads(path.read_text(encoding="utf-8"))
    stem = path.stem.replace("_dry_run", "")
    sibling = path.with_name(f"{stem}_compiled{'_dry_run' if path.stem.endswith('_dry_run') else ''}.json")
    compiled = json.loads(sibling.read_text(encoding="utf-8")) if sibling.is_file() else None
    return result, compiled


if __name__ == "__main__":
    main()
