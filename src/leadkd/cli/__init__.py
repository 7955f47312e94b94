"""The `leadkd` command. Thin on purpose: parse, call the library, print; no logic of its own.

Errors the user can fix (:class:`leadkd.runtime.errors.LeadkdError`) print one line on stderr and exit 2;
``--debug`` shows the traceback instead. The commands are :mod:`leadkd.cli.commands`; this module is the
parser and the exit codes.
"""

from __future__ import annotations

import argparse
import sys

from ..runtime.errors import LeadkdError
from ..runtime.stopping import Interrupted, InterruptOnSignal, Stopped
from .commands import (
    CPU_BATCH_SIZE,
    EXIT_USER_ERROR,
    GPU_BATCH_SIZE,
    _add_data_options,
    _add_eval_options,
    _add_model_options,
    _positive,
    cmd_compare,
    cmd_distill,
    cmd_encode,
    cmd_evaluate,
    cmd_index,
    cmd_mine,
    cmd_quickstart,
    cmd_report,
    cmd_rerank,
    cmd_retrieve,
    cmd_score_teacher,
    cmd_search,
    cmd_train,
)

__all__ = ["main", "build_parser", "CPU_BATCH_SIZE", "GPU_BATCH_SIZE", "EXIT_USER_ERROR"]


# ---------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as every other leadkd error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"leadkd: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
                   help="flat search by torch matmul + top-k (default: deterministic ties, GPU-capable; ~1.3x "
                        "FAISS's time on a quiet CPU) or FAISS IndexFlatIP")
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

    p = commands.add_parser("score-teacher", help="score every training group with a frozen teacher once, at "
                                                  "every layer, for teacher.scores")
    p.add_argument("--teacher", required=True, help="any teacher.path: a leadkd folder, a sentence-transformers "
                                                    "model, an HF/ST reranker, a PyLate or ColBERTv2 checkpoint")
    p.add_argument("--data", required=True, help="the corpus the groups name (BEIR folder or name, as for distill)")
    p.add_argument("--groups", required=True, help="the training-groups file (data.train_groups)")
    p.add_argument("--output", required=True, help="score folder to write; run again to continue or check it")
    p.add_argument("--layers", default="all", help="teacher layers stored: all (default) or e.g. 0,3,7,11")
    p.add_argument("--candidates", type=int, default=None, metavar="N",
                   help="each group's positives and its first N mined negatives (default: all of them)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored type (default %(default)s)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=8, help="groups per forward (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--colbert-last-layer", choices=["raw", "final"], default="raw",
                   help="a ColBERT teacher's last layer in the layer view, as loss.colbert_last_layer (default raw)")
    p.add_argument("--bf16", action="store_true", help="run the teacher under bfloat16 autocast (a GPU's fast "
                                                       "path; scores then differ from float32 by its rounding)")
    p.add_argument("--overwrite", action="store_true", help="replace a score folder of another request")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE",
                   help="teacher options as in a config's teacher section, e.g. kind=cross_encoder "
                        "max_passage_length=180 (default kind: what the folder holds)")
    p.set_defaults(func=cmd_score_teacher)

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
        with InterruptOnSignal():  # outside a training loop's steps a signal stops where it lands, cleanly
            args.func(args)
    except Stopped as exc:  # SIGTERM/SIGINT: checkpointed; the shell's status for that signal
        hint = "; run the same compare again to continue" if args.func is cmd_compare else ""
        print(f"leadkd: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:  # a signal outside the steps: every output is whole or absent
        again = "with --resume " if args.func in (cmd_train, cmd_distill) else ""
        print(f"leadkd: {exc}; no output was left half-written; run the same command again {again}to continue",
              file=sys.stderr)
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

