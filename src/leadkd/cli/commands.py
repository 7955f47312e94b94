"""What each `leadkd` command does: read its arguments, call the library, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Before torch is imported: with the default OpenMP spin-wait, torch threads stall 10-50x on a busy CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ..runtime.errors import LeadkdError

if TYPE_CHECKING:
    from ..data.collection import TextCollection
    from ..data.groups import TrainingGroups

EXIT_USER_ERROR = 2
#: ``--dtype`` choices: the torch dtypes a model may be cast to for inference.
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")
#: ``--batch-size`` defaults: 32 on the CPU, where leadkd.accel.cpu's token budget then sets the real size;
#: on a GPU larger batches amortise kernel launches, and leadkd.accel.cuda's token budget caps their padding.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 32, 256


# ---------------------------------------------------------------- shared options

def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from ..models.base import DEFAULT_MODEL

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="model folder or hub name (default: %(default)s, served offline from its PyPI package)")
    group.add_argument("--pooling", choices=["cls", "mean"], default=None,
                       help="pooling (default: from the model's sentence-transformers metadata, else cls)")
    group.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                       help="L2-normalise vectors, i.e. cosine scores (default: from the model's metadata)")
    group.add_argument("--max-query-length", type=int, default=None, help="query tokens kept (default 64)")
    group.add_argument("--max-passage-length", type=int, default=None,
                       help="passage tokens kept (default: the model's max_seq_length, else 256)")
    group.add_argument("--query-prefix", default=None, help="text prepended to every query (e.g. 'query: ')")
    group.add_argument("--passage-prefix", default=None, help="text prepended to every passage")
    group.add_argument("--batch-size", type=int, default=None,
                       help="texts per encoding batch (default: 32 on the CPU; 256 on a GPU, where a batch also "
                            "stops at 32768 padded tokens)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow a model folder to run its own Python code (off by default)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="accept a model folder whose weights are only pickled (pytorch_model.bin), still "
                            "unpickling tensors only (off by default: safetensors only, as a pickle can carry code)")
    group.add_argument("--device", default="auto",
                       help="auto (a GPU when there is one), cpu, cuda or cuda:N (default %(default)s)")
    group.add_argument("--dtype", choices=INFERENCE_DTYPES, default="float32",
                       help="the weights' type for inference (default %(default)s; bfloat16 on a GPU is about "
                            "what sentence-transformers' torch_dtype=bfloat16 gives, docs/benchmarks.md)")


def _add_data_options(parser: argparse.ArgumentParser, split_default: str | None = "test") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True,
                       help="BEIR folder, dataset name under $LEADKD_DATA_DIR, or irds:<ir_datasets id>")
    group.add_argument("--split", default=split_default, help="qrels split (default: %(default)s)")
    group.add_argument("--lenient", action="store_true",
                       help="drop judgments naming unknown ids with a warning instead of stopping")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    from ..retrieval.evaluate import DEFAULT_MEASURES

    group = parser.add_argument_group("evaluation")
    group.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES),
                       help="ir-measures names (default: %(default)s)")
    group.add_argument("--rel", type=int, default=None,
                       help="minimum relevance, as trec_eval -l (2 for TREC DL): binary measures, NumRelRet and "
                            "NumRel; nDCG stays graded, NumRet counts everything retrieved")


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {value}")
        return value
    return parse


def _load_model(args):
    from ..models import DualEncoder

    for name in ("max_query_length", "max_passage_length", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise LeadkdError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    import torch

    from ..runtime.distributed import pick_device

    context = getattr(args, "process_context", None)  # set by _in_process_group: cuda:LOCAL_RANK under torchrun
    device = context.device if context is not None else pick_device(args.device)  # checked before the slow load
    if getattr(args, "batch_size", 0) is None:
        args.batch_size = GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
    return DualEncoder.from_pretrained(
        args.model, pooling=args.pooling, normalize=args.normalize, query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix, max_query_length=args.max_query_length,
        max_passage_length=args.max_passage_length, trust_remote_code=args.trust_remote_code,
        use_safetensors=not args.allow_pickle).to(device=device, dtype=getattr(torch, args.dtype))


def _load_data(args, split: str | None = None):
    from ..data.datasets import load_dataset

    return load_dataset(args.data, split=split or args.split, lenient=args.lenient)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _in_process_group(command):
    """Run ``command`` in torchrun's process group when there is one (gloo on CPU, NCCL on CUDA; see
    leadkd.runtime.distributed), else in the single local process: ``args.process_context`` says which."""
    import functools

    @functools.wraps(command)
    def run(args) -> None:
        from ..runtime.distributed import init_distributed

        args.process_context = init_distributed(device=args.device)
        try:
            command(args)
        finally:
            args.process_context.cleanup()
    return run


def _is_main(args) -> bool:
    """Whether this process prints and writes: rank 0 under torchrun, always in one process."""
    context = getattr(args, "process_context", None)
    return context is None or context.is_main


def _is_sharded(args) -> bool:
    context = getattr(args, "process_context", None)
    return context is not None and context.is_distributed


# ---------------------------------------------------------------- commands

@_in_process_group
def cmd_retrieve(args) -> None:
    """Encode the corpus and the split's queries, search exactly, write the run, evaluate.

    Under torchrun each process encodes and searches its share of the corpus; rank 0 merges and writes."""
    from ..data.runs import write_run
    from ..retrieval.evaluate import evaluate, format_table, parse_measures, write_metrics, write_per_query
    from ..retrieval.pipeline import encode_corpus, encode_queries, search_device, search_run
    from ..runtime.fileio import check_replaceable

    started = time.perf_counter()
    parse_measures(args.measures, rel=args.rel)  # a typo must fail before minutes of encoding
    output = Path(args.output)
    if args.save_embeddings:
        check_replaceable(output / "corpus_embeddings")
    dataset = _load_data(args)
    model = _load_model(args)
    if _is_main(args):
        _say(f"{dataset.name}/{dataset.split}: {len(dataset.corpus)} passages, {len(dataset.queries)} queries")
    if _is_sharded(args):
        run = _retrieve_sharded(args, model, dataset, output)
        if run is None:  # not rank 0
            return
        docs = None
    else:
        docs = encode_corpus(model, dataset.corpus, batch_size=args.batch_size)
        queries = encode_queries(model, dataset.queries, batch_size=args.batch_size)
        run = search_run(queries, docs, args.k, exclude_same_id=args.exclude_same_id, device=search_device(model))
    write_run(run, output / "run.trec", tag=args.tag)
    aggregate, per_query = evaluate(run, dataset.qrels, measures=args.measures, rel=args.rel)
    write_metrics(aggregate, output / "metrics.json")
    write_per_query(per_query, output / "per_query.jsonl")
    if args.save_embeddings and docs is not None:
        docs.save(output / "corpus_embeddings")
    print(format_table(aggregate))
    _say(f"wrote {output}/run.trec, metrics.json, per_query.jsonl in {time.perf_counter() - started:.0f} s")


def _retrieve_sharded(args, model, dataset, output: Path):
    """`retrieve` under torchrun: this process's share of the corpus searched, the run merged on rank 0
    (None elsewhere); with --save-embeddings the shares become one folder."""
    from ..retrieval.pipeline import encode_corpus_share, encode_queries, save_shards, search_device, search_shards
    from ..retrieval.search import to_run

    corpus, main = dataset.corpus, _is_main(args)
    rows, share = encode_corpus_share(model, corpus, batch_size=args.batch_size, show_progress=main)
    queries = encode_queries(model, dataset.queries, batch_size=args.batch_size, show_progress=main)
    exclude = None
    if args.exclude_same_id:
        exclude = [{row} if row >= 0 else set() for row in corpus.lookup(queries.ids).tolist()]
    merged = search_shards(queries.vectors, share, rows, args.k, exclude=exclude, device=search_device(model))
    if args.save_embeddings:
        save_shards(output / "corpus_embeddings", corpus.ids, rows, share,
                    {"what": "passages", "count": len(corpus), "dim": int(share.shape[-1])})
    return None if merged is None else to_run(queries.ids, corpus.ids, *merged)


@_in_process_group
def cmd_encode(args) -> None:
    """Encode a dataset's corpus (or queries) into an embeddings folder.

    Reads only what it encodes: the corpus, or the split's queries (the judged ones when the split has
    qrels, else all); no judgments are needed. Under torchrun each process encodes its share and rank 0
    writes the folder."""
    from ..data.datasets import load_corpus, load_split_queries
    from ..retrieval.pipeline import (
        encode_corpus,
        encode_corpus_share,
        encode_queries,
        encode_queries_share,
        save_shards,
    )
    from ..runtime.fileio import check_replaceable

    check_replaceable(Path(args.output))  # before minutes of encoding
    texts: TextCollection  # the queries or the corpus
    if args.queries:
        texts = load_split_queries(args.data, split=args.split, lenient=args.lenient)
    else:
        texts = load_corpus(args.data)
    model = _load_model(args)
    extra = {"model": str(args.model), "data": str(args.data)}
    if _is_sharded(args):
        share_encoder = encode_queries_share if args.queries else encode_corpus_share
        rows, vectors = share_encoder(model, texts, batch_size=args.batch_size, show_progress=_is_main(args))
        what = "queries" if args.queries else "passages"
        dim = int(vectors.shape[-1])
        save_shards(args.output, texts.ids, rows, vectors, {"what": what, "count": len(texts), "dim": dim, **extra})
        if _is_main(args):
            _say(f"wrote {len(texts)} vectors of {dim} dims to {args.output}")
        return
    if args.queries:
        embeddings = encode_queries(model, texts, batch_size=args.batch_size)
    else:
        embeddings = encode_corpus(model, texts, batch_size=args.batch_size)
    embeddings.meta.update(extra)
    embeddings.save(args.output)
    _say(f"wrote {len(embeddings.ids)} vectors of {embeddings.vectors.shape[1]} dims to {args.output}")


def cmd_index(args) -> None:
    """Build a FAISS (or exact) index from an embeddings folder."""
    from ..retrieval.index import DenseIndex
    from ..retrieval.pipeline import Embeddings

    embeddings = Embeddings.load(args.embeddings)
    index = DenseIndex.build(embeddings.vectors, embeddings.ids, kind=args.kind, backend=args.backend)
    index.save(args.output)
    _say(f"wrote a {args.kind} index of {len(embeddings.ids)} vectors to {args.output}")


def cmd_search(args) -> None:
    """Encode a split's queries and search a saved index; write a TREC run."""
    from ..data.datasets import load_split_queries
    from ..data.runs import write_run
    from ..retrieval.index import DenseIndex
    from ..retrieval.pipeline import encode_queries

    index = DenseIndex.load(args.index)
    split_queries = load_split_queries(args.data, split=args.split, lenient=args.lenient)  # judgments optional
    model = _load_model(args)
    queries = encode_queries(model, split_queries, batch_size=args.batch_size)
    run = index.search_run(queries.ids, queries.vectors, args.k)
    write_run(run, args.output, tag=args.tag)
    _say(f"wrote {args.output} ({len(run)} queries)")


def cmd_rerank(args) -> None:
    """Rescore each query's top --depth of a run with a cross-encoder; write the new run and its evaluation."""
    from ..data.runs import read_run, write_run
    from ..models.loading import load_model
    from ..retrieval.evaluate import evaluate, format_table, parse_measures, write_metrics, write_per_query
    from ..retrieval.rerank import rerank_run
    from ..runtime.distributed import pick_device

    parse_measures(args.measures, rel=args.rel)
    output = Path(args.output)
    run = read_run(args.run)
    dataset = _load_data(args)
    model = load_model(args.model, use_safetensors=not args.allow_pickle).to(pick_device(args.device))
    started = time.perf_counter()
    reranked = rerank_run(model, run, dataset.queries, dataset.corpus, depth=args.depth, batch_size=args.batch_size,
                          activation=args.activation)
    write_run(reranked, output / "run.trec", tag=args.tag)
    aggregate, per_query = evaluate(reranked, dataset.qrels, measures=args.measures, rel=args.rel)
    write_metrics(aggregate, output / "metrics.json")
    write_per_query(per_query, output / "per_query.jsonl")
    print(format_table(aggregate))
    _say(f"wrote {output}/run.trec, metrics.json, per_query.jsonl ({len(reranked)} queries reranked to depth "
         f"{args.depth} in {time.perf_counter() - started:.0f} s)")


def cmd_evaluate(args) -> None:
    """Score a run file against qrels with ir-measures."""
    from ..data.formats import read_qrels
    from ..data.runs import read_run
    from ..retrieval.evaluate import evaluate, format_table, parse_measures, write_metrics, write_per_query

    if (args.qrels is None) == (args.data is None):
        raise LeadkdError("pass either --qrels FILE or --data D --split S")
    parse_measures(args.measures, rel=args.rel)
    qrels = read_qrels(args.qrels) if args.qrels else _load_data(args).qrels
    run = read_run(args.run)
    aggregate, per_query = evaluate(run, qrels, measures=args.measures, rel=args.rel)
    if args.output:
        write_metrics(aggregate, args.output)
    if args.per_query:
        write_per_query(per_query, args.per_query)
    print(format_table(aggregate))


def _run_training(args, kind: str) -> None:
    from ..config import load_config
    from ..distill.trainer import run_job

    config = load_config(args.config, args.overrides, kind=kind)
    result = run_job(config, resume=args.resume, log=_say)
    if result.get("best"):
        best = result["best"]
        _say(f"best dev {best['metric']} = {best['value']:.4f} at step {best['step']}")


def cmd_train(args) -> None:
    """Train one model (dual encoder, ColBERT or cross-encoder) on ground truth: the warm-up stage."""
    _run_training(args, "train")


def cmd_distill(args) -> None:
    """Distil a teacher into a dual-encoder student with LEAD (or a baseline loss)."""
    _run_training(args, "distill")


@_in_process_group
def cmd_mine(args) -> None:
    """Mine hard negatives with a retriever (dense: --model; bm25: no model); write a training-groups file."""
    from ..data.groups import write_training_groups
    from ..retrieval.mine import mine_hard_negatives, mine_with_ranker
    from ..runtime.fileio import atomic_write

    start, _, end = args.range.partition(":")
    try:
        rank_range = (int(start), int(end))
    except ValueError:
        raise LeadkdError(f"--range must look like 10:100, got {args.range!r}") from None
    settings = {"depth": args.depth, "rank_range": rank_range, "negatives": args.negatives, "seed": args.seed}
    groups: TrainingGroups | None  # None under torchrun off rank 0
    if args.retriever == "bm25":  # BM25 ranks by words: no model is loaded
        from ..retrieval.bm25 import BM25Ranker, import_bm25s

        import_bm25s()  # a missing package is told before a large corpus is read
        if not _is_main(args):  # BM25 does not shard: under torchrun rank 0 ranks every query alone
            return
        dataset = _load_data(args)
        ranker = BM25Ranker(dataset.corpus, k1=args.bm25_k1, b=args.bm25_b, show_progress=_is_main(args))
        groups, report = mine_with_ranker(ranker, dataset, **settings)
    else:
        dataset = _load_data(args)
        model = _load_model(args)
        from ..retrieval.pipeline import Embeddings

        corpus_embeddings = Embeddings.load_passages(args.corpus_embeddings) if args.corpus_embeddings else None
        groups, report = mine_hard_negatives(model, dataset, **settings, batch_size=args.batch_size,
                                             corpus_embeddings=corpus_embeddings, show_progress=_is_main(args))
    if groups is None:  # under torchrun, not rank 0: rank 0 merged the shares' results and writes
        return
    write_training_groups(groups, args.output)
    with atomic_write(Path(str(args.output) + ".report.json")) as handle:
        handle.write(json.dumps(report.as_dict(), indent=2))
    _say(report.summary())
    _say(f"wrote {args.output} ({len(groups)} groups)")


@_in_process_group
def cmd_score_teacher(args) -> None:
    """Score every training group with a frozen teacher once, per layer, into a score folder (teacher.scores)."""
    from ..config import teacher_config
    from ..distill.score_teacher import score_teacher
    from ..models.loading import detect_kind

    options = list(args.options)
    if not any(option.startswith("kind=") for option in options):
        options.append(f"kind={detect_kind(args.teacher)}")  # as load_model opens the folder
    teacher = teacher_config(args.teacher, options)
    score_teacher(teacher, args.data, args.groups, args.output, layers=args.layers, negatives=args.candidates,
                  dtype=args.dtype, batch_size=args.batch_size, raw_last_layer=args.colbert_last_layer == "raw",
                  overwrite=args.overwrite, bf16=args.bf16, ctx=args.process_context, log=_say,
                  show_progress=_is_main(args))


def cmd_quickstart(args) -> None:
    """Distil all-MiniLM-L6-v2 into a 3-layer student on real data; evaluate; write a report."""
    from ..quickstart import QuickstartPlan, run_quickstart

    changes = {"teacher": args.teacher, "seed": args.seed, "joint_teacher": args.joint_teacher}
    plan = QuickstartPlan.fast(**changes) if args.fast else QuickstartPlan(**changes)
    report = run_quickstart(args.data, args.output, plan, log=_say)
    text = report.read_text(encoding="utf-8")
    if "## Test results" in text:  # the table people came for; the rest is in the report
        print(text.split("## Test results", 1)[1].split("\n## ", 1)[0].strip())


def cmd_report(args) -> None:
    """Rebuild a finished run's report (report.md and plots) from its results and logs; a comparison
    folder (or ledger file) gets compare.md and its plots."""
    from ..compare.report import render_compare, report_dir
    from ..compare.run import load_ledger
    from ..reporting.report import build_report

    target = Path(args.run_dir)
    ledger = target if target.suffix == ".json" else target / "compare.json"
    if ledger.is_file():
        _say(f"wrote {render_compare(load_ledger(ledger), report_dir(ledger))}")
        return
    _say(f"wrote {build_report(args.run_dir)}")


def cmd_compare(args) -> None:
    """Train every variant x seed of a comparison spec that is not done yet; write compare.json and compare.md."""
    from ..compare.report import render_compare, report_dir
    from ..compare.run import load_spec, run_compare

    spec = load_spec(args.spec)
    ledger = run_compare(spec, log=_say, max_rows=args.max_rows, only=set(args.only) if args.only else None)
    _say(f"wrote {spec.ledger} and {render_compare(ledger, report_dir(spec.ledger))}")
