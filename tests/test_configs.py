"""The ready recipes under configs/: each loads as the job its header names, and the paper's values hold.

Convention (docs/training.md §1): the first line of every config file is ``# kind: train`` or
``# kind: distill`` — the job that reads it (``leadkd train`` / ``leadkd distill``, i.e.
``load_config(path, kind=...)``). The paper's values are those of spec §3.2 and §2 (the LEAD scripts);
values the paper does not give are chosen in the files and documented in docs/recipes-msmarco.md.
Only configuration is read here: no model, no data, so the whole module runs in about a second.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from leadkd.config import DistillConfig, TrainConfig, config_to_dict, load_config
from leadkd.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOCS = ROOT / "docs"
KIND_LINE = re.compile(r"^#\s*kind:\s*(train|distill)\s*$")
DATASETS = ("msmarco-passage", "msmarco-doc")

MASTER = "lx865712528/master-base-pretrained-msmarco"
COCONDENSER = "Luyu/co-condenser-marco"
DISTILBERT = "distilbert-base-uncased"
ERNIE = "nghuyong/ernie-2.0-large-en"

#: train recipes: name -> (init, kind, lr, steps, grad_accum) — spec §3.2.
TRAIN = {
    "hardneg-de": (COCONDENSER, "dual_encoder", 2e-5, 20_000, 1),
    "warmup-12de": (MASTER, "dual_encoder", 2e-5, 20_000, 1),
    "warmup-6de": (DISTILBERT, "dual_encoder", 2e-5, 20_000, 1),
    "warmup-12cb": (COCONDENSER, "colbert", 2e-5, 20_000, 1),
    "warmup-12ce": (COCONDENSER, "cross_encoder", 1e-5, 20_000, 10),
    "warmup-24cb": (ERNIE, "colbert", 1e-5, 20_000, 1),
}
#: distill recipes: name -> (teacher warm-up, student warm-up, lr, steps, grad_accum) — spec §3.2.
LEAD = {
    "lead-12de-6de": ("warmup-12de", "warmup-6de", 5e-5, 50_000, 1),
    "lead-12cb-6de": ("warmup-12cb", "warmup-6de", 2e-5, 50_000, 1),
    "lead-12ce-6de": ("warmup-12ce", "warmup-6de", 5e-5, 100_000, 10),
    "lead-24cb-12de": ("warmup-24cb", "warmup-12de", 2e-5, 50_000, 1),
}
#: K per collection: 5 for passages (argparse default), 6 for documents (inferred, spec §2.6).
LAYER_K = {"msmarco-passage": 5, "msmarco-doc": 6}

EXPECTED = ({f"{ds}/{name}.yaml" for ds in DATASETS for name in [*TRAIN, *LEAD]}
            | {"msmarco-passage/response-kd-12cb-6de.yaml", "quickstart-scifact.yaml"})


def all_config_files() -> list[str]:
    return sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def header_kind(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = KIND_LINE.match(first)
    assert match, f"{path}: the first line must be '# kind: train' or '# kind: distill', got {first!r}"
    return match.group(1)


def header(path: Path) -> str:
    """The leading comment block of a file."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


_CACHE: dict[str, TrainConfig | DistillConfig] = {}


def load(rel: str) -> TrainConfig | DistillConfig:
    if rel not in _CACHE:
        path = CONFIGS / rel
        _CACHE[rel] = load_config(path, kind=header_kind(path))
    return _CACHE[rel]


FILES = all_config_files()


# --------------------------------------------------------------------------- every file

def test_the_recipes_exist():
    missing = EXPECTED - set(FILES)
    assert not missing, f"recipes missing under configs/: {sorted(missing)}"


@pytest.mark.parametrize("rel", FILES)
def test_loads_as_the_kind_its_header_names(rel):
    path = CONFIGS / rel
    kind = header_kind(path)
    config = load_config(path, kind=kind)
    assert isinstance(config, TrainConfig if kind == "train" else DistillConfig)
    other = "distill" if kind == "train" else "train"
    with pytest.raises(ConfigError):  # the header does not lie: the other job rejects the file
        load_config(path, kind=other)


@pytest.mark.parametrize("rel", FILES)
def test_header_gives_the_commands(rel):
    path = CONFIGS / rel
    kind, text = header_kind(path), header(path)
    assert f"leadkd {kind} --config configs/{rel}" in text
    assert f"-m leadkd.cli {kind} --config configs/{rel}" in text
    assert "torchrun --nproc_per_node=" in text
    if rel.startswith("msmarco-"):
        assert f"torchrun --nproc_per_node=8 -m leadkd.cli {kind} --config configs/{rel}" in text
        assert "Reproduces:" in text and "Paper values" in text and "UNKNOWN" in text
        assert "--resume" in text


@pytest.mark.parametrize("rel", FILES)
def test_paper_optimizer_settings(rel):
    optim = load(rel).optim
    assert optim.adam_eps == 1e-8 and optim.weight_decay == 0.0
    assert optim.warmup_ratio == 0.1 and optim.teacher_lr is None
    assert load(rel).seed == 888


#: The paper clipped every model's gradient at norm 2.0 (argparse default), in its own units.
PAPER_MAX_GRAD_NORM = 2.0


def stated_world_size(path: Path) -> int:
    """The process count a recipe's header runs it with (``torchrun --nproc_per_node=N``)."""
    counts = {int(n) for n in re.findall(r"torchrun --nproc_per_node=(\d+)", header(path))}
    assert len(counts) == 1, f"{path}: the header names {sorted(counts)} process counts"
    return counts.pop()


def leadkd_over_paper_gradient(config, world_size: int) -> int:
    """How many times larger leadkd's gradient is than the paper code's for the same global batch.

    The paper's code all-gathers DE/ColBERT candidates with only the local slice differentiable and has
    every process compute the global mean loss, so after DDP's averaging its gradient is 1/N of the
    gradient of that loss, which is what leadkd computes (runtime/distributed.py). Whenever a cross-encoder is
    involved the paper gathers nothing: each process's local mean, averaged by DDP, is exact.
    """
    models = [config.model] if isinstance(config, TrainConfig) else [config.teacher, config.student]
    gathers = all(model.kind != "cross_encoder" for model in models) and config.loss.cross_process_negatives
    return world_size if gathers else 1


@pytest.mark.parametrize("rel", [rel for rel in FILES if rel.startswith("msmarco-")])
def test_recipes_clip_where_the_paper_clipped(rel):
    """max_grad_norm in the paper's units (leadkd's threshold over the gradient ratio) is the paper's 2.0."""
    config = load(rel)
    world = stated_world_size(CONFIGS / rel)
    assert world == 8  # every script of the paper ran 8 processes
    effective = config.optim.max_grad_norm / leadkd_over_paper_gradient(config, world)
    assert effective == PAPER_MAX_GRAD_NORM, f"{rel}: clips at {effective} in the paper's units"


@pytest.mark.parametrize("rel", FILES)
def test_each_run_has_its_own_output_dir(rel):
    name = rel.rsplit(".", 1)[0]
    expected = {"quickstart-scifact": "runs/scifact/quickstart"}.get(name, f"runs/{name}")
    assert load(rel).output_dir == expected


# --------------------------------------------------------------------------- MS MARCO: train recipes

@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", sorted(TRAIN))
def test_train_recipes_follow_the_paper(dataset, name):
    config = load(f"{dataset}/{name}.yaml")
    init, kind, lr, steps, accum = TRAIN[name]
    assert isinstance(config, TrainConfig)
    assert (config.model.path, config.model.kind) == (init, kind)
    assert (config.optim.lr, config.optim.steps, config.optim.grad_accum) == (lr, steps, accum)
    assert config.optim.bf16 is False  # the paper trained in fp32
    assert config.data.corpus == dataset
    assert config.loss.in_batch_negatives and config.loss.cross_process_negatives
    if kind == "dual_encoder":
        assert (config.model.pooling, config.model.normalize) == ("cls", False)  # [CLS], raw inner product
    # The paper's ColBERT has no projection and its cross-encoder no segment ids (spec §2.2).
    assert config.model.colbert_dim == (0 if kind == "colbert" else None)
    assert config.model.token_type_ids == (False if kind == "cross_encoder" else None)
    initial = "groups-bm25" if dataset == "msmarco-passage" else "groups-random"
    groups = initial if name == "hardneg-de" else "groups-hard"
    assert config.data.train_groups == f"runs/{dataset}/{groups}.jsonl"
    if name == "hardneg-de":
        assert config.checkpoint.every == 1000  # the paper saved every 1000 steps


# --------------------------------------------------------------------------- MS MARCO: LEAD recipes

@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", sorted(LEAD))
def test_lead_recipes_follow_the_paper(dataset, name):
    config = load(f"{dataset}/{name}.yaml")
    _, _, lr, steps, accum = LEAD[name]
    assert isinstance(config, DistillConfig)
    assert (config.optim.lr, config.optim.steps, config.optim.grad_accum) == (lr, steps, accum)
    assert config.optim.bf16 is False
    loss = config.loss
    assert (loss.temperature, loss.layer_temperature) == (1.0, 10.0)
    assert (loss.student_ce, loss.teacher_ce, loss.response_weight, loss.layer_weight) == (1.0, 1.0, 1.0, 1.0)
    assert (loss.response, loss.layer, loss.reweight, loss.detach_teacher_targets) == ("kl", "lead", True, False)
    assert loss.in_batch_negatives and loss.cross_process_negatives
    layers = config.layers
    assert (layers.strategy, layers.k, layers.resample_every) == ("random", LAYER_K[dataset], 10)
    assert config.teacher.train is True  # joint training, same learning rate
    assert config.student.kind == "dual_encoder" and config.student.init is None
    assert (config.student.pooling, config.student.normalize) == ("cls", False)
    assert config.data.corpus == dataset and config.data.train_groups == f"runs/{dataset}/groups-hard.jsonl"
    assert config.checkpoint.keep_last is None  # every checkpoint is a candidate of the choice on val


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", sorted(LEAD))
def test_lead_reads_the_warmup_outputs(dataset, name):
    """The teacher and student of a LEAD run are the warm-up runs' final models, set up as in the warm-up."""
    config = load(f"{dataset}/{name}.yaml")
    teacher_run, student_run, *_ = LEAD[name]
    for role, run in (("teacher", teacher_run), ("student", student_run)):
        model = getattr(config, role)
        warm = load(f"{dataset}/{run}.yaml")
        assert model.path == f"{warm.output_dir}/final"
        assert model.kind == warm.model.kind
        for option in ("pooling", "normalize", "max_query_length", "max_passage_length"):
            assert getattr(model, option) == getattr(warm.model, option), f"{role}.{option} differs from {run}"
        assert warm.data.train_groups == config.data.train_groups
        assert warm.data.num_negatives == config.data.num_negatives


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_chain_starts_with_the_mining_retriever(dataset):
    retriever = load(f"{dataset}/hardneg-de.yaml")
    assert retriever.output_dir == f"runs/{dataset}/hardneg-de"
    assert retriever.data.corpus == dataset


def test_response_kd_baseline_is_lead_12cb_6de_without_the_layer_term():
    baseline = load("msmarco-passage/response-kd-12cb-6de.yaml")
    lead = load("msmarco-passage/lead-12cb-6de.yaml")
    assert baseline.loss.layer == "none" and lead.loss.layer == "lead"
    same = baseline.model_copy(update={"output_dir": lead.output_dir,
                                       "loss": baseline.loss.model_copy(update={"layer": "lead"})})
    assert config_to_dict(same) == config_to_dict(lead)


# --------------------------------------------------------------------------- quickstart

def test_quickstart_is_a_small_cpu_recipe():
    config = load("quickstart-scifact.yaml")
    assert isinstance(config, DistillConfig)
    assert config.teacher.path == "all-MiniLM-L6-v2" and config.teacher.kind == "dual_encoder"
    assert config.student.path is None and config.student.init_teacher_layers == (0, 2, 4)
    assert config.data.corpus == "scifact" and config.data.train_groups == "runs/scifact/groups.jsonl"
    assert config.eval.split == "dev"  # never the test split
    assert config.teacher.max_passage_length == config.student.max_passage_length == 128
    assert (config.optim.batch_size, config.data.num_negatives, config.layers.k) == (8, 3, 2)
    assert 100 <= config.optim.steps <= 1000
    # the LEAD objective itself is the paper's
    assert (config.loss.temperature, config.loss.layer_temperature, config.loss.reweight) == (1.0, 10.0, True)
    assert (config.layers.strategy, config.layers.resample_every, config.teacher.train) == ("random", 10, True)
    text = header(CONFIGS / "quickstart-scifact.yaml")
    assert "leadkd mine --data scifact --split train-nodev" in text and "--output runs/scifact/groups.jsonl" in text


# --------------------------------------------------------------------------- docs and entry point

def test_docs_name_only_existing_configs_and_list_every_one():
    recipes = (DOCS / "recipes-msmarco.md").read_text(encoding="utf-8")
    training = (DOCS / "training.md").read_text(encoding="utf-8")
    for text in (recipes, training):
        for rel in re.findall(r"configs/([\w./-]+\.ya?ml)", text):
            assert (CONFIGS / rel).is_file(), f"docs name configs/{rel}, which does not exist"
    for rel in FILES:
        assert Path(rel).name in recipes, f"docs/recipes-msmarco.md does not list {rel}"


def test_python_m_leadkd_cli_is_the_leadkd_command():
    """The configs' torchrun lines run ``-m leadkd.cli``: the module must be runnable."""
    done = subprocess.run([sys.executable, "-m", "leadkd.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("leadkd ")


@pytest.mark.parametrize("cls", [TrainConfig, DistillConfig], ids=["train", "distill"])
def test_every_option_has_a_row_in_the_configuration_reference(cls):
    """docs/configuration.md documents each option in a table row that starts with its name: the dotted
    key (``eval.split``), or the key inside its section (``lr`` under ``optim``)."""
    rows = {match.group(1) for match in re.finditer(r"^\| `([\w.]+)` \|", (DOCS / "configuration.md").read_text(),
                                                      re.MULTILINE)}

    def keys(config, prefix=""):
        for name in type(config).model_fields:
            value = getattr(config, name)
            if isinstance(value, pydantic.BaseModel):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield prefix + name

    missing = [key for key in keys(cls()) if key not in rows and key.split(".", 1)[-1] not in rows]
    assert not missing, f"options without a row in docs/configuration.md: {missing}"
