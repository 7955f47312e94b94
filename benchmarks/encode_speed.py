"""Passage-encoding speed: leadkd's encode (``accel.cpu.encode_passages``, what `leadkd encode` runs) vs
``SentenceTransformer.encode``.

Same model (all-MiniLM-L6-v2), same SciFact passages, same length limit (256), same thread count, same
batch size. The two are timed in alternation (the order flips every round) so that load from other
processes hits both alike; the medians are reported, and the ratio of medians is the headline figure.
The embeddings must agree (max abs difference printed and stored) or the comparison means nothing.

    OMP_WAIT_POLICY=PASSIVE is set here before torch is imported: with OpenMP's default busy-waiting,
    two threads stall 10-50x whenever anything else runs on the machine.

Usage::

    python benchmarks/encode_speed.py --data-dir ../shared/data [--passages 1000] [--rounds 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def read_passages(data_dir: Path, count: int, seed: int) -> list[str]:
    """``count`` SciFact passages ("title text", as BEIR encodes them), a seeded sample of the corpus."""
    corpus = data_dir / "scifact" / "corpus.jsonl"
    if not corpus.is_file():
        sys.exit(f"{corpus}: not found; pass --data-dir or set LEADKD_DATA_DIR to the BEIR data folder")
    docs = []
    with corpus.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                doc = json.loads(line)
                docs.append(f"{doc.get('title', '')} {doc.get('text', '')}".strip())
    return random.Random(seed).sample(docs, min(count, len(docs)))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("LEADKD_DATA_DIR"))
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="leadkd's batch size (default: its own)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="leadkd's token budget (default: its own)")
    parser.add_argument("--st-batch-sizes", default="32",
                        help="comma-separated ST batch sizes to time; the first is the reference (32: ST's default)")
    parser.add_argument("--ablations", action="store_true",
                        help="also time leadkd without each speed-up (fusion, token budget), to attribute the gain")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encode_speed.json")
    args = parser.parse_args()
    if args.data_dir is None:
        sys.exit("pass --data-dir or set LEADKD_DATA_DIR to the BEIR data folder")

    torch.set_num_threads(args.threads)
    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    import leadkd
    from leadkd.accel import cpu as accel
    from leadkd.models import DualEncoder
    from leadkd.models.base import resolve_model_path

    passages = read_passages(Path(args.data_dir), args.passages, args.seed)
    path = resolve_model_path(args.model)
    ours = DualEncoder.from_pretrained(path, max_passage_length=args.max_length)
    theirs = SentenceTransformer(path, device="cpu")
    theirs.max_seq_length = args.max_length
    tokens = ours.tokenizer(passages, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = [len(t) for t in tokens]

    encode_kwargs = {}
    if args.batch_size is not None:
        encode_kwargs["batch_size"] = args.batch_size
    if args.max_batch_tokens is not None:
        encode_kwargs["max_batch_tokens"] = args.max_batch_tokens
    st_sizes = [int(x) for x in args.st_batch_sizes.split(",")]
    reference = f"sentence_transformers_bs{st_sizes[0]}"
    runs = {"leadkd": lambda texts: accel.encode_passages(ours, texts, **encode_kwargs)}
    if args.ablations:
        def variant(fuse: bool, **kwargs):
            return lambda texts: accel.encode_passages(ours, texts, fuse=fuse, **kwargs)

        runs["leadkd_no_fusion"] = variant(False, **encode_kwargs)
        runs["leadkd_bs32"] = variant(True, batch_size=32, max_batch_tokens=0)
        runs["leadkd_bs32_no_fusion"] = variant(False, batch_size=32, max_batch_tokens=0)
    for size in st_sizes:
        runs[f"sentence_transformers_bs{size}"] = (
            lambda texts, size=size: theirs.encode(texts, batch_size=size, convert_to_numpy=True))
    for run in runs.values():  # warm-up: first-call allocations, lazy imports
        run(passages[:64])

    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, np.ndarray] = {}
    load_before = os.getloadavg()
    names = list(runs)
    for round_ in range(args.rounds):
        shift = round_ % len(names)  # rotate the order so no library always runs first
        for name in names[shift:] + names[:shift]:
            start_cpu, start = time.process_time(), time.perf_counter()
            outputs[name] = runs[name](passages)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"round {round_ + 1} {name:>28}: {len(passages) / wall[name][-1]:7.2f} passages/s "
                  f"(cpu {cpu[name][-1]:.1f} s)", flush=True)
    load_after = os.getloadavg()

    max_diff = max(float(np.abs(outputs["leadkd"] - outputs[name]).max()) for name in runs if name != "leadkd")
    ratio_to_reference = {name: round(speed_ratio, 3) for name, speed_ratio in
                          ((n, statistics.median(wall[reference]) / statistics.median(wall[n])) for n in runs)}
    speed = {name: len(passages) / statistics.median(values) for name, values in wall.items()}
    cpu_speed = {name: len(passages) / statistics.median(values) for name, values in cpu.items()}
    ratios = [b / a for a, b in zip(wall["leadkd"], wall[reference], strict=True)]
    result = {
        "benchmark": "encode_speed",
        "model": args.model,
        "data": f"scifact corpus, {len(passages)} passages (seeded sample, seed {args.seed}), 'title text'",
        "tokens": {"max_length": args.max_length, "mean": statistics.mean(lengths),
                   "truncated_share": sum(n >= args.max_length for n in lengths) / len(lengths)},
        "threads": args.threads,
        "leadkd_encode_kwargs": encode_kwargs or "defaults",
        "st_batch_sizes": st_sizes,
        "rounds": args.rounds,
        "passages_per_s": {name: round(value, 2) for name, value in speed.items()},
        "ratio": round(speed["leadkd"] / speed[reference], 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "speed_vs_reference": ratio_to_reference,
        "seconds": {name: [round(v, 2) for v in values] for name, values in wall.items()},
        "cpu_seconds": {name: [round(v, 2) for v in values] for name, values in cpu.items()},
        "ratio_cpu_time": round(cpu_speed["leadkd"] / cpu_speed[reference], 3),
        "max_abs_diff": max_diff,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "versions": {"leadkd": leadkd.__version__, "sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps({k: result[k] for k in ("passages_per_s", "ratio", "ratio_per_round", "ratio_cpu_time",
                                             "max_abs_diff")}))
    if max_diff > 1e-4:
        sys.exit(f"embeddings disagree (max abs diff {max_diff:.2e}); not writing {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
