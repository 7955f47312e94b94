"""The bad-input catalogue: every way a user's file or option can be wrong, driven through the CLI.

Each case is (command line, input files, expected substrings of the error). A bad input must end as a user
error: exit status 2, nothing on stdout, exactly one stderr line starting ``leadkd: error:`` that names the
file (and the line and field where there is one), and no traceback. The ``ok`` cases (BOM, CRLF, ties in a
run, relevance -1, fields after the run tag, ``#`` comments) must instead succeed.

Inputs live in ``tests/bad_inputs/`` (see its README); the big ones are generated in ``tmp_path``.
A case names its inputs with placeholders:

``{B}``       the ``tests/bad_inputs`` folder
``{D}``       a small, valid BEIR folder built for this case (corpus doc-1..doc-3, queries q1 q2, test qrels);
              ``files`` replaces some of its files with fixtures (``{"corpus.jsonl": "corpus_bad_json.jsonl"}``)
``{T}``       this case's ``tmp_path`` (outputs, generated files)
``{model}``   a tiny 2-layer BERT folder;  ``{teacher}`` a 4-layer one;  ``{deep}`` a 6-layer one
``{tiny}``    a tiny BEIR folder (d0..d23, q0..q11) and ``{groups}`` training groups over it
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.cli import main

B = Path(__file__).parent / "bad_inputs"

CORPUS = [{"_id": "doc-1", "title": "", "text": "the cell protein"},
          {"_id": "doc-2", "title": "Heart", "text": "blood drug dose"},
          {"_id": "doc-3", "title": "", "text": "brain virus vaccine"}]
QUERIES = [{"_id": "q1", "text": "cell protein"}, {"_id": "q2", "text": "heart blood"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\tdoc-1\t1\nq2\tdoc-2\t1\n"


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str] = field(default_factory=list)  # substrings of the one error line (placeholders filled)
    files: dict[str, str] = field(default_factory=dict)  # {D}-relative target -> fixture name in {B}
    make: Callable[[Path], None] | None = None  # builds generated inputs under {T}
    ok: bool = False  # the input is valid: the command must succeed (and print ``stdout`` substrings)
    stdout: list[str] = field(default_factory=list)
    slow: bool = False


def _enc(*extra: str) -> list[str]:
    """`leadkd encode` on {D}: it loads the corpus (only: it needs no queries or judgments) before the model."""
    return ["encode", "--model", "{model}", "--max-query-length", "16", "--max-passage-length", "32",
            "--data", "{D}", "--output", "{T}/emb", *extra]


def _all(*extra: str) -> list[str]:
    """`leadkd retrieve` on {D}: it loads corpus, queries and qrels (checked against both) before the model."""
    return ["retrieve", "--model", "{model}", "--max-query-length", "16", "--max-passage-length", "32",
            "--data", "{D}", "--output", "{T}/ret", *extra]


def _eval(run: str, qrels: str = "{D}/qrels/test.tsv") -> list[str]:
    return ["evaluate", "--run", run, "--qrels", qrels]


def _train(*overrides: str) -> list[str]:
    values = {"model.path": "{model}", "model.max_query_length": "16", "model.max_passage_length": "32",
              "data.corpus": "{D}", "data.num_negatives": "1", "optim.steps": "1", "optim.batch_size": "1",
              "eval.split": "null", "output_dir": "{T}/out"}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = value
    return ["train", *[f"{k}={v}" for k, v in values.items()]]


def _distill(*overrides: str) -> list[str]:
    values = {"teacher.path": "{teacher}", "teacher.max_query_length": "16", "teacher.max_passage_length": "32",
              "student.init": "teacher_layers=[0,2]", "student.max_query_length": "16",
              "student.max_passage_length": "32", "data.corpus": "{tiny}", "data.train_groups": "{groups}",
              "data.num_negatives": "3", "optim.steps": "1", "optim.batch_size": "4", "layers.k": "2",
              "eval.split": "null", "output_dir": "{T}/out"}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = value
    return ["distill", *[f"{k}={v}" for k, v in values.items() if v != "<drop>"]]


# -- generated inputs ------------------------------------------------------------------------------------
BIG = 50 * 1024 * 1024


def _big_corpus_line(tmp: Path) -> None:
    """A 50 MB corpus line that never ends (no closing quote, no newline)."""
    with open(tmp / "big_corpus.jsonl", "wb") as f:
        f.write(b'{"_id": "doc-1", "text": "')
        f.write(b"a" * BIG)


def _big_valid_line(tmp: Path) -> None:
    """A valid 50 MB passage on one line: accepted (no line-length limit)."""
    with open(tmp / "big_ok.jsonl", "wb") as f:
        f.write(b'{"_id": "doc-1", "text": "')
        f.write(b"cell " * (BIG // 5))
        f.write(b'"}\n')
        for rec in CORPUS[1:]:
            f.write(json.dumps(rec).encode() + b"\n")


def _big_run_line(tmp: Path) -> None:
    with open(tmp / "big.trec", "wb") as f:
        f.write(b"q1 Q0 doc-1 1 2.5 t\n")
        f.write(b"q1 Q0 " + b"x" * BIG + b"\n")  # one 50 MB token: 3 columns


def _not_json_config(tmp: Path) -> None:
    (tmp / "badmodel").mkdir()
    (tmp / "badmodel" / "config.json").write_text("{not json", encoding="utf-8")


def _model_without_weights(tmp: Path) -> None:
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                               "num_hidden_layers": 2, "num_attention_heads": 2,
                                                               "intermediate_size": 64, "vocab_size": 60}))


def _file_not_folder(tmp: Path) -> None:
    (tmp / "model.txt").write_text("not a model\n", encoding="utf-8")


CASES: list[Case] = [
    # -- JSON lines: truncated, invalid, not an object ------------------------------------------------
    Case("corpus-truncated-json", _enc(), ["{D}/corpus.jsonl:2: invalid JSON"],
         {"corpus.jsonl": "corpus_bad_json.jsonl"}),
    Case("corpus-invalid-json", _enc(), ["{D}/corpus.jsonl:2: invalid JSON: Expecting value"],
         {"corpus.jsonl": "corpus_invalid_json.jsonl"}),
    Case("corpus-line-not-an-object", _enc(), ["{D}/corpus.jsonl:2: expected a JSON object, found array"],
         {"corpus.jsonl": "corpus_not_object.jsonl"}),
    Case("groups-truncated-json", _train("data.train_groups={B}/groups_truncated.jsonl"),
         ["{B}/groups_truncated.jsonl:2: invalid JSON"]),
    # -- ids: missing or duplicate ------------------------------------------------------------------------
    Case("corpus-missing-id", _enc(), ["{D}/corpus.jsonl:2: field '_id': missing"],
         {"corpus.jsonl": "corpus_missing_id.jsonl"}),
    Case("corpus-duplicate-id", _enc(), ["{D}/corpus.jsonl:3: field '_id': duplicate id 'doc-1' (first on line 1)"],
         {"corpus.jsonl": "corpus_duplicate_id.jsonl"}),
    Case("queries-duplicate-id", _all(), ["{D}/queries.jsonl:3: field '_id': duplicate id 'q2' (first on line 2)"],
         {"queries.jsonl": "queries_duplicate_id.jsonl"}),
    Case("queries-missing-text", _all(), ["{D}/queries.jsonl:2: field 'text': missing"],
         {"queries.jsonl": "queries_missing_text.jsonl"}),
    # -- qrels header --------------------------------------------------------------------------------------
    Case("qrels-wrong-header", _all(), ["{D}/qrels/test.tsv:1: expected the header 'query-id<TAB>corpus-id<TAB>score'"],
         {"qrels/test.tsv": "qrels_bad_header.tsv"}),
    Case("qrels-missing-header", _all(), ["{D}/qrels/test.tsv:1: expected the header", "q1<TAB>doc-1<TAB>1"],
         {"qrels/test.tsv": "qrels_no_header.tsv"}),
    Case("qrels-mixed-columns", _eval("{B}/run_ties_ok.trec", "{B}/qrels_mixed.trec"),
         ["{B}/qrels_mixed.trec:2: expected 4 columns (qid iter docid rel) as on line 1, found 2"]),
    # -- scores ----------------------------------------------------------------------------------------------
    Case("qrels-non-numeric-score", _all(), ["{D}/qrels/test.tsv:3: field 'score': 'high' is not a number"],
         {"qrels/test.tsv": "qrels_nonnumeric.tsv"}),
    # relevance -1 (trec_eval >= 8.1: pooled but unjudged) is legal and not relevant: q1's doc-3 ranks first
    # but doc-1 third (RR 1/3, nDCG 1/log2(4)), q2's doc-2 first; a -1 gain or a -1 counted relevant would differ.
    Case("qrels-negative-score-ok", _all(), files={"qrels/test.tsv": "qrels_negative_ok.tsv"}, ok=True),
    Case("qrels-negative-score-evaluate-ok", _eval("{B}/run_ties_ok.trec", "{B}/qrels_negative_ok.tsv"), ok=True,
         stdout=["nDCG@10  0.7500", "RR@10    0.6667"]),
    Case("qrels-minus-one-ok", _eval("{B}/run_ties_ok.trec", "{B}/qrels_minus_one_ok.trec"), ok=True,
         stdout=["nDCG@10  0.7500", "RR@10    0.6667"]),
    Case("run-non-finite-score", _eval("{B}/run_nan_score.trec"),
         ["{B}/run_nan_score.trec:2: field 'score': score 'nan' is not finite"]),
    Case("run-negative-scores-ok", _eval("{B}/run_negative_score_ok.trec"), ok=True),
    Case("groups-non-numeric-teacher-score", _train("data.train_groups={B}/groups_negative_score.jsonl"),
         ["{B}/groups_negative_score.jsonl:1: field 'teacher_scores': scores must be finite numbers, got 'high'"]),
    # -- qrels naming unknown ids ------------------------------------------------------------------------
    Case("qrels-unknown-document", _all(),
         ["{D}/qrels/test.tsv:3: field 'corpus-id': document id 'doc-9' is not in the passage collection"],
         {"qrels/test.tsv": "qrels_unknown_doc.tsv"}),
    Case("qrels-unknown-query", _all(),
         ["{D}/qrels/test.tsv:3: field 'query-id': query id 'q7' is not in the query collection"],
         {"qrels/test.tsv": "qrels_unknown_query.tsv"}),
    Case("groups-unknown-passage", _train("data.train_groups={B}/groups_unknown_passage.jsonl"),
         ["{B}/groups_unknown_passage.jsonl:2: field 'negatives[0]': passage 'doc-404' is not in the corpus"]),
    # -- empty texts, empty corpus ------------------------------------------------------------------------
    Case("queries-empty-text", _all(), ["{D}/queries.jsonl:2: field 'text': empty"],
         {"queries.jsonl": "queries_empty_text.jsonl"}),
    Case("corpus-empty-text", _enc(), ["{D}/corpus.jsonl:2: field 'text': empty (and no title)"],
         {"corpus.jsonl": "corpus_empty_text.jsonl"}),
    Case("corpus-empty", _enc(), ["{D}/corpus.jsonl: no", "records (the file is empty or blank)"],
         {"corpus.jsonl": "corpus_empty.jsonl"}),
    Case("collection-ragged-tsv", ["evaluate", "--run", "{B}/run_ties_ok.trec", "--data", "{T}/marco"],
         ["{T}/marco/collection.tsv:3: expected 2 (pid, text) tab-separated columns as on line 1, found 3"],
         make=lambda t: _marco(t)),
    # -- a 50 MB single line --------------------------------------------------------------------------------
    Case("corpus-50MB-unterminated-line", _enc(), ["{D}/corpus.jsonl:1: invalid JSON: Unterminated string"],
         {"corpus.jsonl": "{T}/big_corpus.jsonl"}, make=_big_corpus_line),
    Case("run-50MB-line", _eval("{T}/big.trec"), ["{T}/big.trec:2: expected 6 columns", "found 3"],
         make=_big_run_line),
    Case("corpus-50MB-valid-line-ok", _enc(), files={"corpus.jsonl": "{T}/big_ok.jsonl"}, make=_big_valid_line, ok=True,
         slow=True),  # ~65 s: the tokenizer splits all 10M words before truncating to 32 tokens
    # -- BOM and CRLF: accepted ------------------------------------------------------------------------------
    Case("bom-crlf-dataset-ok", _all(), ok=True,
         files={"corpus.jsonl": "corpus_bom_crlf_ok.jsonl", "queries.jsonl": "queries_bom_crlf_ok.jsonl",
                "qrels/test.tsv": "qrels_bom_crlf_ok.tsv"}),
    Case("bom-crlf-run-and-qrels-ok", _eval("{B}/run_bom_crlf_ok.trec", "{B}/qrels_bom_crlf_ok.tsv"), ok=True,
         stdout=["nDCG@10  1.0000"]),  # both queries rank their relevant passage first
    Case("bom-crlf-training-groups-ok", _train("data.train_groups={B}/groups_bom_crlf_ok.jsonl"), ok=True),
    Case("bom-crlf-config", ["train", "--config", "{B}/config_bom_crlf.yaml"],
         ["{B}/config_bom_crlf.yaml: optim.batch_sise: unknown option"]),  # read fine, then the key is checked
    # -- invalid UTF-8 -----------------------------------------------------------------------------------
    Case("corpus-invalid-utf8", _enc(), ["{D}/corpus.jsonl:2: invalid UTF-8: byte 0xe9"],
         {"corpus.jsonl": "corpus_latin1.jsonl"}),
    Case("qrels-invalid-utf8", _all(), ["{D}/qrels/test.tsv:3: invalid UTF-8: byte 0xe9"],
         {"qrels/test.tsv": "qrels_latin1.tsv"}),
    Case("run-invalid-utf8", _eval("{B}/run_latin1.trec"),
         ["{B}/run_latin1.trec:2: not UTF-8 text (byte 0xe9 at column 14; a binary file?)"]),
    Case("run-binary", _eval("{B}/run_binary.trec"),
         ["{B}/run_binary.trec:3: not UTF-8 text (byte 0x8b at column 2; a binary file?)"]),
    # -- empty runs: trec_eval refuses them; scored, every measure would be 0 ------------------------------
    Case("run-empty", _eval("{B}/run_empty.trec"),
         ["{B}/run_empty.trec: holds no run lines (the file is empty or has only '#' comments)"]),
    Case("run-comments-only", _eval("{B}/run_comments_only.trec"),
         ["{B}/run_comments_only.trec: holds no run lines (the file is empty or has only '#' comments)"]),
    # -- run files: duplicates are errors, ties are fine ---------------------------------------------------
    Case("run-duplicate-pair", _eval("{B}/run_duplicate_pair.trec"),
         ["{B}/run_duplicate_pair.trec:3: field 'docid': query 'q1' lists document 'doc-1' again (first on line 1)"]),
    # trec_eval order: equal scores by doc id descending, so q1's doc-1 is third (RR 1/3), q2's doc-2 first.
    Case("run-ties-ok", _eval("{B}/run_ties_ok.trec", "{B}/qrels_ties_ok.trec"), ok=True,
         stdout=["RR@10    0.6667"]),
    # trec_eval ignores fields after the run tag; q1's doc-1 ranks first (RR 1), q2's doc-2 second (RR 1/2).
    Case("run-extra-fields-ok", _eval("{B}/run_extra_fields_ok.trec", "{B}/qrels_ties_ok.trec"), ok=True,
         stdout=["RR@10    0.7500"]),
    # -- '#' comment lines (trec_eval 10 skips them), also indented ones and commented-out records ------------
    Case("qrels-comments-ok", _eval("{B}/run_ties_ok.trec", "{B}/qrels_comments_ok.trec"), ok=True,
         stdout=["RR@10    0.6667"]),  # the 3-word first comment is not taken for a BEIR header
    Case("run-comments-ok", _eval("{B}/run_comments_ok.trec", "{B}/qrels_ties_ok.trec"), ok=True,
         stdout=["RR@10    0.7500"]),
    # -- training groups without a positive --------------------------------------------------------------
    Case("groups-empty-positives", _train("data.train_groups={B}/groups_no_positive.jsonl"),
         ["{B}/groups_no_positive.jsonl:2: field 'positives': empty (every group needs at least one positive)"]),
    Case("groups-missing-positives", _train("data.train_groups={B}/groups_missing_positives.jsonl"),
         ["{B}/groups_missing_positives.jsonl:2: field 'positives': missing"]),
    # -- configs: unknown or mistyped keys ---------------------------------------------------------------
    Case("config-unknown-key", ["train", "--config", "{B}/config_unknown_key.yaml"],
         ["{B}/config_unknown_key.yaml: optim.batch_sise: unknown option", "(did you mean 'optim.batch_size'?)"]),
    Case("config-mistyped-value", ["train", "--config", "{B}/config_mistyped.yaml"],
         ["{B}/config_mistyped.yaml: optim.lr: expected a number, got 'fast'"]),
    Case("config-section-not-a-mapping", ["train", "--config", "{B}/config_wrong_section_type.yaml"],
         ["{B}/config_wrong_section_type.yaml: optim: expected a mapping of options"]),
    Case("config-invalid-yaml", ["train", "--config", "{B}/config_invalid_yaml.yaml"],
         ["{B}/config_invalid_yaml.yaml", "invalid YAML"]),
    Case("config-override-unknown-key", _distill("optim.lrr=1e-3"),
         ["optim.lrr: unknown option in section optim", "(did you mean 'optim.lr'?)"]),
    Case("config-override-mistyped", _distill("optim.steps=1.5"), ["optim.steps: expected an integer, got 1.5"]),
    # -- lengths <= 0 -------------------------------------------------------------------------------------
    Case("cli-passage-length-zero", _enc("--max-passage-length", "0"), ["--max-passage-length must be > 0, got 0"]),
    Case("cli-query-length-negative", _enc("--max-query-length", "-3"), ["--max-query-length must be > 0, got -3"]),
    Case("config-student-length-zero", _distill("student.max_passage_length=0"),
         ["student.max_passage_length", "must be > 0"]),
    Case("config-model-length-negative", _train("data.train_groups={B}/groups_no_positive.jsonl",
                                                "model.max_query_length=-1"),
         ["model.max_query_length", "must be > 0"]),
    # -- K larger than a model's depth; layer maps out of range ------------------------------------------
    Case("layers-k-above-student-depth", _distill("layers.k=3"),
         ["cannot distill 3 layer pairs: the student has 2 layers and the teacher 4"]),
    Case("layers-k-above-teacher-depth", _distill("student.init=<drop>", "student.path={deep}", "layers.k=5"),
         ["cannot distill 5 layer pairs: the student has 6 layers and the teacher 4"]),
    Case("layer-map-teacher-out-of-range", _distill("layers.strategy=map", "layers.pairs=[[0, 1], [1, 7]]"),
         ["layers.pairs: pair [1, 7] is out of range", "the teacher 4 (0..3)"]),
    Case("layer-map-student-out-of-range", _distill("layers.strategy=0:1,5:3"),  # the old spelling of a map
         ["layers.pairs: pair [5, 3] is out of range", "the student has 2 layers (0..1)"]),
    Case("student-init-layer-out-of-range", _distill("student.init=teacher_layers=[0,9]"),
         ["layers [9] are out of range for a model of 4 layers (0..3)"]),
    # -- models that are not there, or not models -------------------------------------------------------
    Case("model-path-missing", ["encode", "--model", "{T}/no/such/model", "--data", "{D}", "--output", "{T}/e"],
         ["{T}/no/such/model: model folder does not exist"]),
    Case("teacher-path-missing", _distill("teacher.path={T}/no/such/teacher"),
         ["{T}/no/such/teacher: model folder does not exist"]),
    Case("folder-not-a-model", ["encode", "--model", "{B}", "--data", "{D}", "--output", "{T}/e"],
         ["{B}: not a model folder (no config.json)"]),
    Case("file-not-a-model", ["encode", "--model", "{T}/model.txt", "--data", "{D}", "--output", "{T}/e"],
         ["{T}/model.txt", "is a file, not a model folder"], make=_file_not_folder),
    Case("model-config-not-json", ["encode", "--model", "{T}/badmodel", "--data", "{D}", "--output", "{T}/e"],
         ["{T}/badmodel", "cannot load model"], make=_not_json_config),
    Case("model-without-weights", ["encode", "--model", "{T}/noweights", "--data", "{D}", "--output", "{T}/e"],
         ["{T}/noweights", "cannot load model"], make=_model_without_weights),
]


def _marco(tmp: Path) -> None:
    folder = tmp / "marco"
    folder.mkdir()
    shutil.copy(B / "collection_ragged.tsv", folder / "collection.tsv")
    (folder / "queries.test.tsv").write_text("q1\twhat\n", encoding="utf-8")
    (folder / "qrels.test.tsv").write_text("q1 0 1 1\n", encoding="utf-8")


# Cases that fail because of a bug in src/ (strict xfail: they must start passing when it is fixed).
XFAIL: dict[str, str] = {}  # every case passes; add one here (with the src bug) when a regression is known


def _params():
    for case in CASES:
        marks = []
        if case.slow:
            marks.append(pytest.mark.slow)
        if case.id in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[case.id]))
        yield pytest.param(case, id=case.id, marks=marks)


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalogue")
    tiny = make_tiny_beir(root / "tiny")
    return {
        "model": make_tiny_bert_folder(root / "model", dropout=0.0),
        "teacher": make_tiny_bert_folder(root / "teacher", layers=4, seed=5, dropout=0.0),
        "deep": make_tiny_bert_folder(root / "deep", layers=6, seed=6, dropout=0.0),
        "tiny": tiny,
        "groups": make_tiny_groups(root / "groups.jsonl"),
    }


def _dataset(folder: Path, files: dict[str, str], fill: Callable[[str], str]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUERIES), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(QRELS, encoding="utf-8")
    for target, source in files.items():
        src = Path(fill(source)) if "{" in source else B / source
        dst = folder / target
        dst.unlink()
        if src.stat().st_size > 1 << 20:
            src.rename(dst)  # the generated 50 MB files: move, don't copy
        else:
            shutil.copyfile(src, dst)
    return folder


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------------------------------------- the catalogue

def _run_case(case: Case, shared, tmp_path, capsys) -> tuple[int, str, str, Callable[[str], str]]:
    names = {"B": str(B), "T": str(tmp_path), "D": str(tmp_path / "data"),
             **{key: str(value) for key, value in shared.items()}}

    def fill(text: str) -> str:
        return text.format(**names)

    if case.make is not None:
        case.make(tmp_path)
    _dataset(tmp_path / "data", case.files, fill)
    status, out, err = run_cli(capsys, [fill(a) for a in case.argv])
    return status, out, err, fill


def _check_error_line(case: Case, status: int, out: str, err: str, fill) -> str:
    """Status 2, nothing on stdout, no traceback, one ``leadkd: error:`` line holding every expected piece."""
    assert status == 2, f"exit status {status}; stderr:\n{err[-2000:]}"
    assert out == ""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("leadkd: error")]
    assert len(errors) == 1, f"expected one 'leadkd: error:' line, got:\n{err[:2000]}"
    line = errors[0]
    assert line.startswith("leadkd: error: "), line
    assert len(line) < 2000, f"the error line is {len(line)} characters long"
    for needle in case.expect:
        assert fill(needle) in line, f"{fill(needle)!r} not in:\n{line}"
    return line


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, shared, tmp_path, capsys):
    status, out, err, fill = _run_case(case, shared, tmp_path, capsys)
    if case.ok:
        assert status == 0, f"leadkd {' '.join(map(fill, case.argv))} exited {status}:\n{err[-2000:]}"
        assert "leadkd: error" not in err
        for needle in case.stdout:
            assert needle in out, f"{needle!r} not in stdout:\n{out}"
        return
    line = _check_error_line(case, status, out, err, fill)
    assert err.splitlines() == [line], f"stderr holds more than the error line:\n{err[:2000]}"


def test_bom_and_crlf_are_stripped_from_ids(shared, tmp_path, capsys):
    """The BOM/CRLF dataset is not only accepted: its ids and texts come out clean."""
    from leadkd.data.datasets import load_dataset
    from leadkd.data.formats import read_qrels

    files = {"corpus.jsonl": "corpus_bom_crlf_ok.jsonl", "queries.jsonl": "queries_bom_crlf_ok.jsonl",
             "qrels/test.tsv": "qrels_bom_crlf_ok.tsv"}
    data = load_dataset(_dataset(tmp_path / "data", files, str), split="test")
    assert [data.corpus.id_at(i) for i in range(len(data.corpus))] == ["1", "2"]
    assert data.queries.text(0) == "café au lait"
    assert dict(data.qrels) == {"q1": {"1": 1}, "q2": {"2": 1}}
    assert dict(read_qrels(B / "qrels_bom_crlf_ok.tsv")) == {"q1": {"1": 1}, "q2": {"2": 1}}


def test_run_reader_strips_a_bom():
    from leadkd.data.runs import read_run

    assert read_run(B / "run_bom_crlf_ok.trec") == {"q1": {"1": 2.5, "2": 1.5}, "q2": {"2": 0.5}}


def test_catalogue_size():
    """The number of cases, quoted in docs/guarantees.md."""
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    print(f"\nbad-input catalogue: {len(ids)} cases: {', '.join(ids)}")
    assert len(ids) >= 40
