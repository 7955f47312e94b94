"""A teacher score file at MS MARCO's shape: size on disk, time to write and to open, memory, read cost per step.

Why: "score once, distill many" (docs/training.md) claims that a 12-layer teacher's per-layer scores of all
~500k judged MS MARCO training queries x (1 positive + 100 negatives) fit in ~1.3 GB (float16) and are read
at a negligible cost per step, where the frozen-teacher vector cache needs ~324 GB. This measures that on
synthetic data of exactly that shape (random scores; the checksums, id hashes and layout are the real ones):

- writing: scores, per-row id hashes and checksums through leadkd's writer (``score-teacher`` minus the
  teacher's forward), and the bytes on disk;
- opening, in a fresh process: the full check of every row (checksum, written, finite), warm (the file in
  the page cache) and cold (evicted with ``posix_fadvise(DONTNEED)``), and the process's memory after it;
- one step's read at batch 64 (64 groups' rows, their checksums and id hashes, then 1 + 7 sampled columns
  of 12 + 1 slices), warm and cold, and the memory after 500 steps;
- the sha256 of an MS MARCO-sized groups file (``open`` checks it; the synthetic file is written for it).

Usage::

    nice python benchmarks/score_file_scale.py [--groups 500000] [--candidates 101] [--layers 12] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "score_file_scale.json"
sys.path.insert(0, str(ROOT / "src"))


class SyntheticGroups:
    """Group g: query ``q{g}``, one positive and ``candidates - 1`` negatives with ids ``p{key}``."""

    def __init__(self, count: int, candidates: int):
        self.count, self.candidates = count, candidates
        self.queries = None

    def __len__(self) -> int:
        return self.count

    def query_id(self, g: int) -> str:
        return f"q{g}"

    def positive_keys(self, g: int) -> np.ndarray:
        return np.array([g * self.candidates], dtype=np.int64)

    def negative_keys(self, g: int) -> np.ndarray:
        return np.arange(g * self.candidates + 1, (g + 1) * self.candidates, dtype=np.int64)

    def passage_id(self, key: int) -> str:
        return f"p{key}"


def rss() -> dict[str, int]:
    """Resident memory of this process by kind (kB in /proc): anonymous (the process's own) and file pages."""
    found = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon", "RssFile", "VmHWM")):
                name, value = line.split(":")
                found[name] = int(value.split()[0]) * 1024
    return found


def evict(folder: Path) -> None:
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def write(folder: Path, groups: int, candidates: int, layers: int, chunk: int = 4096) -> dict:
    from leadkd.distill.score_teacher import _Writer
    from leadkd.distill.teacher_scores import group_ids_hash, row_checksum

    meta = {"width": candidates, "layers": list(range(layers)), "dtype": "float16"}
    folder.mkdir(parents=True)
    started = time.perf_counter()
    writer = _Writer(folder, meta, groups, fresh=True)
    synthetic = SyntheticGroups(groups, candidates)
    rng = np.random.default_rng(0)
    for begin in range(0, groups, chunk):
        rows = np.arange(begin, min(begin + chunk, groups))
        scores = rng.normal(20.0, 3.0, size=(len(rows), candidates, layers + 1)).astype(np.float16)
        records = np.zeros((len(rows), 4), dtype=np.int64)
        for i, g in enumerate(rows.tolist()):
            hashed = group_ids_hash(synthetic, g, None)
            records[i] = (1, candidates, hashed, row_checksum(scores[i], 1, candidates, hashed))
        writer.write(rows, scores, records)
    writer.close()
    seconds = time.perf_counter() - started
    files = {f.name: {"bytes": f.stat().st_size, "on_disk": f.stat().st_blocks * 512} for f in folder.iterdir()}
    return {"seconds": round(seconds, 1), "files": files,
            "bytes": sum(f["bytes"] for f in files.values()), "groups_per_second": round(groups / seconds)}


def measure_open(folder: str, groups: int, candidates: int, layers: int, steps: int, cold: bool) -> dict:
    """In this (fresh) process: open and check every row, then ``steps`` reads of batch 64."""
    from leadkd.distill.teacher_scores import TeacherScores

    folder_path = Path(folder)
    if cold:
        evict(folder_path)
    before = rss()
    meta = {"layers": list(range(layers)), "teacher": {"num_layers": layers}, "negatives": None}
    started = time.perf_counter()
    scores = TeacherScores(folder_path, meta, np.load(folder_path / "scores.npy", mmap_mode="r"),
                           np.load(folder_path / "rows.npy", mmap_mode="r"), SyntheticGroups(groups, candidates))
    scores.check_all()
    opened = time.perf_counter() - started
    after_open = rss()
    if cold:
        evict(folder_path)
    rng = np.random.default_rng(1)
    times = []
    asked = sorted(rng.choice(layers, size=5, replace=False).tolist())  # LEAD's K = 5 pairs of a 12-layer teacher
    for _ in range(steps):
        batch = SimpleNamespace(groups=rng.integers(0, groups, size=64).tolist(),
                                columns=__import__("torch").from_numpy(
                                    np.concatenate([np.zeros((64, 1), dtype=np.int64),
                                                    rng.integers(1, candidates, size=(64, 7))], axis=1)))
        started = time.perf_counter()
        values = scores.for_batch(batch, asked)
        times.append(time.perf_counter() - started)
    assert tuple(values.shape) == (6, 64, 8)
    after_steps = rss()
    ms = np.array(times) * 1000
    return {"open_check_seconds": round(opened, 2), "rss_before": before, "rss_after_open": after_open,
            "rss_after_steps": after_steps, "step_read_ms": {"mean": round(float(ms.mean()), 3),
                                                             "p50": round(float(np.median(ms)), 3),
                                                             "p95": round(float(np.percentile(ms, 95)), 3)},
            "steps": steps}


def groups_file_sha256(path: Path, groups: int, candidates: int) -> dict:
    """Write a groups jsonl of this shape (MS MARCO-like ids) and time the sha256 that opening a score file runs."""
    from leadkd.distill.teacher_scores import file_sha256

    rng = np.random.default_rng(2)
    with open(path, "w", encoding="utf-8") as handle:
        for g in range(groups):
            ids = rng.integers(0, 8_841_823, size=candidates)
            handle.write(json.dumps({"query_id": str(1000000 + g), "positives": [str(ids[0])],
                                     "negatives": [str(i) for i in ids[1:]]}) + "\n")
    started = time.perf_counter()
    file_sha256(path)
    return {"bytes": path.stat().st_size, "sha256_seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=500_000)
    parser.add_argument("--candidates", type=int, default=101)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--tmp-dir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        found = measure_open(args.child[0], args.groups, args.candidates, args.layers, args.steps,
                             cold=args.child[1] == "cold")
        print(json.dumps(found))
        return
    work = Path(tempfile.mkdtemp(prefix="leadkd-scores-", dir=args.tmp_dir))
    folder = work / "scores"
    try:
        written = write(folder, args.groups, args.candidates, args.layers)
        opened = {}
        for mode in ("warm", "cold"):
            child = subprocess.run([sys.executable, __file__, "--groups", str(args.groups), "--candidates",
                                    str(args.candidates), "--layers", str(args.layers), "--steps", str(args.steps),
                                    "--child", str(folder), mode], check=True, capture_output=True, text=True)
            opened[mode] = json.loads(child.stdout.strip().splitlines()[-1])
        sha = groups_file_sha256(work / "groups.jsonl", args.groups, args.candidates)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    rows = args.groups * args.candidates
    vector_cache = (8_841_823 + 500_939) * args.layers * 768 * 4  # docs/training.md: every row x layer x dim x 4 B
    result = {
        "shape": {"groups": args.groups, "candidates": args.candidates, "slices": args.layers + 1,
                  "dtype": "float16", "scores": rows * (args.layers + 1)},
        "write": written, "open": opened, "groups_file": sha,
        "vector_cache_bytes_computed": vector_cache,
        "ratio_vector_cache_to_score_file": round(vector_cache / written["bytes"], 1),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": "nice python benchmarks/score_file_scale.py",
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
