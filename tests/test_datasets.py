"""Dataset specs: folders of both layouts, names under LEADKD_DATA_DIR, irds: ids, and the errors for each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import Doc, FakeIrds, Judgment, Query, fake_module
from leadkd.data import (
    Corpus,
    DataWarning,
    Qrels,
    Queries,
    available_splits,
    load_corpus,
    load_dataset,
    resolve_dataset,
    write_beir_qrels,
    write_collection_tsv,
    write_corpus_jsonl,
    write_queries_jsonl,
    write_queries_tsv,
    write_trec_qrels,
)
from leadkd.runtime.errors import InputError, LeadkdError


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    """A BEIR folder: 4 passages, 4 queries, test judges q1 and q3, train judges q2."""
    folder = tmp_path / "data" / "toy"
    write_corpus_jsonl(folder / "corpus.jsonl", Corpus.from_records(
        ["d1", "d2", "d3", "d4"], ["alpha", "beta", "gamma", "delta"], ["A", "", "", "D"]))
    write_queries_jsonl(folder / "queries.jsonl", Queries.from_records(
        ["q3", "q1", "q2", "q4"], ["third?", "first?", "second?", "unjudged?"]))
    write_beir_qrels(folder / "qrels" / "test.tsv", {"q1": {"d1": 1, "d2": 0}, "q3": {"d4": 2}})
    write_beir_qrels(folder / "qrels" / "train.tsv", {"q2": {"d3": 1}})
    return folder


@pytest.fixture
def msmarco(tmp_path: Path) -> Path:
    """An MS MARCO folder: collection.tsv, queries.<split>.tsv, qrels.<split>.tsv (TREC form)."""
    folder = tmp_path / "msm"
    write_collection_tsv(folder / "collection.tsv", Corpus.from_records(["0", "1", "2"], ["p zero", "p one", "p two"]))
    write_queries_tsv(folder / "queries.dev.small.tsv", Queries.from_records(["10", "11"], ["q ten", "q eleven"]))
    write_trec_qrels(folder / "qrels.dev.small.tsv", {"11": {"2": 1}, "10": {"0": 1}})
    write_queries_tsv(folder / "queries.train.tsv", Queries.from_records(["20"], ["q twenty"]))
    (folder / "qrels.train.tsv").write_text("20\t1\n")  # 2-column RocketQA form
    return folder


def test_beir_folder_keeps_only_judged_queries(beir: Path) -> None:
    ds = load_dataset(beir)
    assert (ds.name, ds.split, ds.source) == ("toy", "test", str(beir))
    assert len(ds.corpus) == 4 and ds.corpus.passage(0) == "A alpha"
    assert ds.queries.list_ids() == ["q3", "q1"]  # queries.jsonl order, only this split's
    assert isinstance(ds.qrels, Qrels) and ds.qrels.relevant("q1") == ["d1"] and ds.qrels.num_judgments() == 3
    assert repr(ds) == "Dataset('toy', split='test': 4 passages, 2 queries, 3 judgments)"
    train = load_dataset(str(beir), split="train")
    assert train.queries.list_ids() == ["q2"] and available_splits(beir) == ["test", "train"]


def test_msmarco_folder(msmarco: Path) -> None:
    ds = load_dataset(msmarco, split="dev.small")
    assert ds.queries.list_ids() == ["10", "11"] and ds.qrels == {"11": {"2": 1}, "10": {"0": 1}}
    assert not ds.corpus.has_titles and ds.corpus.text(2) == "p two"
    assert load_dataset(msmarco, split="train").qrels == {"20": {"1": 1}}
    assert available_splits(msmarco) == ["dev.small", "train"]
    with pytest.raises(LeadkdError, match=r"no qrels for split 'dev' \(looked for qrels.dev.tsv\); "
                                          r"available splits: dev.small, train"):
        load_dataset(msmarco, split="dev")
    (msmarco / "qrels.eval.tsv").write_text("1 0 1 1\n")
    with pytest.raises(LeadkdError, match=r"without queries.eval.tsv"):
        load_dataset(msmarco, split="eval")


def test_names_resolve_under_data_dir_and_env(beir: Path, monkeypatch) -> None:
    root = beir.parent
    assert load_dataset("toy", data_dir=root).name == "toy"
    monkeypatch.setenv("LEADKD_DATA_DIR", str(root))
    monkeypatch.chdir(root.parent)  # "toy" is not a folder here
    assert load_dataset("toy", split="train").queries.list_ids() == ["q2"]
    assert resolve_dataset("toy") == root / "toy" and resolve_dataset("irds:beir/x/test") == "beir/x/test"
    with pytest.raises(LeadkdError) as info:
        load_dataset("nope")
    msg = str(info.value)
    assert f"nor under $LEADKD_DATA_DIR={root} (which holds: toy)" in msg and "irds:<ir_datasets id>" in msg
    assert "\n" not in msg


def test_unset_data_dir_is_named_in_the_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LEADKD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LeadkdError, match=r"dataset 'scifact' not found: no such folder, and \$LEADKD_DATA_DIR "
                                          r"is not set.*pass a dataset folder \(BEIR: corpus.jsonl"):
        load_dataset("scifact")
    with pytest.raises(LeadkdError, match=r"data_dir=.*missing is not a folder"):
        load_dataset("scifact", data_dir=tmp_path / "missing")


def test_folder_problems(beir: Path, tmp_path: Path) -> None:
    with pytest.raises(LeadkdError, match=r"no qrels for split 'dev' \(looked for qrels/dev.tsv\); "
                                          r"available splits: test, train"):
        load_dataset(beir, split="dev")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LeadkdError, match="neither corpus.jsonl .BEIR. nor collection.tsv"):
        load_dataset(empty)
    with pytest.raises(LeadkdError, match="a dataset is a folder, not a file"):
        load_dataset(beir / "corpus.jsonl")
    (beir / "queries.jsonl").unlink()
    with pytest.raises(LeadkdError, match="without queries.jsonl"):
        load_dataset(beir)


def test_qrels_with_unknown_ids_strict_and_lenient(beir: Path) -> None:
    (beir / "qrels" / "dev.trec").write_text("q1 0 d1 1\nq1 0 gone 1\nq4 0 d2 1\n")
    with pytest.raises(InputError) as info:
        load_dataset(beir, split="dev")
    err = info.value
    assert (err.path, err.line, err.field) == (str(beir / "qrels" / "dev.trec"), 2, "docid")
    with pytest.warns(DataWarning, match="dropped 1 of 3 judgments"):
        ds = load_dataset(beir, split="dev", lenient=True)
    assert ds.qrels == {"q1": {"d1": 1}, "q4": {"d2": 1}} and ds.queries.list_ids() == ["q1", "q4"]


def test_load_corpus_from_file_folder_and_name(beir: Path, msmarco: Path) -> None:
    assert load_corpus(beir / "corpus.jsonl").list_ids() == ["d1", "d2", "d3", "d4"]
    assert len(load_corpus(beir)) == 4 and len(load_corpus(msmarco)) == 3
    assert len(load_corpus(msmarco / "collection.tsv")) == 3
    assert len(load_corpus("toy", data_dir=beir.parent)) == 4
    with pytest.raises(LeadkdError, match="not a dataset folder"):
        load_corpus(beir / "qrels")


# -- ir_datasets (optional) ----------------------------------------------------------------------------
def test_irds_spec_through_the_adapter(monkeypatch) -> None:
    ds = FakeIrds([Doc("1", "text one", "T"), Doc("2", "two", "")],
                  [Query("a", "qa"), Query("b", "qb"), Query("c", "qc")],
                  [Judgment("a", "2", 1, "0"), Judgment("c", "1", 0, "0"), Judgment("c", "9", 1, "0")])
    monkeypatch.setitem(sys.modules, "ir_datasets", fake_module({"beir/toy/test": ds}))
    with pytest.raises(InputError, match="^irds:beir/toy/test: field 'corpus-id': document id '9'"):
        load_dataset("irds:beir/toy/test")
    with pytest.warns(DataWarning):
        got = load_dataset("irds:beir/toy/test", lenient=True)
    assert (got.name, got.split) == ("irds:beir/toy/test", "test")
    assert got.queries.list_ids() == ["a", "c"] and got.corpus.passage(0) == "T text one"
    assert got.qrels == {"a": {"2": 1}, "c": {"1": 0}}
    assert load_corpus("irds:beir/toy/test").list_ids() == ["1", "2"]
    with pytest.raises(LeadkdError, match="ir_datasets has no dataset 'beir/none'"):
        load_dataset("irds:beir/none")
    monkeypatch.setitem(sys.modules, "ir_datasets", fake_module({"toy": FakeIrds([Doc("1", "", "")], [], [])}))
    with pytest.raises(LeadkdError, match="has no queries or no qrels"):
        load_dataset("irds:toy")
    with pytest.raises(InputError, match="document '1' is empty"):
        load_corpus("irds:toy")


def test_irds_missing_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ir_datasets", None)  # import fails as if not installed
    with pytest.raises(LeadkdError, match=r"^'irds:beir/scifact/test' needs the ir_datasets package: "
                                          r"pip install leadkd\[irds\]$"):
        load_dataset("irds:beir/scifact/test")


# -- real data -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_scifact_and_nfcorpus(data_dir: Path) -> None:
    sci = load_dataset("scifact", split="test", data_dir=data_dir)
    assert (len(sci.corpus), len(sci.queries), sci.qrels.num_judgments()) == (5183, 300, 339)
    assert sci.corpus.has_titles and all(q in sci.qrels for q in sci.queries.ids)
    assert all(d in sci.corpus for docs in sci.qrels.values() for d in docs)
    assert sci.corpus.char_lengths().min() > 0
    nf = load_dataset(data_dir / "nfcorpus", split="dev")
    assert (len(nf.corpus), len(nf.queries), nf.qrels.num_judgments()) == (3633, 324, 11385)
    assert {r for docs in nf.qrels.values() for r in docs.values()} == {1, 2}
    dl = load_dataset("trec-dl19-passage-pool", data_dir=data_dir)
    assert (len(dl.corpus), len(dl.queries), dl.qrels.num_judgments()) == (14581, 43, 4337)


def test_export_irds_writes_the_splits_that_exist_as_one_beir_folder(monkeypatch, tmp_path) -> None:
    from leadkd.data.datasets import export_irds

    docs = [Doc("1", "text one", "T"), Doc("2", "two", ""), Doc("3", "three", "")]
    queries = [Query("a", "qa"), Query("b", "qb"), Query("c", "qc")]  # BEIR lists every query in every split
    read = []

    class Counted(FakeIrds):
        def docs_iter(self):
            read.append(1)
            return super().docs_iter()

    monkeypatch.setitem(sys.modules, "ir_datasets", fake_module({
        "beir/toy/train": Counted(docs, queries, [Judgment("a", "1", 1, "0"), Judgment("b", "3", 2, "0")]),
        "beir/toy/test": Counted(docs, queries, [Judgment("c", "2", 1, "0")])}))
    target = tmp_path / "toy"
    assert export_irds("beir/toy", target) == ["train", "test"]
    assert read == [1]  # the shared corpus is read once
    assert available_splits(target) == ["test", "train"]
    train, test = load_dataset(target, split="train"), load_dataset(target, split="test")
    assert train.qrels == {"a": {"1": 1}, "b": {"3": 2}} and test.qrels == {"c": {"2": 1}}
    assert test.queries.list_ids() == ["c"] and test.queries.text(0) == "qc"
    assert train.corpus.list_ids() == ["1", "2", "3"] and train.corpus.passage(0) == "T text one"
    with pytest.raises(LeadkdError, match=r"irds:beir/none: ir_datasets has none of the splits "
                                          r"beir/none/\{train,dev,test\}; name the dataset without its split"):
        export_irds("beir/none", tmp_path / "none")
    assert not (tmp_path / "none").exists()
    monkeypatch.setitem(sys.modules, "ir_datasets", None)  # not installed
    with pytest.raises(LeadkdError, match=r"pip install leadkd\[irds\]"):
        export_irds("beir/toy", tmp_path / "again")


def test_a_corpus_already_loaded_is_reused(beir: Path) -> None:
    corpus = load_corpus(beir)
    dataset = load_dataset(beir, split="test", corpus=corpus)
    assert dataset.corpus is corpus and dataset.qrels == {"q1": {"d1": 1, "d2": 0}, "q3": {"d4": 2}}
