"""Student initialisation from a subset of a teacher's blocks."""

import pytest
import torch

from conftest import make_tiny_bert_folder
from leadkd.models.base import block_outputs, load_backbone
from leadkd.models.surgery import keep_layers
from leadkd.runtime.errors import ConfigError


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("four"), layers=4, seed=3)


def test_kept_blocks_compute_what_the_teacher_blocks_compute(four_layer):
    tokenizer, teacher = load_backbone(str(four_layer))
    teacher.eval()
    student = keep_layers(teacher, [0, 2])
    student.eval()
    assert student.config.num_hidden_layers == 2 and len(student.encoder.layer) == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher is untouched
    batch = tokenizer(["the cell protein", "a gene of the heart"], padding=True, return_tensors="pt")
    with torch.no_grad():
        t_layers = block_outputs(teacher, batch["input_ids"], batch["attention_mask"])
        s_layers = block_outputs(student, batch["input_ids"], batch["attention_mask"])
        # Student block 0 is teacher block 0 exactly.
        torch.testing.assert_close(s_layers[0], t_layers[0])
    # Independently: a fresh 2-layer BERT loaded with teacher blocks 0 and 2 under renamed keys.
    from transformers import BertConfig, BertModel

    config = BertConfig.from_dict({**teacher.config.to_dict(), "num_hidden_layers": 2})
    reference = BertModel(config).eval()
    renamed = {key.replace("encoder.layer.2.", "encoder.layer.1."): value for key, value in teacher.state_dict().items()
               if not key.startswith(("encoder.layer.1.", "encoder.layer.3."))}
    reference.load_state_dict(renamed, strict=False)
    with torch.no_grad():
        r_layers = block_outputs(reference, batch["input_ids"], batch["attention_mask"])
    for got, want in zip(s_layers, r_layers, strict=True):
        torch.testing.assert_close(got, want)


def test_student_weights_are_a_copy(four_layer):
    _, teacher = load_backbone(str(four_layer))
    student = keep_layers(teacher, [1, 3])
    with torch.no_grad():
        student.encoder.layer[0].output.dense.weight.add_(1.0)
    assert not torch.equal(student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight)


@pytest.mark.parametrize("layers, message", [
    ([0, 4], "out of range"),
    ([2, 1], "distinct and increasing"),
    ([1, 1], "distinct and increasing"),
])
def test_bad_layer_lists(four_layer, layers, message):
    _, teacher = load_backbone(str(four_layer))
    with pytest.raises(ConfigError, match=message):
        keep_layers(teacher, layers)
