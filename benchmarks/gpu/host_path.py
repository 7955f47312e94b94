"""The host path on a GPU (issue #25): what `speed.py` does not measure.

- **GPU-busy share** of the LEAD step (12-layer teacher, 6-layer student, speed.py's shapes, bf16) with
  the batches tokenised in the step (``data.workers: 0``) and in 4 loader workers: torch.profiler's
  kernel time over the wall time of ``profile_steps`` steps (low: the GPU waits for the host).
- **Sync check**: 20 steps between two log steps under ``torch.cuda.set_sync_debug_mode("error")``,
  which raises at the first operation that makes the host wait for the GPU; passes when none does.
- **Device search**: 100k random 768-d queries against 1M documents (top 100) with ``exact_search`` on
  the GPU (float32 and bfloat16), against the CPU's exact search and faiss-cpu's ``IndexFlatIP``, both
  timed on 1,000 of the queries and scaled (their cost is linear in the queries).

``--dry-run``: tiny shapes on the CPU; it checks the script, not the speed (no profile, no sync check).

    python benchmarks/gpu/host_path.py --output-dir "$OUT"            # on a GPU (run.sh)
    python benchmarks/gpu/host_path.py --dry-run --output-dir /tmp/gpu
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from speed import (  # noqa: E402
    SHAPES,
    Clock,
    build_model_folder,
    default_corpus,
    find_assets,
    machine,
    pick_device,
    profile_steps,
    read_texts,
    write_training_data,
)

SEARCH = {"gpu": dict(queries=100_000, docs=1_000_000, dim=768, k=100, cpu_queries=1000),
          "dry": dict(queries=256, docs=4096, dim=64, k=10, cpu_queries=64)}


def lead_trainer(root: Path, name: str, folder: Path, groups: Path, teacher: Path, student: Path, shapes: dict,
                 *extra: str):
    from leadkd.config import load_config
    from leadkd.distill.trainer import Trainer

    lengths = [f"max_query_length={shapes['query_length']}", f"max_passage_length={shapes['passage_length']}"]
    settings = [f"data.corpus={folder}", f"data.train_groups={groups}", f"data.num_negatives={shapes['negatives']}",
                f"optim.batch_size={shapes['batch']}", "optim.steps=100000", "eval.split=null",
                "checkpoint.every=null", "log_every=1000", f"output_dir={root / name}", f"teacher.path={teacher}",
                f"student.path={student}", f"layers.k={shapes['k']}",
                *(f"teacher.{x}" for x in lengths), *(f"student.{x}" for x in lengths), *extra]
    trainer = Trainer(load_config(None, settings, kind="distill"), log=lambda m: None, show_progress=False)
    trainer._iterator = trainer._batches()
    return trainer


def bench_steps(device: torch.device, root: Path, texts: list[str], tokenizer_dir: Path, shapes: dict,
                dry: bool) -> dict:
    teacher = build_model_folder(root / "teacher", tokenizer_dir, shapes["teacher"], shapes["passage_length"], 1)
    student = build_model_folder(root / "student", tokenizer_dir, shapes["student"], shapes["passage_length"], 2)
    folder, groups = write_training_data(root, texts, max(4 * shapes["batch"], 64), shapes["negatives"])
    bf16 = [] if dry else ["optim.bf16=true"]
    out: dict = {}
    for workers in (0, 4):
        trainer = lead_trainer(root, f"lead-w{workers}", folder, groups, teacher, student, shapes,
                               f"data.workers={workers}", *bf16)
        clock = Clock(device)
        for _ in range(3):
            trainer.train_step()
        seconds = clock.seconds(lambda t=trainer: [t.train_step() for _ in range(shapes["steps"])])
        row = {"ms_per_step": 1e3 * seconds / shapes["steps"]}
        if not dry:
            row["gpu_busy_share"] = profile_steps(trainer.train_step, device, shapes["profile_steps"])["gpu_busy_share"]
        out[f"workers_{workers}"] = row
        if workers and not dry:
            out["sync_check"] = sync_check(trainer, steps=20)
        trainer.close()
    return out


def sync_check(trainer, steps: int) -> dict:
    """``steps`` training steps (none a log step) with CUDA's sync debug mode set to raise."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    done = 0
    try:
        for done in range(1, steps + 1):  # noqa: B007  (read after a failure: the step it failed in)
            trainer.train_step()
    except RuntimeError as error:
        return {"passed": False, "failed_in_step": done, "first_sync": str(error).splitlines()[0][:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"passed": True, "steps": steps}


def bench_search(device: torch.device, shape: dict) -> dict:
    import faiss

    from leadkd.retrieval.search import exact_search

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((shape["docs"], shape["dim"]), dtype=np.float32)
    queries = rng.standard_normal((shape["queries"], shape["dim"]), dtype=np.float32)
    few = queries[:shape["cpu_queries"]]
    scale = shape["queries"] / shape["cpu_queries"]
    clock = Clock(device)
    result: dict = {"shape": shape}
    cpu = torch.device("cpu")
    result["cpu_exact_s"] = Clock(cpu).seconds(lambda: exact_search(few, docs, shape["k"])) * scale
    index = faiss.IndexFlatIP(shape["dim"])
    index.add(docs)
    result["faiss_cpu_s"] = Clock(cpu).seconds(lambda: index.search(few, shape["k"])) * scale
    if device.type == "cuda":
        on_device = torch.from_numpy(docs).to(device)
        q = torch.from_numpy(queries).to(device)
        exact_search(q[:1024], on_device, shape["k"])  # warm-up: cuBLAS handles, allocator
        for dtype in ("float32", "bfloat16"):
            result[f"device_{dtype}_s"] = clock.seconds(lambda d=dtype: exact_search(q, on_device, shape["k"], dtype=d))
        ids_gpu = exact_search(q[:shape["cpu_queries"]], on_device, shape["k"])[1]
        ids_cpu = exact_search(few, docs, shape["k"])[1]
        result["ids_equal_share"] = float((ids_gpu == ids_cpu).mean())
        result["device_over_cpu_exact"] = result["cpu_exact_s"] / result["device_float32_s"]
        result["device_over_faiss_cpu"] = result["faiss_cpu_s"] / result["device_float32_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=None)
    parser.add_argument("--corpus", type=Path, default=None)
    args = parser.parse_args()
    shapes = SHAPES["dry" if args.dry_run else "gpu"]
    device = pick_device(args.dry_run)
    tokenizer_dir = find_assets(args.assets)
    texts, source = read_texts(default_corpus(args.corpus), shapes["passages"], tokenizer_dir)
    name = "gpu_host_path" + ("_dry_run" if args.dry_run else "")
    result: dict = {"benchmark": name, "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "machine": machine(device), "texts": source}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leadkd-host-") as scratch:
        result["steps"] = bench_steps(device, Path(scratch), texts, tokenizer_dir, shapes, args.dry_run)
        print(json.dumps(result["steps"]), flush=True)
    result["search"] = bench_search(device, SEARCH["dry" if args.dry_run else "gpu"])
    print(json.dumps(result["search"]), flush=True)
    result["seconds"] = time.perf_counter() - started
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output_dir / (name + '.json')} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
