"""The `leadkd` command. Thin on purpose: parse, call the library, print; no logic of its own.

Errors the user can fix (:class:`leadkd.runtime.errors.LeadkdError`) print one line on stderr and exit 2;
``--debug`` shows the traceback instead.
"""

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

from .runtime.errors import LeadkdError
from .runtime.stopping import Stopped

if TYPE_CHECKING:
    from .data.collection import TextCollection
    from .data.groups import TrainingGroups

EXIT_USER_ERROR = 2
#: ``--dtype`` choices: the torch dtypes a model may be cast to for inference.
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")
#: ``--batch-size`` defaults: 32 on the CPU, where leadkd.accel.cpu's token budget then sets the real size;
#: on a GPU larger batches amortise kernel launches, and leadkd.accel.cuda's token budget caps their padding.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 32, 256


# ---------------------------------------------------------------- shared options

def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .models.base import DEFAULT_MODEL

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
    from .retrieval.evaluate import DEFAULT_MEASURES

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
    from .models import DualEncoder

    for name in ("max_query_length", "max_passage_length", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise LeadkdError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    import torch

    from .runtime.distributed import pick_device

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
    from .data.datasets import load_dataset

    return load_dataset(args.data, split=split or args.split, lenient=args.lenient)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _in_process_group(command):
    """Run ``command`` in torchrun's process group when there is one (gloo on CPU, NCCL on CUDA; see
    leadkd.runtime.distributed), else in the single local process: ``args.process_context`` says which."""
    import functools

    @functools.wraps(command)
    def run(args) -> None:
        from .runtime.distributed import init_distributed

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
    from .data.runs import write_run
    from .retrieval.evaluate import evaluate, format_table, parse_measures, write_metrics, write_per_query
    from .retrieval.pipeline import encode_corpus, encode_queries, search_run
    from .runtime.fileio import check_replaceable

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
        run = search_run(queries, docs, args.k, exclude_same_id=args.exclude_same_id)
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
    from .retrieval.pipeline import encode_corpus_share, encode_queries, save_shards, search_shards
    from .retrieval.search import to_run

    corpus, main = dataset.corpus, _is_main(args)
    rows, share = encode_corpus_share(model, corpus, batch_size=args.batch_size, show_progress=main)
    queries = encode_queries(model, dataset.queries, batch_size=args.batch_size, show_progress=main)
    exclude = None
    if args.exclude_same_id:
        exclude = [{row} if row >= 0 else set() for row in corpus.lookup(queries.ids).tolist()]
    merged = search_shards(queries.vectors, share, rows, args.k, exclude=exclude)
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
    from .data.datasets import load_corpus, load_split_queries
    from .retrieval.pipeline import (
        encode_corpus,
        encode_corpus_share,
        encode_queries,
        encode_queries_share,
        save_shards,
    )
    from .runtime.fileio import check_replaceable

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
    from .retrieval.index import DenseIndex
    from .retrieval.pipeline import Embeddings

    embeddings = Embeddings.load(args.embeddings)
    index = DenseIndex.build(embeddings.vectors, embeddings.ids, kind=args.kind, backend=args.backend)
    index.save(args.output)
    _say(f"wrote a {args.kind} index of {len(embeddings.ids)} vectors to {args.output}")


def cmd_search(args) -> None:
    """Encode a split's queries and search a saved index; write a TREC run."""
    from .data.datasets import load_split_queries
    from .data.runs import write_run
    from .retrieval.index import DenseIndex
    from .retrieval.pipeline import encode_queries

    index = DenseIndex.load(args.index)
    split_queries = load_split_queries(args.data, split=args.split, lenient=args.lenient)  # judgments optional
    model = _load_model(args)
    queries = encode_queries(model, split_queries, batch_size=args.batch_size)
    run = index.search_run(queries.ids, queries.vectors, args.k)
    write_run(run, args.output, tag=args.tag)
    _say(f"wrote {args.output} ({len(run)} queries)")


def cmd_rerank(args) -> None:
    """Rescore each query's top --depth of a run with a cross-encoder; write the new run and its evaluation."""
    from .data.runs import read_run, write_run
    from .models.loading import load_model
    from .retrieval.evaluate import evaluate, format_table, parse_measures, write_metrics, write_per_query
    from .retrieval.rerank import rerank_run
    from .runtime.distributed import pick_device

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
    from .data.formats import read_qrels
    from .data.runs import read_run
    from .retrieval.evaluate import evaluate, format_table, parse_measures, write_metrics, write_per_query

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
    from .config import load_config
    from .distill.trainer import run_job

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
    from .data.groups import write_training_groups
    from .retrieval.mine import mine_hard_negatives, mine_with_ranker
    from .runtime.fileio import atomic_write

    start, _, end = args.range.partition(":")
    try:
        rank_range = (int(start), int(end))
    except ValueError:
        raise LeadkdError(f"--range must look like 10:100, got {args.range!r}") from None
    settings = {"depth": args.depth, "rank_range": rank_range, "negatives": args.negatives, "seed": args.seed}
    groups: TrainingGroups | None  # None under torchrun off rank 0
    if args.retriever == "bm25":  # BM25 ranks by words: no model is loaded
        from .retrieval.bm25 import BM25Ranker, import_bm25s

        import_bm25s()  # a missing package is told before a large corpus is read
        if not _is_main(args):  # BM25 does not shard: under torchrun rank 0 ranks every query alone
            return
        dataset = _load_data(args)
        ranker = BM25Ranker(dataset.corpus, k1=args.bm25_k1, b=args.bm25_b, show_progress=_is_main(args))
        groups, report = mine_with_ranker(ranker, dataset, **settings)
    else:
        dataset = _load_data(args)
        model = _load_model(args)
        from .retrieval.pipeline import Embeddings

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


def cmd_quickstart(args) -> None:
    """Distil all-MiniLM-L6-v2 into a 3-layer student on real data; evaluate; write a report."""
    from .quickstart import QuickstartPlan, run_quickstart

    changes = {"teacher": args.teacher, "seed": args.seed, "joint_teacher": args.joint_teacher}
    plan = QuickstartPlan.fast(**changes) if args.fast else QuickstartPlan(**changes)
    report = run_quickstart(args.data, args.output, plan, log=_say)
    text = report.read_text(encoding="utf-8")
    if "## Test results" in text:  # the table people came for; the rest is in the report
        print(text.split("## Test results", 1)[1].split("\n## ", 1)[0].strip())


def cmd_report(args) -> None:
    """Rebuild a finished run's report (report.md and plots) from its results and logs; a comparison
    folder (or ledger file) gets compare.md and its plots."""
    from .compare.report import render_compare, report_dir
    from .compare.run import load_ledger
    from .reporting.report import build_report

    target = Path(args.run_dir)
    ledger = target if target.suffix == ".json" else target / "compare.json"
    if ledger.is_file():
        _say(f"wrote {render_compare(load_ledger(ledger), report_dir(ledger))}")
        return
    _say(f"wrote {build_report(args.run_dir)}")


def cmd_compare(args) -> None:
    """Train every variant x seed of a comparison spec that is not done yet; write compare.json and compare.md."""
    from .compare.report import render_compare, report_dir
    from .compare.run import load_spec, run_compare

    spec = load_spec(args.spec)
    ledger = run_compare(spec, log=_say, max_rows=args.max_rows, only=set(args.only) if args.only else None)
    _say(f"wrote {spec.ledger} and {render_compare(ledger, report_dir(spec.ledger))}")


# ---------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as every other leadkd error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"leadkd: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="leadkd", description="LEAD distillation and dense retrieval.")
    parser.add_argument("--version", action="version", version=f"leadkd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--threads", type=_positive("--threads"), default=None,
                        help="torch threads (default: torch's choice)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = commands.add_parser("retrieve", help="encode, search, write a run and evaluate, in one go")
    _add_model_options(p)
    _add_data_options(p)
    _add_eval_options(p)
    p.add_argument("--k", type=_positive("--k"), default=1000, help="passages per query (default %(default)s)")
    p.add_argument("--exclude-same-id", action="store_true", help="never return a passage whose id is the query's")
    p.add_argument("--save-embeddings", action="store_true", help="also keep the corpus vectors in OUTPUT")
    p.add_argument("--tag", default="leadkd", help="run tag in the TREC file")
    p.add_argument("--output", required=True, help="folder for run.trec, metrics.json, per_query.jsonl")
    p.set_defaults(func=cmd_retrieve)

    p = commands.add_parser("encode", help="encode a corpus (or queries) into an embeddings folder")
    _add_model_options(p)
    _add_data_options(p)
    p.add_argument("--queries", action="store_true", help="encode the split's queries instead of the corpus")
    p.add_argument("--output", required=True, help="embeddings folder to write")
    p.set_defaults(func=cmd_encode)

    p = commands.add_parser("index", help="build an index from an embeddings folder")
    p.add_argument("--embeddings", required=True, help="folder written by `leadkd encode`")
    p.add_argument("--kind", choices=["flat", "hnsw"], default="flat",
                   help="flat: exact inner product (default); hnsw: approximate FAISS graph")
    p.add_argument("--backend", choices=["torch", "faiss"], default=None,
                   help="flat search by torch matmul + top-k (default, ~2.5x faster here) or FAISS IndexFlatIP")
    p.add_argument("--output", required=True, help="index folder to write")
    p.set_defaults(func=cmd_index)

    p = commands.add_parser("search", help="search an index with a split's queries; write a TREC run")
    _add_model_options(p)
    _add_data_options(p)
    p.add_argument("--index", required=True, help="folder written by `leadkd index`")
    p.add_argument("--k", type=_positive("--k"), default=1000, help="passages per query (default %(default)s)")
    p.add_argument("--tag", default="leadkd", help="run tag in the TREC file")
    p.add_argument("--output", required=True, help="run file to write")
    p.set_defaults(func=cmd_search)

    p = commands.add_parser("rerank", help="rescore a run's top --depth with a cross-encoder; write and evaluate it")
    p.add_argument("--model", required=True, help="a cross-encoder: a reranker folder (transformers or "
                                                  "sentence-transformers) or a leadkd cross-encoder")
    p.add_argument("--run", required=True, help="the first stage's TREC run")
    _add_data_options(p)
    _add_eval_options(p)
    p.add_argument("--depth", type=_positive("--depth"), default=100,
                   help="candidates rescored per query (default %(default)s); the rest are dropped")
    p.add_argument("--activation", action="store_true", help="write the checkpoint's activated scores (e.g. ST's "
                                                             "sigmoid) instead of logits; the ranking is the same")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass (default %(default)s)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled-only weights (tensors only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--tag", default="leadkd-rerank", help="run tag in the TREC file")
    p.add_argument("--output", required=True, help="folder for run.trec, metrics.json, per_query.jsonl")
    p.set_defaults(func=cmd_rerank)

    for name, func, text in (("train", cmd_train, "train one model on ground truth (warm-up)"),
                             ("distill", cmd_distill, "distil a teacher into a student with LEAD")):
        p = commands.add_parser(name, help=text)
        p.add_argument("--config", default=None, help="YAML or JSON config (see docs/configuration.md)")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=5e-5")
        p.set_defaults(func=func)

    p = commands.add_parser("mine", help="mine hard negatives into a training-groups file")
    _add_model_options(p)
    _add_data_options(p, split_default="train")
    p.add_argument("--depth", type=_positive("--depth"), default=200, help="passages retrieved per query")
    p.add_argument("--range", default="10:100",
                   help="ranks to sample negatives from, start:end (1-based, end excluded)")
    p.add_argument("--negatives", type=_positive("--negatives"), default=30, help="negatives kept per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retriever", choices=["dense", "bm25"], default="dense",
                   help="dense: --model's exact search (default); bm25: bm25s, no model (leadkd[bm25])")
    p.add_argument("--bm25-k1", type=float, default=1.2, help="BM25 k1 (default %(default)s, BEIR's baseline)")
    p.add_argument("--bm25-b", type=float, default=0.75, help="BM25 b (default %(default)s, BEIR's baseline)")
    p.add_argument("--output", required=True, help="training-groups jsonl to write")
    p.add_argument("--corpus-embeddings", default=None, metavar="FOLDER",
                   help="passage vectors written by `leadkd encode` with the same model, used instead of "
                        "encoding the corpus again")
    p.set_defaults(func=cmd_mine)

    p = commands.add_parser("quickstart", help="LEAD end to end on real data: mine, warm up, distil, evaluate, report")
    p.add_argument("--data", default="scifact",
                   help="BEIR folder or name under $LEADKD_DATA_DIR with train and test (and dev) qrels, or an "
                        "ir_datasets id such as irds:beir/scifact (its train/dev/test splits; default %(default)s)")
    p.add_argument("--output", default="runs/quickstart", help="run folder (default %(default)s); rerun to continue")
    p.add_argument("--fast", action="store_true", help="a 2-minute smoke run on a slice of the data")
    p.add_argument("--teacher", default="all-MiniLM-L6-v2", help="teacher model folder or hub name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--joint-teacher", action="store_true",
                   help="train the teacher jointly in both arms, as the paper does (about 2.5x each arm's time); "
                        "by default the arms distil from the frozen teacher through a shared vector cache")
    p.set_defaults(func=cmd_quickstart)

    p = commands.add_parser("report", help="rebuild report.md and plots of a finished run")
    p.add_argument("run_dir", help="the run folder (e.g. the quickstart's --output), or a comparison's folder "
                                   "or compare.json")
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("compare", help="distil named variants over seeds; paired deltas, CIs and p-values")
    p.add_argument("spec", help="comparison spec (YAML; see docs/compare.md)")
    p.add_argument("--max-rows", type=_positive("--max-rows"), default=None,
                   help="stop after this many new rows (rerun to continue)")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="run only these variants' rows")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("evaluate", help="evaluate a TREC run with ir-measures")
    p.add_argument("--run", required=True, help="TREC run file")
    p.add_argument("--qrels", default=None, help="qrels file (TREC, BEIR tsv or 2-column)")
    p.add_argument("--data", default=None, help="or a dataset, whose --split qrels are used")
    p.add_argument("--split", default="test")
    p.add_argument("--lenient", action="store_true")
    _add_eval_options(p)
    p.add_argument("--output", default=None, help="metrics JSON to write")
    p.add_argument("--per-query", default=None, help="per-query JSONL to write")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        args.func(args)
    except Stopped as exc:  # SIGTERM/SIGINT: checkpointed; the shell's status for that signal
        hint = "; run the same compare again to continue" if args.func is cmd_compare else ""
        print(f"leadkd: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except LeadkdError as exc:
        if args.debug:
            raise
        print(f"leadkd: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # an output path that cannot be written: the user's to fix, not a bug
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"leadkd: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("leadkd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
