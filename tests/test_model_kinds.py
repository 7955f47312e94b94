"""One protocol for every model kind: a kind defined in this file alone trains as teacher and as student,
and the distillation package never names a kind."""

from __future__ import annotations

import ast
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import leadkd
from conftest import make_tiny_beir, make_tiny_groups
from leadkd import kinds
from leadkd.cli import main
from leadkd.models import loading

BUCKETS, WIDTH = 97, 8


@dataclass
class BagBatch:
    """The toy's view of a batch: per-layer vectors; the toy scores by negative squared distance."""

    queries: torch.Tensor
    passages: torch.Tensor

    def gathered(self, with_grad: bool) -> BagBatch:
        raise AssertionError("a single process never gathers")

    def scores(self) -> torch.Tensor:
        return -torch.cdist(self.queries, self.passages).pow(2)


class HashedWords(nn.Module):
    """Words hashed into buckets (its own "tokenizer": no vocabulary shared with any BERT), embedded and
    averaged, then a stack of tanh layers: layer l's vector is the l-th layer's output."""

    kind = "hashed_words"
    scores_whole_batch = True
    config_options = ()

    def __init__(self, layers: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.ModuleDict({"embed": nn.EmbeddingBag(BUCKETS, WIDTH, mode="mean"),
                                       "blocks": nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(layers))})
        self.num_layers = layers

    @classmethod
    def from_pretrained(cls, path, **_):
        settings = json.loads((Path(path) / "leadkd_config.json").read_text())
        model = cls(settings["layers"])
        model.backbone.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model

    @classmethod
    def from_config(cls, config, path=None):
        return cls.from_pretrained(path or config.path)

    def settings(self) -> dict:
        return {"layers": self.num_layers}

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.backbone.state_dict().items()},
                  str(directory / "model.safetensors"))
        (directory / "leadkd_config.json").write_text(json.dumps({"kind": self.kind, **self.settings()}))

    def _vectors(self, texts) -> torch.Tensor:
        ids = [[zlib.crc32(word.encode()) % BUCKETS for word in text.split()] or [0] for text in texts]
        offsets = torch.tensor([0] + [len(row) for row in ids[:-1]]).cumsum(0)
        hidden = self.backbone["embed"](torch.tensor([i for row in ids for i in row]), offsets)
        layers = []
        for block in self.backbone["blocks"]:
            hidden = torch.tanh(block(hidden))
            layers.append(hidden)
        return torch.stack(layers)  # [L, N, WIDTH]

    def encode_batch(self, queries, passages, layers, final=False, raw_last_layer=True) -> BagBatch:
        wanted = list(layers) + ([self.num_layers - 1] if final else [])
        return BagBatch(self._vectors(queries)[wanted], self._vectors(passages)[wanted])

    def layer_scores(self, queries, passages, layers=None) -> torch.Tensor:
        return self.encode_batch(queries, passages, range(self.num_layers) if layers is None else layers).scores()


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(kinds.MODEL_KINDS, HashedWords.kind, None)  # removed again after the test
    kinds.register(HashedWords)
    return HashedWords


def _distill(tmp_path: Path, name: str, teacher: dict, student: dict) -> Path:
    data, groups = make_tiny_beir(tmp_path / "data"), make_tiny_groups(tmp_path / "groups.jsonl")
    config = {"teacher": {**teacher, "train": True}, "student": student,
              "data": {"corpus": str(data), "train_groups": str(groups), "num_negatives": 3},
              "optim": {"steps": 3, "batch_size": 4, "lr": 1e-2}, "layers": {"k": 2},
              "eval": {"split": None}, "checkpoint": {"every": None}, "log_every": 1,
              "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    assert main(["distill", "--config", str(path)]) == 0
    return tmp_path / name


def test_a_kind_defined_in_a_test_trains_as_teacher_and_as_student(toy_kind, tiny_bert, tmp_path):
    toy = tmp_path / "toy"
    HashedWords(layers=3, seed=1).save_pretrained(toy)
    before = load_file(str(toy / "model.safetensors"))
    # The toy teaches a BERT student built from its own folder (another tokenizer, width and depth) ...
    run = _distill(tmp_path, "toy-teacher", {"kind": "hashed_words", "path": str(toy)},
                   {"path": str(tiny_bert), "max_query_length": 16, "max_passage_length": 32})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert all(len(row["pairs"]) == 2 and row["layer_kl"] > 0 for row in rows if "loss" in row)
    after = load_file(str(run / "final-teacher" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained jointly, as the paper's teacher
    # ... and is taught by a BERT teacher, its final folder reopened as its own kind.
    run = _distill(tmp_path, "toy-student", {"path": str(tiny_bert), "max_query_length": 16,
                                             "max_passage_length": 32},
                   {"kind": "hashed_words", "path": str(toy)})
    student = loading.load_model(run / "final")
    assert isinstance(student, HashedWords)
    assert any(not torch.equal(before[k], v) for k, v in student.backbone.state_dict().items())


def _names_in_code(path: Path) -> set[str]:
    """Identifiers and string constants of a module, docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.rsplit(".", 1)[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
    return names


def test_the_distillation_package_never_names_a_model_kind():
    names = set(kinds.MODEL_KINDS) - {HashedWords.kind}
    classes = {kind.target.rsplit(":", 1)[-1] for kind in kinds.MODEL_KINDS.values() if isinstance(kind.target, str)}
    package = Path(leadkd.__file__).parent / "distill"
    found = {}
    for module in sorted(package.glob("*.py")):
        hits = {name for name in _names_in_code(module) if any(word in name for word in names | classes)}
        if hits:
            found[module.name] = sorted(hits)
    assert found == {}
    assert _names_in_code(package / "trainer.py") >= {"Trainer", "objective"}  # the scan itself works
