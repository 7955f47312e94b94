"""`leadkd compare`: train named variants of one distillation recipe over seeds and compare them fairly.

A comparison spec (YAML) names a base distill config, the variants (dotted overrides on top of it), the
seeds, a reference variant and the evaluation sets. Every variant x seed is an ordinary `leadkd distill`
(or `leadkd train`) job in ``output_dir/<variant>/seed<S>``; its checkpoint is chosen on the base
config's ``eval.split`` (dev) and only that model is scored on the evaluation sets, never used to choose.

    # kind: compare
    base: configs/quickstart-scifact.yaml
    set: {optim.steps: 60}                       # every row
    variants:
      response_kd: {loss.layer: none}
      lead: {}
      ground_truth: {job: train}                 # the base's student on its own loss
      teacher: {job: evaluate, model: runs/teacher}   # a model scored as it is (once)
      lead_k3: {layers.k: 3, seeds: [0]}         # an ablation screened on the first seed only
    reference: response_kd
    seeds: [0, 1, 2]
    evaluate:
      test: {data: scifact, split: test}
      dl19: {data: trec-dl19-passage-pool, split: test, rel: 2}
    measures: [nDCG@10, R@100]
    output_dir: runs/compare/scifact

``compare.json`` (``results:`` to put it elsewhere, e.g. under benchmarks/results/) is the ledger: one
entry per finished row with its resolved config, CPU and wall time, dev curve and per-query metrics,
rewritten atomically after each row. A rerun skips finished rows (the ledger alone is enough: a fresh
checkout with the committed ledger continues where it stopped) and refuses a row whose resolved config
changed. :mod:`leadkd.compare.report` turns the ledger into ``compare.md`` and plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import config_from_dict, config_to_dict, load_config, read_config_file, todays_spelling
from ..reporting.results import read_json_object
from ..reporting.stage_logs import load_metrics
from ..runtime.errors import ConfigError, InputError, LeadkdError
from ..runtime.fileio import atomic_write

Log = Callable[[str], None]

SPEC_KEYS = ("kind", "base", "set", "variants", "reference", "seeds", "evaluate", "measures", "k", "output_dir",
             "results")
#: The loss options a `job: train` row keeps from the base's loss section.
TRAIN_LOSS_KEYS = ("in_batch_negatives", "cross_process_negatives", "mask_duplicate_positives")


@dataclass(frozen=True)
class EvalSet:
    """A split to score the chosen checkpoints on: a dataset (folder or name) and a split, ``rel`` for TREC."""

    data: str
    split: str
    rel: int | None = None


@dataclass(frozen=True)
class Variant:
    """One recipe: dotted overrides on the base, run as a distill job (or a train job of the base's
    student), or a model folder scored as it is (``evaluate``: the teacher, the student's init).
    ``seeds`` narrows the spec's seeds for this variant (an ablation screened on one seed)."""

    name: str
    overrides: dict[str, Any]
    job: str = "distill"
    seeds: tuple[int, ...] | None = None
    model: str | None = None


@dataclass(frozen=True)
class CompareSpec:
    source: str
    base: str
    variants: tuple[Variant, ...]
    reference: str
    seeds: tuple[int, ...]
    evaluate: dict[str, EvalSet]
    output_dir: str
    common: dict[str, Any] = field(default_factory=dict)
    measures: tuple[str, ...] = ("nDCG@10", "R@100")
    k: int = 100
    results: str | None = None

    @property
    def ledger(self) -> Path:
        return Path(self.results) if self.results else Path(self.output_dir) / "compare.json"

    def rows(self) -> list[tuple[Variant, int]]:
        """Seed-major, so every variant has its first seed before any has its second. A model scored as it
        is has one row, under its first seed: every seed would score the same folder."""
        def seeds(variant: Variant) -> tuple[int, ...]:
            chosen = variant.seeds or self.seeds
            return chosen[:1] if variant.job == "evaluate" else chosen

        return [(variant, seed) for seed in self.seeds for variant in self.variants if seed in seeds(variant)]

    def default_corpus(self) -> str:
        """The base's corpus: what an evaluation set without ``data`` is scored on."""
        return str(load_config(self.base, _overrides(self.common), "distill").data.corpus)


def _fail(source: str, key: str, message: str) -> None:
    raise ConfigError(f"{source}: {key}: {message}")


def load_spec(path: str | os.PathLike) -> CompareSpec:
    """Read and check a comparison spec; every problem is one line naming the file and the key."""
    source = str(path)
    data = read_config_file(path)
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        _fail(source, unknown[0], f"unknown key; choose from {', '.join(SPEC_KEYS[1:])}")
    if data.get("kind", "compare") != "compare":
        _fail(source, "kind", f"expected 'compare', got {data.get('kind')!r}")
    for key in ("base", "variants", "reference", "seeds", "evaluate", "output_dir"):
        if data.get(key) in (None, "", [], {}):
            _fail(source, key, "required")
    if not isinstance(data["variants"], dict):
        _fail(source, "variants", "expected a mapping of name -> {dotted.option: value}")
    variants = []
    for name, overrides in data["variants"].items():
        if not isinstance(overrides, (dict, type(None))):
            _fail(source, f"variants.{name}", f"expected a mapping of dotted.option: value, got {overrides!r}")
        overrides = dict(overrides or {})
        job = overrides.pop("job", "distill")
        if job not in ("distill", "train", "evaluate"):
            _fail(source, f"variants.{name}.job", f"expected 'distill', 'train' or 'evaluate', got {job!r}")
        own_seeds = overrides.pop("seeds", None)
        if own_seeds is not None and (not isinstance(own_seeds, list) or not own_seeds
                                      or not set(own_seeds) <= set(data.get("seeds") or [])):
            _fail(source, f"variants.{name}.seeds", f"expected a non-empty list of the spec's seeds, got {own_seeds!r}")
        model = overrides.pop("model", None) if job == "evaluate" else None
        if job == "evaluate" and (not model or overrides):
            _fail(source, f"variants.{name}", "a 'job: evaluate' variant names a model folder (model: PATH) "
                                              "and nothing else to override")
        variants.append(Variant(str(name), overrides, job, tuple(own_seeds) if own_seeds else None,
                                str(model) if model else None))
    names = [v.name for v in variants]
    if len(variants) < 2:
        _fail(source, "variants", "a comparison needs at least two variants")
    if data["reference"] not in names:
        _fail(source, "reference", f"{data['reference']!r} is not one of the variants ({', '.join(names)})")
    seeds = data["seeds"]
    if not isinstance(seeds, list) \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        _fail(source, "seeds", f"expected a list of distinct integers >= 0, got {seeds!r}")
    if not isinstance(data["evaluate"], dict):
        _fail(source, "evaluate", "expected a mapping of name -> {data, split, rel}")
    evaluate = {}
    for name, entry in data["evaluate"].items():
        if not isinstance(entry, dict) or set(entry) - {"data", "split", "rel"} or not entry.get("split"):
            _fail(source, f"evaluate.{name}", "expected {data: folder or name, split: name, rel: optional int}")
        evaluate[str(name)] = EvalSet(str(entry.get("data") or ""), str(entry["split"]), entry.get("rel"))
    measures = data.get("measures", ["nDCG@10", "R@100"])
    k = data.get("k", 100)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        _fail(source, "k", f"expected a positive integer (retrieval depth), got {k!r}")
    spec = CompareSpec(source, str(data["base"]), tuple(variants), str(data["reference"]), tuple(seeds), evaluate,
                       str(data["output_dir"]), dict(data.get("set") or {}), tuple(measures), k,
                       data.get("results"))
    _check_selection(spec)
    return spec


def _check_selection(spec: CompareSpec) -> None:
    """Checkpoints are chosen on the base's eval split; that split may not also be reported."""
    from ..retrieval.evaluate import parse_measures

    parse_measures(spec.measures)  # one-line error for an unknown measure, before any training
    for variant in spec.variants:  # every variant's config is checked here, before any training
        if variant.job == "evaluate":
            continue
        config = row_config(spec, variant, spec.seeds[0])
        if config.eval.split is None:
            _fail(spec.source, f"variants.{variant.name}", "sets no eval.split: checkpoints must be chosen on a "
                                                           "dev split")
        for name, target in spec.evaluate.items():
            data = target.data or config.data.corpus
            if target.split == config.eval.split and Path(str(data)).name == Path(str(config.data.corpus)).name:
                _fail(spec.source, f"evaluate.{name}", f"split {target.split!r} also chooses the checkpoints "
                                                       "(the eval.split); report on held-out splits only")


def _overrides(mapping: Mapping[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def row_config(spec: CompareSpec, variant: Variant, seed: int):
    """The validated job config of one row: base, then ``set``, then the variant, then seed and folder."""
    placement = {"seed": seed, "output_dir": str(Path(spec.output_dir) / variant.name / f"seed{seed}")}
    try:
        if variant.job == "distill":
            return load_config(spec.base, _overrides({**spec.common, **variant.overrides, **placement}), "distill")
        base = config_to_dict(load_config(spec.base, _overrides(spec.common), "distill"))
        student = {key: value for key, value in base["student"].items() if key != "init"}
        if base["student"].get("init"):
            raise ConfigError(f"student.init: a 'job: train' variant trains the base's student alone, which "
                              f"must then be a folder (student.path), not {base['student']['init']!r}")
        train = {"model": student, "loss": {key: base["loss"][key] for key in TRAIN_LOSS_KEYS},
                 "optim": {key: value for key, value in base["optim"].items() if key != "teacher_lr"},
                 **{key: base[key] for key in ("data", "checkpoint", "eval", "log_every", "ddp_timeout")}}
        return load_config(None, _overrides({**_flat(train), **variant.overrides, **placement}), "train")
    except ConfigError as exc:
        raise ConfigError(f"{spec.source}: variant {variant.name!r}: {exc}") from None


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------------------- the ledger

def load_ledger(path: str | os.PathLike) -> dict:
    """The ledger at ``path`` (an empty one where there is none yet); one-line errors for a bad file."""
    path = Path(path)
    if not path.is_file():
        return {"rows": {}}
    ledger = read_json_object(path, "a leadkd comparison ledger")
    if not isinstance(ledger.get("rows"), dict):
        raise InputError(path, "not a leadkd comparison ledger (no 'rows' object)")
    return ledger


def save_ledger(path: str | os.PathLike, ledger: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        json.dump(ledger, handle, indent=1, sort_keys=False)
        handle.write("\n")


def row_key(variant: str, seed: int) -> str:
    return f"{variant}/seed{seed}"


# --------------------------------------------------------------------------------------------- running

def dev_curve(run_dir: Path) -> list[list[float]]:
    """``[[step, value], ...]`` of the run's dev evaluations (the metric it chose checkpoints by)."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return []
    points = []
    for record in load_metrics(log):
        if "eval" in record:
            values = list(record["eval"].values())
            points.append([record["step"], float(values[0])])
    return points


def score_model(model_dir: Path, target: EvalSet, default_data: str, measures, k: int) -> dict:
    """Aggregate and per-query metrics of a dual encoder on one evaluation set (exact search, top k)."""
    from ..data.datasets import load_dataset
    from ..models.dual_encoder import DualEncoder
    from ..retrieval.evaluate import evaluate
    from ..retrieval.pipeline import encode_corpus, encode_queries, search_run

    dataset = load_dataset(target.data or default_data, split=target.split)
    model = DualEncoder.from_pretrained(model_dir)
    run = search_run(encode_queries(model, dataset.queries, show_progress=False),
                     encode_corpus(model, dataset.corpus, show_progress=False), k)
    aggregate, per_query = evaluate(run, dataset.qrels, measures=list(measures), rel=target.rel)
    return {"aggregate": aggregate,
            "per_query": {row["query_id"]: {m: v for m, v in row.items() if m != "query_id"} for row in per_query}}


def code_version() -> dict[str, str | None]:
    """The leadkd version and, when run from a git checkout, its commit: a ledger records configs, and this
    says which code computed each row."""
    import subprocess

    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"leadkd": __version__, "commit": commit}


def run_compare(spec: CompareSpec, log: Log = print, max_rows: int | None = None,
                only: set[str] | None = None) -> dict:
    """Train and score every missing row (at most ``max_rows``), updating the ledger after each one."""
    from ..runtime.run_lock import file_lock, output_lock

    inside = Path(spec.ledger).resolve().is_relative_to(Path(spec.output_dir).resolve())
    with output_lock(spec.output_dir, option="output_dir"), \
            contextlib.nullcontext() if inside else file_lock(spec.ledger, option="ledger"):
        # each row's job then holds its own sub-folder; a ledger elsewhere may be another comparison's too
        return _run_compare(spec, log, max_rows, only)


def _run_compare(spec: CompareSpec, log: Log, max_rows: int | None, only: set[str] | None) -> dict:
    from ..distill.trainer import run_job
    from ..models.model_card import add_figures

    ledger = load_ledger(spec.ledger)
    ledger["spec"] = {"source": spec.source, "base": spec.base, "reference": spec.reference,
                      "seeds": list(spec.seeds), "variants": {v.name: {"job": v.job, **v.overrides,
                                                                  **({"model": v.model} if v.model else {}),
                                                                  **({"seeds": list(v.seeds)} if v.seeds else {})}
                                                                 for v in spec.variants},
                      "set": spec.common, "evaluate": {n: vars(e) for n, e in spec.evaluate.items()},
                      "measures": list(spec.measures), "k": spec.k}
    rows = [(v, s) for v, s in spec.rows() if only is None or v.name in only]
    pending = []
    for variant, seed in rows:
        config = {"model": variant.model} if variant.job == "evaluate" else \
            config_to_dict(row_config(spec, variant, seed))
        done = ledger["rows"].get(row_key(variant.name, seed))
        if done is None:
            pending.append((variant, seed, config))
        elif changed := config_changes(done["config"], config, variant.job):
            raise LeadkdError(f"{spec.ledger}: row {row_key(variant.name, seed)} was made with another config "
                              f"({'; '.join(changed[:3])}); delete that row from the ledger to train it again, "
                              "or restore the spec")
    total = len(pending) if max_rows is None else min(len(pending), max_rows)
    log(f"compare: {len(rows) - len(pending)} of {len(rows)} rows done, {total} to run now")
    for index, (variant, seed, config) in enumerate(pending[:total], start=1):
        wall, cpu = time.perf_counter(), time.process_time()
        if variant.job == "evaluate":
            assert variant.model is not None  # the spec's parser requires one of an evaluate variant
            model_dir, corpus, trained = Path(variant.model), spec.default_corpus(), {}
        else:
            job = config_from_dict(config, variant.job)
            assert job.output_dir is not None and job.data.corpus is not None  # a job requires both
            run_job(job, resume=True, log=lambda message: None)
            run_dir = Path(job.output_dir)
            model_dir = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "final"
            corpus, trained = job.data.corpus, {"dev_metric": job.eval.metric, "dev": dev_curve(run_dir)}
        scores = {name: score_model(model_dir, target, corpus, spec.measures, spec.k)
                  for name, target in spec.evaluate.items()}
        if variant.job != "evaluate":  # the trained row's model card gets the figures of the comparison
            for name, target in spec.evaluate.items():
                add_figures(model_dir, f"{name}: {target.data or corpus} {target.split}", scores[name]["aggregate"])
        row = {"variant": variant.name, "seed": seed, "job": variant.job, "config": config, "model": str(model_dir),
               "cpu_seconds": round(time.process_time() - cpu, 1), "wall_seconds": round(time.perf_counter() - wall, 1),
               **trained, "splits": scores, "code": code_version()}
        ledger["rows"][row_key(variant.name, seed)] = row
        save_ledger(spec.ledger, ledger)
        first = next(iter(spec.evaluate))
        summary = ", ".join(f"{m} {v:.4f}" for m, v in scores[first]["aggregate"].items())
        log(f"[{index}/{total}] {row_key(variant.name, seed)}: {first} {summary} "
            f"({row['wall_seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s CPU)")
    save_ledger(spec.ledger, ledger)
    return ledger


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any], job: str) -> list[str]:
    """How a finished row's config differs from the one the spec gives now (``key: before -> now``).

    An option that leadkd gained after the row was trained counts as unchanged while it holds its default,
    so a long study survives new options; the output folder may move; any other difference is a change.
    A ledger records configs, not code: when a new default (or a fix) changes what a row computes, delete
    the rows it affects.
    """
    from ..config import DistillConfig, TrainConfig

    if job == "evaluate":
        return [] if stored == current else [f"model: {stored.get('model')!r} -> {current.get('model')!r}"]
    defaults = _flat(config_to_dict(DistillConfig() if job == "distill" else TrainConfig()))
    before, now = _flat(todays_spelling(stored)), _flat(current)
    changes = []
    for key in sorted((set(before) | set(now)) - {"output_dir"}):
        if key not in before and now[key] == defaults.get(key):
            continue
        if before.get(key, "(absent)") != now.get(key, "(absent)"):
            changes.append(f"{key}: {before.get(key, '(absent)')!r} -> {now.get(key, '(absent)')!r}")
    return changes
