"""leadkd.config: files, overrides, strict keys and types, validation, and the save/load round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydantic
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from leadkd.compare.run import config_changes
from leadkd.config import (
    DistillConfig,
    LayerConfig,
    StudentConfig,
    TrainConfig,
    changed_settings,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_layer_map,
    parse_student_init,
    save_config,
    todays_spelling,
    validate_config,
)
from leadkd.runtime.errors import ConfigError, LeadkdError

REQUIRED_DISTILL = ["teacher.path=teacher-dir", "student.path=student-dir", "data.corpus=scifact",
                    "data.train_groups=groups.jsonl", "optim.steps=100", "output_dir=runs/x"]
REQUIRED_TRAIN = ["model.path=model-dir", "data.corpus=scifact", "data.train_groups=groups.jsonl",
                  "optim.steps=100", "output_dir=runs/x"]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def distill(*overrides: str) -> DistillConfig:
    return load_config(None, REQUIRED_DISTILL + list(overrides), kind="distill")


def error_of(*overrides: str, path: Path | None = None, kind: str = "distill") -> str:
    required = REQUIRED_DISTILL if kind == "distill" else REQUIRED_TRAIN
    with pytest.raises(ConfigError) as info:
        load_config(path, required + list(overrides), kind=kind)
    assert isinstance(info.value, LeadkdError)
    return str(info.value)


# --------------------------------------------------------------------------- defaults and reading

def test_defaults_follow_the_paper():
    config = distill()
    assert (config.optim.lr, config.optim.adam_eps, config.optim.weight_decay) == (2e-5, 1e-8, 0.0)
    assert (config.optim.warmup_ratio, config.optim.max_grad_norm, config.optim.grad_accum) == (0.1, 2.0, 1)
    assert (config.loss.temperature, config.loss.layer_temperature, config.loss.reweight) == (1.0, 10.0, True)
    assert (config.loss.student_ce, config.loss.teacher_ce, config.loss.response_weight) == (1.0, 1.0, 1.0)
    assert (config.loss.response, config.loss.layer, config.loss.detach_teacher_targets) == ("kl", "lead", False)
    assert (config.layers.strategy, config.layers.k, config.layers.resample_every) == ("random", 5, 10)
    assert config.teacher.train is True and config.student.init is None and config.seed == 888
    assert config.data.num_negatives == 7 and config.optim.teacher_lr is None


def test_yaml_file_with_sections(tmp_path):
    path = write(tmp_path, """
teacher: {path: t, kind: colbert, train: false, max_query_length: 32}
student: {path: s, pooling: mean, normalize: true}
data: {corpus: scifact, train_groups: g.jsonl, num_negatives: 3}
loss: {response: margin_mse, layer_temperature: 5}
layers: {strategy: skip, k: 3, resample_every: null}
optim: {lr: 5e-5, steps: 50000, batch_size: 16}
eval: {split: null}
output_dir: out
""")
    config = load_config(path, [], kind="distill")
    assert config.teacher.kind == "colbert" and config.teacher.train is False
    assert config.teacher.max_query_length == 32 and config.student.pooling == "mean"
    assert config.student.normalize is True and config.data.num_negatives == 3
    assert config.loss.response == "margin_mse" and config.loss.layer_temperature == 10.0 / 2
    assert config.layers == LayerConfig(strategy="skip", k=3, resample_every=None)
    assert config.optim.lr == 5e-5 and isinstance(config.optim.lr, float)  # YAML 1.1 leaves 5e-5 a string
    assert config.optim.steps == 50000 and config.eval.split is None


def test_json_file(tmp_path):
    data = {"model": {"path": "m", "kind": "cross_encoder"}, "data": {"corpus": "c", "train_groups": "g"},
            "optim": {"steps": 10, "lr": 1e-5, "grad_accum": 10}, "output_dir": "o"}
    config = load_config(write(tmp_path, json.dumps(data), "run.json"), [], kind="train")
    assert isinstance(config, TrainConfig) and config.model.kind == "cross_encoder"
    assert config.optim.grad_accum == 10


def test_overrides_go_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "optim: {lr: 1.0e-5, batch_size: 4}\nlayers: {k: 3}\n")
    config = load_config(path, REQUIRED_DISTILL + ["optim.lr=3e-5", "layers.strategy=map",
                                                   "layers.pairs=[[5, 11]]", "teacher.train=false",
                                                   "eval.max_queries=200", "student.max_passage_length=null"],
                         kind="distill")
    assert config.optim.lr == 3e-5 and config.optim.batch_size == 4 and config.layers.k == 3
    assert (config.layers.strategy, config.layers.pairs) == ("map", ((5, 11),))
    assert config.teacher.train is False and config.eval.max_queries == 200
    assert config.student.max_passage_length is None


def test_a_section_can_be_overridden_as_a_mapping():
    config = distill("loss={response: none, layer: hidden_mse}")
    assert (config.loss.response, config.loss.layer, config.loss.temperature) == ("none", "hidden_mse", 1.0)


def test_numbers_in_several_spellings():
    config = distill("optim.steps=1e4", "optim.batch_size=32.0", "optim.lr=0.00002", "optim.adam_eps=1_0e-9")
    assert config.optim.steps == 10_000 and isinstance(config.optim.steps, int)
    assert config.optim.batch_size == 32 and config.optim.lr == 2e-5 and config.optim.adam_eps == 1e-8


def test_choices_are_case_insensitive_and_canonical():
    config = distill("loss.response=KL", "teacher.kind=ColBERT", "layers.strategy=RANDOM")
    assert (config.loss.response, config.teacher.kind, config.layers.strategy) == ("kl", "colbert", "random")


def test_empty_file_and_no_file_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), REQUIRED_DISTILL) == distill()


# --------------------------------------------------------------------------- strict keys and types

def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-5\n  warmup_ration: 0.1\n")
    message = error_of(path=path)
    assert message.startswith(str(path)) and "optim.warmup_ration" in message
    assert "did you mean 'optim.warmup_ratio'?" in message


def test_unknown_key_in_override_names_the_override():
    message = error_of("loss.temprature=2")
    assert message.startswith("override 'loss.temprature=2'") and "did you mean 'loss.temperature'" in message


def test_of_several_problems_an_unknown_key_comes_first_then_a_type():
    """As before pydantic: every key is checked, then every type, then the values."""
    assert "loss.temprature: unknown option" in error_of("teacher.max_query_length=0", "optim.lr=abc",
                                                         "loss.temprature=2")
    assert "optim.lr: expected a number, got 'abc'" in error_of("teacher.max_query_length=0", "optim.lr=abc")
    assert "teacher.max_query_length: must be > 0" in error_of("teacher.max_query_length=0", "optim.lr=0")


def test_misplaced_option_suggests_its_real_section():
    assert "did you mean 'loss.layer_temperature'" in error_of("layers.layer_temperature=5")
    assert "did you mean 'optim'" in error_of("optimizer.lr=1")


def test_job_kinds_have_their_own_keys():
    assert "teacher: unknown option" in error_of("teacher.path=x", kind="train")
    assert "model: unknown option" in error_of("model.path=x", kind="distill")
    assert "loss.layer: unknown option" in error_of("loss.layer=lead", kind="train")
    with pytest.raises(ConfigError, match="unknown job kind"):
        load_config(None, [], kind="pretrain")


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
    ("optim.steps=1.5", "optim.steps: expected an integer, got 1.5"),
    ("optim.bf16=maybe", "optim.bf16: expected true or false, got 'maybe'"),
    ("teacher.train=1", "teacher.train: expected true or false, got 1"),
    ("loss.response=xl", "loss.response: expected one of kl, margin_mse, none, got 'xl' (did you mean 'kl'?)"),
    ("teacher.kind=dual", "teacher.kind: expected one of dual_encoder, colbert, cross_encoder"),
    ("optim=3", "optim: expected a mapping of options, got 3"),
    ("data.corpus=[a, b]", "data.corpus: expected a string, got a list"),
    ("optim.lr=.inf", "optim.lr: expected a number"),
    ("loss.temperature=null", "loss.temperature: expected a number, got null"),
    ("student.pooling=None", "student.pooling: expected one of cls, mean or null, got 'None' (write null"),
    ("optim.teacher_lr=none", "optim.teacher_lr: expected a number or null, got 'none'"),
])
def test_wrong_types(override, expected):
    assert expected in error_of(override)


def test_malformed_overrides():
    for text, expected in [("optim.lr", "expected key=value"), ("=3", "expected key=value"),
                           ("optim..lr=1", "not a dotted option name")]:
        with pytest.raises(ConfigError, match=expected):
            load_config(None, [text])
    with pytest.raises(ConfigError, match="optim.lr is not a section"):
        load_config(None, ["optim.lr=1e-5", "optim.lr.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", [])
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path, [])
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: invalid YAML"):
        load_config(write(tmp_path, "optim:\n  lr: [1\n"), [])
    with pytest.raises(ConfigError, match=r"run.yaml:3: invalid YAML \(duplicate key 'lr'\)"):
        load_config(write(tmp_path, "optim:\n  lr: 1.0e-5\n  lr: 2.0e-5\n"), [])
    with pytest.raises(ConfigError, match="top level, got a list"):
        load_config(write(tmp_path, "- a\n- b\n"), [])
    with pytest.raises(ConfigError, match=r"run.json:1: invalid JSON"):
        load_config(write(tmp_path, "{'a': 1}", "run.json"), [])


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("override, expected", [
    ("teacher.max_query_length=0", "teacher.max_query_length: must be > 0, got 0"),
    ("student.max_passage_length=-8", "student.max_passage_length: must be > 0"),
    ("layers.k=0", "layers.k: must be > 0, got 0"),
    ("layers.resample_every=0", "layers.resample_every: must be > 0"),
    ("loss.temperature=0", "loss.temperature: must be > 0"),
    ("loss.layer_temperature=-1", "loss.layer_temperature: must be > 0"),
    ("loss.response_weight=-1", "loss.response_weight: must be >= 0"),
    ("optim.steps=0", "optim.steps: must be > 0"),
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("optim.teacher_lr=-1e-5", "optim.teacher_lr: must be > 0"),
    ("optim.warmup_ratio=1", "optim.warmup_ratio: must be in [0, 1), got 1.0"),
    ("optim.warmup_ratio=-0.1", "optim.warmup_ratio: must be in [0, 1)"),
    ("optim.batch_size=0", "optim.batch_size: must be > 0"),
    ("optim.max_grad_norm=0", "optim.max_grad_norm: must be > 0"),
    ("data.num_negatives=-1", "data.num_negatives: must be >= 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: must be > 0"),
    ("eval.k=0", "eval.k: must be > 0"),
    ("eval.metric=nDGC@10", "eval.metric: not an ir-measures measure name"),
    ("eval.split=' '", "eval.split: must name a qrels split"),
    ("seed=-1", "seed: must be in [0, 2**32)"),
    ("log_every=0", "log_every: must be > 0"),
    ("output_dir=", "output_dir: required but not set"),
    ("layers.strategy=0-1", ("layers.strategy: expected one of random, last, skip, paper_last, paper_skip, map, "
                             "or old-style student:teacher pairs like '0:1,1:3,2:5', got '0-1'")),
    ("layers.strategy=0:1,0:3", "layers.strategy: '0:1,0:3' uses a student layer twice (layer 0)"),
    ("layers.strategy=0:1,2:1", "uses a teacher layer twice"),
    ("layers.strategy=-1:3", "student:teacher pairs"),
    ("layers.strategy=randm", ("layers.strategy: expected one of random, last, skip, paper_last, paper_skip, map, "
                               "got 'randm' (did you mean 'random'?)")),
    ("layers.strategy=map", "layers.pairs: strategy 'map' needs its [student, teacher] pairs, e.g. [[0, 1], [2, 5]]"),
    ("layers.pairs=[[0, 1]]", "layers.pairs: only strategy 'map' takes pairs; set layers.pairs to null for 'random'"),
    ("layers.pairs=[[0, 1], [0, 3]]", "layers.pairs: only strategy 'map' takes pairs"),
    ("teacher.kind=colbert", None),  # fine by itself ...
    ("student.kind=cross_encoder", None),
])
def test_values_are_validated(override, expected):
    if expected is None:
        distill(override)
    else:
        assert expected in error_of(override)


def test_dual_encoder_options_on_other_kinds_are_errors():
    message = error_of("teacher.kind=colbert", "teacher.pooling=mean")
    assert "teacher.pooling: only applies to a dual_encoder, not to a colbert" in message
    assert "student.normalize: only applies" in error_of("student.kind=cross_encoder", "student.normalize=true")
    assert "teacher.colbert_dim: only applies to a colbert, not to a dual_encoder" in error_of("teacher.colbert_dim=0")
    assert ("teacher.token_type_ids: only applies to a cross_encoder, not to a colbert"
            in error_of("teacher.kind=colbert", "teacher.token_type_ids=false"))
    assert "teacher.colbert_dim: must be >= 0, got -1" in error_of("teacher.kind=colbert", "teacher.colbert_dim=-1")
    assert distill("teacher.kind=colbert", "teacher.colbert_dim=0").teacher.colbert_dim == 0


def test_required_options_name_their_source(tmp_path):
    path = write(tmp_path, "teacher: {path: t}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: student.path: required but not set$"):
        load_config(path, [], kind="distill")
    with pytest.raises(ConfigError, match=r"^config: data.corpus: required but not set$"):
        load_config(None, ["teacher.path=t", "student.path=s"], kind="distill")
    with pytest.raises(ConfigError, match=r"optim.steps: required but not set"):
        load_config(None, [r for r in REQUIRED_DISTILL if not r.startswith("optim.steps")])


def test_all_loss_terms_off_is_an_error():
    message = error_of("loss.student_ce=0", "teacher.train=false", "loss.response=none", "loss.layer=none")
    assert "loss: every loss term is off" in message
    distill("loss.student_ce=0", "loss.response=none", "loss.layer=none")  # the teacher still trains


def test_a_map_is_a_list_of_pairs_sorted_by_student_layer(tmp_path):
    path = write(tmp_path, "layers:\n  strategy: map\n  pairs: [[3, 11], [0, 1], [1, 3]]\n")
    config = load_config(path, REQUIRED_DISTILL)
    assert (config.layers.strategy, config.layers.pairs) == ("map", ((0, 1), (1, 3), (3, 11)))
    assert distill("layers.strategy=MAP", "layers.pairs=[[2, 5]]").layers.pairs == ((2, 5),)
    assert distill().layers.pairs is None
    assert "layers:\n  strategy: map\n  pairs: [[0, 1], [1, 3], [3, 11]]\n" in save_config(
        config, tmp_path / "saved.yaml").read_text()


@pytest.mark.parametrize("pairs, expected", [
    ("[[0, 1], [0, 3]]", "layers.pairs: [[0, 1], [0, 3]] uses a student layer twice (layer 0)"),
    ("[[0, 1], [2, 1]]", "layers.pairs: [[0, 1], [2, 1]] uses a teacher layer twice (layer 1)"),
    ("[[0, -1]]", ("layers.pairs: expected [student, teacher] pairs of layer numbers (>= 0) like [[0, 1], [2, 5]], "
                   "got [[0, -1]]")),
    ("[[0, 1, 2]]", "expected [student, teacher] pairs"),
    ("[[0, true]]", "expected [student, teacher] pairs"),
    ("[[0, 1.5]]", "expected [student, teacher] pairs"),
    ("[]", "expected [student, teacher] pairs"),
    ("0:1", ("layers.pairs: expected [student, teacher] pairs of layer numbers (>= 0) like [[0, 1], [2, 5]], "
             "got '0:1'")),
])
def test_bad_pairs_name_the_key(pairs, expected):
    message = error_of("layers.strategy=map", f"layers.pairs={pairs}")
    assert message.startswith(f"override 'layers.pairs={pairs}': ") and expected in message


def test_old_map_spelling_reads_as_map_with_pairs(tmp_path):
    """Before ``layers.pairs`` the map was the strategy itself: saved runs and ledgers still hold that."""
    config = distill("layers.strategy= 3:11 , 0:1,1:3")
    assert (config.layers.strategy, config.layers.pairs) == ("map", ((0, 1), (1, 3), (3, 11)))
    assert config == distill("layers.strategy=map", "layers.pairs=[[0, 1], [1, 3], [3, 11]]")
    # YAML 1.1 reads an unquoted single pair as a base-60 number (5:11 -> 311): read back as that pair
    unquoted = write(tmp_path, "layers: {strategy: 5:11}\n")
    assert yaml.safe_load(unquoted.read_text()) == {"layers": {"strategy": 311}}
    assert load_config(unquoted, REQUIRED_DISTILL).layers.pairs == ((5, 11),)
    assert distill("layers.strategy=5:11").layers.pairs == ((5, 11),)
    assert parse_layer_map("2:5") == ((2, 5),) and parse_layer_map(311) == ((5, 11),)
    with pytest.raises(ValueError):
        parse_layer_map("2:5,")
    assert ("layers.pairs: set beside the old-style map '0:1'"
            in error_of("layers.strategy=0:1", "layers.pairs=[[0, 1]]"))


def test_a_run_saved_in_the_old_spelling_resumes(tmp_path):
    """A config.yaml written before ``layers.pairs`` (the map as its strategy, unquoted; a single pair quoted
    by the old dumper) loads to the same settings as today's spelling, so a resume sees no change."""
    for old, pairs in [("0:1,2:5", "[[0, 1], [2, 5]]"), ("'5:11'", "[[5, 11]]")]:
        saved = save_config(distill("layers.strategy=map", f"layers.pairs={pairs}"), tmp_path / "new.yaml")
        text = saved.read_text().replace(f"  strategy: map\n  pairs: {pairs}\n", f"  strategy: {old}\n")
        assert "pairs" not in text
        before = load_config(write(tmp_path, text, "config.yaml"), kind="distill")
        assert changed_settings(before, distill("layers.strategy=map", f"layers.pairs={pairs}")) == []
        assert config_to_dict(before) == config_to_dict(load_config(saved, kind="distill"))


def test_ledger_rows_in_the_old_spelling_compare_in_todays():
    row = config_to_dict(distill("layers.strategy=skip"))
    old = {**row, "layers": {"strategy": "0:1,2:5", "k": 5, "resample_every": 10}}
    assert todays_spelling(old)["layers"] == {"strategy": "map", "pairs": [[0, 1], [2, 5]], "k": 5,
                                              "resample_every": 10}
    assert config_changes(old, config_to_dict(distill("layers.strategy=map", "layers.pairs=[[0, 1], [2, 5]]")),
                          "distill") == []
    assert config_changes(old, config_to_dict(distill("layers.strategy=map", "layers.pairs=[[0, 1]]")),
                          "distill") == ["layers.pairs: [[0, 1], [2, 5]] -> [[0, 1]]"]
    assert todays_spelling(row) == row
    broken = {**row, "layers": {"strategy": "0-1"}}
    assert todays_spelling(broken) == broken  # left as it is: the comparison then shows the difference
    assert todays_spelling({"model": {"path": "m"}}) == {"model": {"path": "m"}}  # a train row has no layers


def test_student_init_from_teacher_layers():
    config = load_config(None, [r for r in REQUIRED_DISTILL if not r.startswith("student.path")]
                         + ["student.init=teacher_layers=[ 0, 2,4 ]"])
    assert config.student.init == "teacher_layers=[0,2,4]" and config.student.init_teacher_layers == (0, 2, 4)
    assert config.student.path is None and distill().student.init_teacher_layers is None
    assert parse_student_init("teacher_layers=[11]") == (11,)
    assert "remove student.path" in error_of("student.init=teacher_layers=[0,2]")
    no_path = [r for r in REQUIRED_DISTILL if not r.startswith("student.path")]
    for text, expected in [("teacher_layers=[2,0]", "distinct and increasing"),
                           ("teacher_layers=[0,0]", "distinct and increasing"),
                           ("teacher_layers=[]", "no teacher layers"),
                           ("teacher_layers=[a]", "non-negative integers"),
                           ("layers=[0,2]", "expected teacher_layers=[i,j,...]")]:
        with pytest.raises(ConfigError, match=rf"student.init: .*{re.escape(expected)}"):
            load_config(None, no_path + [f"student.init={text}"])
    # Any teacher's blocks can seed a dual-encoder student (the kind builds itself from them, see
    # test_trainer); whether the student's kind can be built so is the trainer's one-line error.
    config = load_config(None, no_path + ["student.init=teacher_layers=[0]", "teacher.kind=colbert"])
    assert (config.teacher.kind, config.student.kind) == ("colbert", "dual_encoder")


# --------------------------------------------------------------------------- saving

def test_round_trip_distill(tmp_path):
    config = distill("layers.strategy=map", "layers.pairs=[[2, 5], [0, 1]]", "teacher.kind=colbert",
                     "teacher.train=false", "optim.lr=5e-5",
                     "optim.teacher_lr=1e-5", "loss.response=margin_mse", "eval.split=null", "eval.every=500",
                     "data.corpus=2019", "student.pooling=mean", "checkpoint.keep_last=null", "seed=0")
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert path.read_text().startswith("# leadkd distill config")
    assert load_config(path, [], kind="distill") == config
    assert config.data.corpus == "2019"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # atomic write leaves no temp file


def test_round_trip_train(tmp_path):
    config = load_config(None, REQUIRED_TRAIN + ["model.kind=cross_encoder", "loss.in_batch_negatives=false",
                                                 "optim.bf16=true", "model.trust_remote_code=true"], kind="train")
    assert load_config(save_config(config, tmp_path / "c.yaml"), [], kind="train") == config


def test_config_to_dict_is_plain_and_reloads():
    config = distill("layers.strategy=map", "layers.pairs=[[0, 1]]")
    data = config_to_dict(config)
    assert json.loads(json.dumps(data)) == data
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert config_from_dict(data, kind="distill") == config
    assert set(data) == set(DistillConfig.model_fields)
    assert list(data)[:3] == ["teacher", "student", "data"]  # the models first, as a recipe reads


def test_configs_are_frozen_and_validate_config_checks_code_built_ones():
    config = distill()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.optim.lr = 1.0  # type: ignore[misc]
    changed = config.model_copy(update={"student": StudentConfig(path="s", init="teacher_layers=[1, 3]")})
    with pytest.raises(ConfigError, match="^student.init: .*remove student.path"):
        validate_config(changed)
    fixed = validate_config(changed.model_copy(update={"student": StudentConfig(init="teacher_layers=[1, 3]")}))
    assert fixed.student.init == "teacher_layers=[1,3]"
    with pytest.raises(ConfigError, match="^optim.lr: must be > 0, got -1.0$"):
        validate_config(config.model_copy(update={"optim": config.optim.model_copy(update={"lr": -1.0})}))
    with pytest.raises(ConfigError, match="^teacher.path: required but not set$"):
        validate_config(DistillConfig())


_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(corpus=_TEXT | st.sampled_from(["2e-5", "1e5", "5:11", "010", "null", "yes", "~", "#x", "a: b", "- a"]),
       lr=st.floats(min_value=1e-12, max_value=10.0), steps=st.integers(1, 10**9),
       split=st.none() | _TEXT, weight=st.floats(min_value=0.0, max_value=1e6), seed=st.integers(0, 2**32 - 1))
def test_round_trip_property(tmp_path_factory, corpus, lr, steps, split, weight, seed):
    base = distill()
    config = base.model_copy(update={
        "seed": seed, "eval": base.eval.model_copy(update={"split": split}),
        "data": base.data.model_copy(update={"corpus": corpus}),
        "optim": base.optim.model_copy(update={"lr": lr, "steps": steps}),
        "loss": base.loss.model_copy(update={"layer_weight": weight})})
    config = validate_config(config)
    path = save_config(config, tmp_path_factory.mktemp("rt") / "config.yaml")
    assert load_config(path, [], kind="distill") == config


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    """Configs are read with a safe loader: a python/object tag is an error, never a call."""
    marker = tmp_path / "executed"
    file = tmp_path / "evil.yaml"
    file.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml:1: invalid YAML") as info:
        load_config(file, kind="train")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):  # an override is taken as plain text, which is not a valid seed
        load_config(None, ["data.corpus=c", "data.train_groups=g", "model.path=m",
                           f"seed=!!python/object/apply:os.system ['touch {marker}']"], kind="train")
    assert not marker.exists()
