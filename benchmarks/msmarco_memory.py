"""Memory and time to load an MS MARCO-sized ``collection.tsv`` (8,841,823 passages) with leadkd's reader.

Why: the data layer promises that the full MS MARCO passage collection fits a 24 GiB box next to a
model. This writes a synthetic collection of the real size (passage lengths drawn from a gamma
distribution, mean ~330 characters like MS MARCO; some non-ASCII text), loads it in a *fresh*
child process (so peak RSS measures only the load), and records load time, peak RSS
(``resource.getrusage``), the collection's own buffer size and a few access timings in
``benchmarks/results/msmarco_memory.json``. The temporary file is deleted afterwards.

Usage::

    python benchmarks/msmarco_memory.py [--passages 8841823] [--tmp-dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "msmarco_memory.json"
MSMARCO_PASSAGES = 8_841_823


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def generate(path: Path, n: int, seed: int = 0) -> dict:
    """Write ``pid<TAB>text`` lines; text is a slice of a random word pool of gamma-distributed length."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(20000)] + ["the", "of", "and", "a", "to", "in", "is", "for"] * 500
    vocab += ["café", "naïve", "â€™s", "°C", "über", "Москва", "東京"]  # MS MARCO has some non-ASCII (and mojibake)
    words = rng.choice(np.array(vocab, dtype=object), size=4_000_000)
    pool = " ".join(words.tolist())
    lengths = np.clip(rng.gamma(shape=6.0, scale=55.0, size=n), 20, 1800).astype(np.int64)
    starts = rng.integers(0, len(pool) - 2000, size=n)
    total_chars = 0
    with open(path, "wb") as f:
        step = 200_000
        for s in range(0, n, step):
            e = min(n, s + step)
            lines = [f"{pid}\t{pool[a:a + L].strip() or 'x'}\n"
                     for pid, a, L in zip(range(s, e), starts[s:e].tolist(), lengths[s:e].tolist(), strict=True)]
            total_chars += sum(len(x) for x in lines)
            f.write("".join(lines).encode("utf-8"))
    return {"passages": n, "file_bytes": path.stat().st_size, "mean_text_chars": round(float(lengths.mean()), 1)}


def child_load(path: str) -> None:
    """Runs in a fresh interpreter: import, load, measure; prints one JSON object."""
    import leadkd.data  # noqa: F401  (imports counted in the baseline, not the load)
    from leadkd.data.formats import read_collection_tsv

    base = rss_now_bytes()
    t0 = time.perf_counter()
    corpus = read_collection_tsv(path)
    load_s = time.perf_counter() - t0
    after = rss_now_bytes()
    peak = rss_peak_bytes()
    n = len(corpus)
    rng = np.random.default_rng(1)
    probe = [str(i) for i in rng.integers(0, n, size=20000).tolist()]
    t0 = time.perf_counter()
    rows = [corpus.index(p) for p in probe]
    index_us = (time.perf_counter() - t0) / len(probe) * 1e6
    t0 = time.perf_counter()
    texts = corpus.passages(rows)
    passage_us = (time.perf_counter() - t0) / len(rows) * 1e6
    t0 = time.perf_counter()
    batch = corpus.lookup(probe)
    lookup_s = time.perf_counter() - t0
    assert batch.tolist() == rows and all(texts)
    t0 = time.perf_counter()
    lengths = corpus.char_lengths()
    char_lengths_s = time.perf_counter() - t0
    print(json.dumps({
        "load_s": round(load_s, 1), "rss_baseline_bytes": base, "rss_after_load_bytes": after,
        "rss_peak_bytes": peak, "collection_nbytes": corpus.nbytes, "n_loaded": n,
        "mean_chars_loaded": round(float(lengths.mean()), 1),
        "index_us": round(index_us, 2), "passage_us": round(passage_us, 2),
        "lookup_20k_ids_s": round(lookup_s, 3), "char_lengths_s": round(char_lengths_s, 2),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=MSMARCO_PASSAGES)
    parser.add_argument("--tmp-dir", default=None, help="where the synthetic collection.tsv is written")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_load(args.child)
        return
    tmp = Path(tempfile.mkdtemp(prefix="leadkd-msmarco-", dir=args.tmp_dir))
    path = tmp / "collection.tsv"
    try:
        t0 = time.perf_counter()
        gen = generate(path, args.passages)
        gen["generate_s"] = round(time.perf_counter() - t0, 1)
        print(f"generated {gen['passages']} passages, {gen['file_bytes'] / 2**30:.2f} GiB in {gen['generate_s']} s",
              flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            sys.exit(f"loading failed:\n{proc.stderr}")
        load = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            tmp.rmdir()
    gib = 2**30
    result = {
        "benchmark": "msmarco_memory",
        "what": "read_collection_tsv on a synthetic MS MARCO-sized collection.tsv (pid<TAB>text)",
        **gen, **load,
        "rss_peak_gib": round(load["rss_peak_bytes"] / gib, 2),
        "rss_after_load_gib": round(load["rss_after_load_bytes"] / gib, 2),
        "load_rss_over_file": round((load["rss_peak_bytes"] - load["rss_baseline_bytes"]) / gen["file_bytes"], 2),
        "collection_gib": round(load["collection_nbytes"] / gib, 2),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "note": "2 cores shared with other jobs; times are indicative"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
