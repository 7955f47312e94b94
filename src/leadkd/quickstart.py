"""`leadkd quickstart`: the whole LEAD recipe on real data, end to end, in one command.

teacher (all-MiniLM-L6-v2 by default) → mine hard negatives with it → a 3-layer student made of the
teacher's blocks 0, 2, 4 → short warm-up of the student on ground truth → two arms from that warm start,
LEAD and response-only KD (same teacher, data and budget) → test-split evaluation of teacher and students,
per layer, with LEAD's paired difference to response-KD → report.md with plots. Each stage writes its own
folder and is skipped when that folder is complete, so an interrupted quickstart continues where it stopped.

The arms distil from the frozen teacher through one shared vector cache, so both fit in 15 minutes on a
2-core CPU; ``joint_teacher`` (``--joint-teacher``) trains the teacher jointly as the paper does, at about
2.5 times the cost of each arm.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .reporting.results import RESULTS_NAME, Model, PairedComparison, RunResults, Stage, read_results, write_results
from .runtime.errors import LeadkdError
from .runtime.fileio import atomic_write

if TYPE_CHECKING:
    from .models.base import Retriever

Log = Callable[[str], None]
#: The ir_datasets splits a quickstart looks for under a dataset id (``beir/scifact/train``, ...).
IRDS_SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class QuickstartPlan:
    """Sizes of one quickstart; ``fast`` shrinks everything to a CI-sized smoke run."""

    teacher: str = "all-MiniLM-L6-v2"
    student_layers: tuple[int, ...] = (0, 2, 4)
    max_query_length: int = 48
    max_passage_length: int = 128
    similarity_scale: float = 20.0
    mine_depth: int = 100
    mine_range: tuple[int, int] = (5, 50)
    mine_negatives: int = 20
    negatives: int = 3
    batch_size: int = 8
    warmup_steps: int = 40
    distill_steps: int = 150
    eval_every: int = 75                  # dev evaluations of each arm: the checkpoint is chosen among them
    layer_k: int = 2
    lr: float = 5e-5
    seed: int = 0
    joint_teacher: bool = False           # the paper's joint training of the teacher in both arms
    slice_queries: int | None = None      # fast mode: queries kept per split
    slice_passages: int | None = None     # fast mode: corpus size (judged passages + fillers)
    overrides: dict[str, Any] = field(default_factory=dict)  # extra distill options, nested as in a config file

    @classmethod
    def fast(cls, **changes) -> QuickstartPlan:
        values: dict[str, Any] = dict(max_passage_length=64, mine_depth=50, mine_range=(2, 30), mine_negatives=8,
                                      batch_size=4, warmup_steps=6, distill_steps=12, eval_every=6,
                                      slice_queries=24, slice_passages=400)
        values.update(changes)
        return cls(**values)


def choose_splits(folder: Path) -> dict[str, str | None]:
    """Train on train-nodev (or train), select checkpoints on dev, report on test — never select on test."""
    from .data.datasets import available_splits

    splits = set(available_splits(folder))
    train = "train-nodev" if "train-nodev" in splits else "train" if "train" in splits else None
    test = "test" if "test" in splits else "dev" if "dev" in splits else None
    dev = "dev" if "dev" in splits and test != "dev" else None
    if train is None or test is None:
        raise LeadkdError(f"{folder}: the quickstart needs a train split and a test (or dev) split; "
                          f"found {', '.join(sorted(splits)) or 'no qrels'}")
    return {"train": train, "dev": dev, "test": test}


def derive_dev(folder: Path, held_out: int = 100) -> None:
    """Give a dataset without a dev split one: the first ``held_out`` train queries by SHA-1 of their id
    (at most a fifth of them) become ``dev``, the rest ``train-nodev``. It is how ``$LEADKD_DATA_DIR``'s
    SciFact got its dev split, so ``irds:beir/scifact`` gets the very same one."""
    from .data.formats import read_beir_qrels, write_beir_qrels

    train = read_beir_qrels(folder / "qrels" / "train.tsv")
    order = sorted(train, key=lambda qid: hashlib.sha1(qid.encode("utf-8")).hexdigest())
    dev = set(order[:min(held_out, len(order) // 5)])
    # train-nodev first: until dev.tsv exists the folder has no dev split, and this runs again.
    write_beir_qrels(folder / "qrels" / "train-nodev.tsv", {q: d for q, d in train.items() if q not in dev})
    write_beir_qrels(folder / "qrels" / "dev.tsv", {q: d for q, d in train.items() if q in dev})


def irds_folder(dataset_id: str, target: Path, log: Log = print, named: str | None = None) -> Path:
    """An ir_datasets dataset (``beir/scifact``, or one of its splits) as a BEIR folder inside the run,
    exported once, with a dev split derived from train where the dataset has none. ``named``: the plain
    name the user gave, when ir_datasets is only the fallback; a failed download then says both ways."""
    from .data.datasets import available_splits, export_irds

    base, _, last = dataset_id.rpartition("/")
    if not base or last not in IRDS_SPLITS:
        base = dataset_id
    if not (target / "corpus.jsonl").is_file():
        log(f"exporting irds:{base} ({', '.join(IRDS_SPLITS)} where they exist) to {target}")
        try:
            export_irds(base, target, IRDS_SPLITS)
        except Exception as failed:
            if named is None:
                raise
            raise _neither_way(named, base, str(failed).splitlines()[0] if str(failed) else type(failed).__name__
                               ) from None
    splits = available_splits(target)
    if "dev" not in splits and "train" in splits:
        derive_dev(target)
    return target


def _neither_way(named: str, irds_id: str, why: str) -> LeadkdError:
    from .data.datasets import DATA_DIR_ENV

    return LeadkdError(f"dataset {named!r} is neither a folder nor under ${DATA_DIR_ENV}, and irds:{irds_id} could "
                       f"not be fetched ({why}): set ${DATA_DIR_ENV} to a folder holding {named}/ in BEIR layout, "
                       "or run with the network and the irds extra (pip install 'leadkd[irds]')")


def quickstart_source(data: str, log: Log = print) -> str | Path:
    """What ``--data`` names: a folder (or one under ``$LEADKD_DATA_DIR``), else the same dataset through
    ir_datasets (``beir/<name>``), so ``pip install leadkd[irds] && leadkd quickstart`` works wherever the
    network does. Without either, one line says both ways."""
    from .data.datasets import DATA_DIR_ENV, resolve_dataset

    try:
        return resolve_dataset(data)
    except LeadkdError as missing:
        if str(data).startswith("irds:") or "/" in str(data) or "\\" in str(data):
            raise
        fallback = f"beir/{data}"
        try:
            import ir_datasets  # noqa: F401
        except ImportError:
            raise _neither_way(str(data), fallback, "ir_datasets is not installed") from missing
        log(f"{data!r} is not under ${DATA_DIR_ENV}; using irds:{fallback} through ir_datasets")
        return fallback


def write_slice(source: Path, target: Path, splits: dict[str, str | None], queries_per_split: int,
                passages: int, seed: int) -> Path:
    """A small BEIR copy: the first queries of each split, their judged passages, random fillers."""
    from .data.datasets import load_dataset
    from .data.formats import write_beir_qrels, write_corpus_jsonl, write_queries_jsonl

    rng = random.Random(seed)
    keep_docs: list[str] = []
    seen: set[str] = set()
    query_rows: dict[str, tuple[str, str]] = {}
    corpus = None
    for split in {s for s in splits.values() if s}:
        dataset = load_dataset(source, split=split)
        corpus = dataset.corpus
        ids = [dataset.queries.id_at(i) for i in range(min(queries_per_split, len(dataset.queries)))]
        qrels = {q: dataset.qrels[q] for q in ids}
        write_beir_qrels(target / "qrels" / f"{split}.tsv", qrels)
        for q in ids:
            query_rows[q] = (q, dataset.queries.text(dataset.queries.index(q)))
            for doc in qrels[q]:
                if doc not in seen:
                    seen.add(doc)
                    keep_docs.append(doc)
    assert corpus is not None  # the splits name at least a train and a test split
    fillers = [corpus.id_at(i) for i in rng.sample(range(len(corpus)), min(len(corpus), passages * 2))]
    for doc in fillers:
        if len(keep_docs) >= passages:
            break
        if doc not in seen:
            seen.add(doc)
            keep_docs.append(doc)
    rows = [corpus.index(doc) for doc in keep_docs]
    write_corpus_jsonl(target / "corpus.jsonl", corpus.subset(rows))
    from .data.collection import Queries

    query_ids, texts = zip(*query_rows.values(), strict=True)
    write_queries_jsonl(target / "queries.jsonl", Queries.from_records(list(query_ids), list(texts)))
    return target


def _done(folder: Path) -> bool:
    return (folder / "final").is_dir()


def planned_results(dataset: str, splits: dict[str, str | None], plan: QuickstartPlan) -> RunResults:
    """What a quickstart makes, before any of it is scored: its models and stages in report order (which
    stage starts from which model and makes which) and its settings. Written first, so a report built
    while it trains already knows its stages."""
    models = (Model("teacher", "teacher", "the teacher"), Model("student_init", "student", "the initial student"),
              Model("student_warmup", "student", "the warmed-up student"),
              Model("student_response_kd", "response_kd", "the response-KD student"),
              Model("student_lead", "lead", "the LEAD student"))
    stages = (Stage("warmup", "warmup", "stages/warmup", plan.warmup_steps, "student_init", "student_warmup"),
              Stage("distill", "distill", "stages/distill", plan.distill_steps, "student_warmup", "student_lead"),
              Stage("response_kd", "distill", "stages/response_kd", plan.distill_steps, "student_warmup",
                    "student_response_kd"))
    settings = {"teacher": plan.teacher, "student_layers": list(plan.student_layers),
                "max_passage_length": plan.max_passage_length, "similarity_scale": plan.similarity_scale,
                "steps": {"warmup": plan.warmup_steps, "distill": plan.distill_steps},
                "batch": f"{plan.batch_size} queries x (1 + {plan.negatives})", "layer_k": plan.layer_k,
                "lr": plan.lr, "seed": plan.seed, "fast": bool(plan.slice_queries),
                "teacher_training": "joint (the paper's)" if plan.joint_teacher else
                "frozen, cached (--joint-teacher trains it jointly, as the paper does)"}
    return RunResults(dataset, dict(splits), ("nDCG@10", "R@100"), models, stages, settings)


def _merged(*trees: dict[str, Any]) -> dict[str, Any]:
    """Nested option mappings merged section by section, later ones winning."""
    out: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = _merged(out[key], value) if both else value
    return out


def run_quickstart(data: str = "scifact", output: str | Path = "runs/quickstart", plan: QuickstartPlan | None = None,
                   log: Log = print) -> Path:
    """Run (or continue) every stage; returns the report's path."""
    from .runtime.run_lock import output_lock

    with output_lock(output, option="--output"):  # each stage's job then holds its own sub-folder
        return _run_quickstart(data, output, plan, log)


def _run_quickstart(data: str, output: str | Path, plan: QuickstartPlan | None, log: Log) -> Path:
    from . import accel
    from .config import DistillConfig, config_from_dict
    from .data.datasets import load_dataset
    from .data.groups import write_training_groups
    from .distill.build import student_from_teacher
    from .distill.trainer import run_job
    from .models.dual_encoder import DualEncoder
    from .reporting.report import build_report
    from .retrieval.mine import mine_hard_negatives

    plan = plan or QuickstartPlan()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = quickstart_source(data, log)
    name = f"irds:{source}" if isinstance(source, str) else Path(source).name
    if isinstance(source, str):
        source = irds_folder(source, output / "irds-data", log, named=str(data))
    splits = choose_splits(source)
    folder = source
    if plan.slice_queries:
        folder = output / "data"
        if not (folder / "corpus.jsonl").is_file():
            write_slice(source, folder, splits, plan.slice_queries, plan.slice_passages or 400, plan.seed)
    log(f"data: {folder} (train {splits['train']}, dev {splits['dev']}, test {splits['test']})")
    results_file = output / RESULTS_NAME
    results = read_results(results_file) if results_file.is_file() else None
    if results is None or not results.evaluated:  # the plan of this call, until its models are scored
        results = planned_results(name, splits, plan)
        write_results(results_file, results)
    stages = {stage.name: stage for stage in results.stages}

    lengths: dict[str, Any] = {"max_query_length": plan.max_query_length, "max_passage_length": plan.max_passage_length}
    teacher = DualEncoder.from_pretrained(plan.teacher, similarity_scale=plan.similarity_scale, **lengths)
    teacher_dir = output / "teacher"
    if not teacher_dir.is_dir():
        teacher.save_pretrained(teacher_dir)  # pinned settings (lengths, scale) for every later stage
    timings = _Timings(output / "timings.json")
    groups_file = output / "groups.jsonl"
    teacher_corpus = None  # every layer's corpus vectors: mining searches the last, the test scores them all
    if not groups_file.is_file():
        log("mining hard negatives with the teacher")
        with timings("mining"):
            assert splits["train"] is not None  # choose_splits finds one or fails
            train = load_dataset(folder, split=splits["train"])
            teacher_corpus = accel.encode_passages(teacher, train.corpus.passages(range(len(train.corpus))),
                                                   batch_size=32, layers=list(range(teacher.num_layers)),
                                                   show_progress=True)
            groups, report = mine_hard_negatives(teacher, train, depth=plan.mine_depth, rank_range=plan.mine_range,
                                                 negatives=plan.mine_negatives, seed=plan.seed,
                                                 corpus_embeddings=teacher_corpus[-1][:, :teacher.embedding_size],
                                                 show_progress=True)
        log(report.summary())
        assert groups is not None  # one process (no process group): the groups are all here
        write_training_groups(groups, groups_file)
    init_dir = output / "student-init"
    if not init_dir.is_dir():
        student = cast("Retriever", student_from_teacher(teacher, plan.student_layers, _Lengths(**lengths)))
        student.save_pretrained(init_dir)

    common = {"data": {"corpus": str(folder), "train_groups": str(groups_file), "num_negatives": plan.negatives},
              "optim": {"batch_size": plan.batch_size, "lr": plan.lr}, "seed": plan.seed, "log_every": 1,
              "eval": {"split": splits["dev"], "every": plan.eval_every, "at_start": False},
              "checkpoint": {"every": None}}  # no eval at start: the cut init and the warm start are scored on test
    warmup_dir = output / stages["warmup"].folder
    if not _done(warmup_dir):
        log("warm-up: the student alone on ground truth")
        with timings("warmup"):  # its final checkpoint (scored on test as student_warmup) starts both arms
            run_job(config_from_dict(_merged(common, {"model": {"path": str(init_dir)}, "eval": {"split": None},
                                                      "optim": {"steps": plan.warmup_steps},
                                                      "output_dir": str(warmup_dir)}), "train"),
                    resume=True, log=log)
    warm = warmup_dir / "final"
    # Two arms from the same warm start, teacher, data and budget: LEAD, and response-only KD beside it. A
    # frozen teacher's vectors are cached once for both (LEAD runs first: its cache holds every layer).
    teaching = {"train": True} if plan.joint_teacher else \
        {"train": False, "cache": True, "cache_dir": str(output / "teacher-cache")}
    how = "teacher and student trained jointly" if plan.joint_teacher else "from the frozen, cached teacher"
    arms = {"distill": (f"LEAD: {how}", {}),
            "response_kd": ("response-only KD (the baseline): the same, without the layer term",
                            {"loss": {"layer": "none"}})}
    chosen = {}
    for stage, (message, extra) in arms.items():
        stage_dir = output / stages[stage].folder
        if not _done(stage_dir):
            log(message)
            config = config_from_dict(_merged(
                common, {"teacher": {"path": str(teacher_dir), **teaching}, "student": {"path": str(warm)},
                         "optim": {"steps": plan.distill_steps}, "layers": {"k": plan.layer_k},
                         "output_dir": str(stage_dir)}, plan.overrides, extra), "distill")
            assert isinstance(config, DistillConfig)  # the kind asked for
            with timings(stage):
                if teacher_corpus is not None and config.teacher.cache:
                    _prefill_cache(config, teacher_dir, teacher_corpus, stage_dir, log)
                run_job(config, resume=True, log=log)
        chosen[stages[stage].produces] = stage_dir / ("best" if splits["dev"] and (stage_dir / "best").is_dir()
                                                      else "final")

    if not results.evaluated:
        paths = {"teacher": teacher_dir, "student_init": init_dir, "student_warmup": warm, **chosen}
        assert splits["test"] is not None  # choose_splits finds one or fails
        results = _evaluated(results, paths, load_dataset(folder, split=splits["test"]), teacher_corpus, timings, log)
        write_results(results_file, replace(results, timings=dict(timings.seconds), settings={
            **results.settings, "seconds": round(time.perf_counter() - started, 1)}))
    report_file = build_report(output)
    log(f"wrote {report_file} in {time.perf_counter() - started:.0f} s")
    return report_file


def _evaluated(results: RunResults, paths: dict[str | None, Path], test, teacher_corpus, timings: _Timings,
               log: Log) -> RunResults:
    """``results`` with every model scored on the test split, per layer, and LEAD's paired difference to
    response-KD over the test queries."""
    from .models.dual_encoder import DualEncoder
    from .models.model_card import add_figures
    from .retrieval.pipeline import evaluate_layers

    test_split = results.test_split
    assert test_split is not None  # planned from choose_splits, which finds one or fails
    log(f"evaluating on {test_split}")
    measures = list(results.measures)
    models, per_query = [], {}
    for model in results.models:
        with timings(f"test_{model.name}"):
            rows = evaluate_layers(DualEncoder.from_pretrained(paths[model.name]), test, measures=measures,
                                   per_query=True, corpus_vectors=teacher_corpus if model.role == "teacher" else None)
        add_figures(paths[model.name], test_split, {m: rows[-1][m] for m in measures})
        models.append(replace(model, metrics={test_split: {m: rows[-1][m] for m in measures}},
                              layers={m: [row[m] for row in rows] for m in measures}))
        per_query[model.name] = {qid: values[measures[0]] for qid, values in rows[-1]["per_query"].items()}
        log(f"  {model.name}: {measures[0]} {rows[-1][measures[0]]:.4f}")
    lead_model, base_model = results.with_role("lead"), results.with_role("response_kd")
    assert lead_model is not None and base_model is not None  # planned_results makes both
    lead, base = lead_model.name, base_model.name
    return replace(results, models=tuple(models),
                   lead_vs_response_kd=_paired(per_query, lead, base, measures[0], test_split))


def _prefill_cache(config, teacher_dir: Path, vectors, stage_dir: Path, log: Log) -> None:
    """Fill the arms' shared teacher cache with the corpus vectors mining computed, so no training step runs
    the teacher on a passage (only the training queries are left to encode, once)."""
    from .data.datasets import load_corpus, load_queries
    from .distill.build import open_teacher_cache
    from .models.dual_encoder import DualEncoder

    teacher = DualEncoder.from_pretrained(teacher_dir).eval()
    cache = open_teacher_cache(config, teacher, load_corpus(config.data.corpus), load_queries(config.data.corpus),
                               stage_dir, log=log)
    try:
        if cache.filled()["passage"] == 0:
            cache.prefill_passages(vectors)
    finally:
        cache.close()


class _Timings:
    """Wall seconds of each quickstart stage, kept in ``timings.json`` so a resumed run still knows the
    stages it skipped (a stage timed twice, e.g. after an interruption, adds both spells)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 1)
            with atomic_write(self.path) as handle:
                json.dump(self.seconds, handle, indent=2)


def _paired(per_query: dict[str, dict[str, float]], model: str, reference: str, measure: str,
            split: str) -> PairedComparison:
    """``model`` against ``reference`` on the test queries: Δ of the means and a paired randomization test."""
    from .compare.stats import randomization_test

    lead, base = per_query[model], per_query[reference]
    queries = sorted(set(lead) & set(base))
    a, b = [lead[q] for q in queries], [base[q] for q in queries]
    return PairedComparison(model, reference, split, measure, sum(a) / len(a) - sum(b) / len(b), len(queries),
                            randomization_test(a, b), {model: lead, reference: base})


@dataclass(frozen=True)
class _Lengths:
    """The student settings :func:`student_from_teacher` reads (the teacher's own pooling/scale are kept)."""

    max_query_length: int
    max_passage_length: int
    pooling: str | None = None
    normalize: bool | None = None
