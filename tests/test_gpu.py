"""The CUDA paths: bf16 autocast against fp32, trainer steps, a one-process NCCL group, ``--device cuda``.

Each test runs on every device this machine has: the CPU always (so the test itself is exercised in
CI), CUDA where there is one; the CUDA cases carry the ``gpu`` mark (``pytest -m gpu`` runs them, as
benchmarks/gpu/run.sh does on the accelerator machine) and skip without a GPU.

Tolerances, as relative Frobenius errors ``|x - ref| / |ref|`` against the fp32 computation on the same
device: bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%), and a 4-block encoder compounds it
over ~20 matrix products, so bf16 forwards land near 1e-2 (measured on the CPU: scores 3e-3, encoded
vectors 1.1e-2, loss terms 8e-4 to 1.1e-2); we allow 3e-2. A backward compounds the forward's rounding
with its own (measured: 8e-2 over all 224k gradient entries, cosine 0.997), so gradients must be within
0.15 and point the same way (cosine >= 0.99).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.distill.losses import group_labels, lead_total_loss
from leadkd.models import DualEncoder

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device on this machine")])]

SCORE_TOLERANCE = 3e-2
GRADIENT_TOLERANCE = 0.15
GRADIENT_COSINE = 0.99


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    assert torch.isfinite(value).all(), "non-finite values"
    return float((value - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu")
    return {
        # Wider than the other tests' models so that bf16 rounding is what it is in a real encoder.
        "teacher": make_tiny_bert_folder(root / "teacher", layers=4, hidden=64, seed=3, dropout=0.0, init_range=0.2),
        "student": make_tiny_bert_folder(root / "student", layers=2, hidden=64, seed=4, dropout=0.0, init_range=0.2),
        "data": make_tiny_beir(root / "data", docs=32, queries=16),
        "groups": make_tiny_groups(root / "groups.jsonl", queries=16, docs=32, negatives=3),
    }


def texts(folders) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (folders["data"] / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line)["text"] for line in (folders["data"] / "queries.jsonl").read_text().splitlines()]
    return queries[:8], [row["text"] for row in rows[:16]]


@pytest.mark.parametrize("device", DEVICES)
def test_a_forward_under_bf16_autocast_is_the_fp32_forward_within_bf16_rounding(folders, device):
    model = DualEncoder.from_pretrained(folders["teacher"]).to(device).eval()
    queries, passages = texts(folders)
    with torch.no_grad():
        reference = model.layer_scores(queries, passages)
        with torch.autocast(device, dtype=torch.bfloat16):
            mixed = model.layer_scores(queries, passages)
    assert mixed.shape == reference.shape == (4, 8, 16)
    error = relative_error(mixed, reference)
    assert 0 < error < SCORE_TOLERANCE, error  # not zero: autocast did run in bf16
    # The encode path (no autograd, length-sorted batches) under bf16 gives the same vectors again.
    fp32 = model.encode(passages, batch_size=5)
    bf16 = model.encode(passages, batch_size=5, bf16=True)
    assert relative_error(torch.from_numpy(bf16), torch.from_numpy(fp32)) < SCORE_TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
def test_the_lead_loss_and_its_gradients_under_bf16_are_the_fp32_ones_within_rounding(folders, device):
    teacher = DualEncoder.from_pretrained(folders["teacher"]).to(device).train()
    student = DualEncoder.from_pretrained(folders["student"]).to(device).train()
    queries, passages = texts(folders)
    labels = group_labels(len(queries), 2, in_batch=True).to(device)
    pairs = [(0, 1), (1, 3)]

    def run(bf16: bool) -> tuple[dict, list[torch.Tensor]]:
        for model in (teacher, student):
            model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            terms = lead_total_loss(teacher.layer_scores(queries, passages),
                                    student.layer_scores(queries, passages), labels, pairs)
        assert all(value.dtype == torch.float32 for value in terms.values())  # losses upcast bf16 scores
        terms["loss"].backward()
        grads = [p.grad.detach().clone() for m in (student, teacher) for p in m.parameters() if p.grad is not None]
        return terms, grads

    reference, reference_grads = run(False)
    mixed, mixed_grads = run(True)
    for name in ("loss", "student_ce", "teacher_ce", "response_kl", "layer_kl"):
        assert relative_error(mixed[name], reference[name]) < SCORE_TOLERANCE, name
    assert len(mixed_grads) == len(reference_grads) > 0
    flat, flat_reference = torch.cat([g.flatten() for g in mixed_grads]), torch.cat(
        [g.flatten() for g in reference_grads])
    assert relative_error(flat, flat_reference) < GRADIENT_TOLERANCE
    assert float(torch.nn.functional.cosine_similarity(flat.double(), flat_reference.double(), dim=0)) > GRADIENT_COSINE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_steps_run_on_the_device_and_lower_the_loss(folders, device, bf16, tmp_path, monkeypatch):
    from leadkd.config import load_config
    from leadkd.distill.trainer import Trainer

    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto picks the CPU, as on a CPU box
    config = load_config(None, [
        f"teacher.path={folders['teacher']}", f"student.path={folders['student']}",
        "teacher.max_query_length=16", "teacher.max_passage_length=32", "student.max_query_length=16",
        "student.max_passage_length=32", f"data.corpus={folders['data']}", f"data.train_groups={folders['groups']}",
        "data.num_negatives=3", "optim.steps=12", "optim.batch_size=8", "optim.lr=2e-3", "optim.warmup_ratio=0",
        f"optim.bf16={str(bf16).lower()}", "layers.k=2", "layers.resample_every=1", "checkpoint.every=null",
        "eval.split=null", f"output_dir={tmp_path / 'run'}"], kind="distill")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # as the CLI sets it
    trainer = Trainer(config, log=lambda m: None, show_progress=False)
    assert trainer.ctx.device.type == device
    assert os.environ["TOKENIZERS_PARALLELISM"] == ("true" if device == "cuda" else "false")
    assert all(p.device.type == device for t in trainer.models.values() for p in t.model.parameters())
    trainer._iterator = trainer._batches()
    losses = [trainer.train_step().loss for _ in range(12)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # two epochs of 16 queries: the models learn them


def _one_process_group(device: str):
    import torch.distributed as torch_dist

    backend = "nccl" if device == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", 0)} if device == "cuda" else {}
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                  **kwargs)
    return torch_dist


@pytest.mark.parametrize("device", DEVICES)
def test_a_one_process_group_runs_collectives_and_a_ddp_step(folders, device, monkeypatch):
    """NCCL on CUDA (gloo on the CPU), world size 1: leadkd's context joins the group, and collectives
    run on the device through the backend. leadkd's own gathers skip the backend for one process, so the
    collectives are torch's (plus the shape exchange every leadkd gather starts with)."""
    from leadkd.runtime import distributed as dist

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    torch_dist = _one_process_group(device)
    try:
        context = dist.init_distributed(device=device)  # joins the group that exists, leaves it to us
        assert context.backend == ("nccl" if device == "cuda" else "gloo") and not context.owns_group
        x = torch.randn(4, 3, device=context.device)
        total = x.clone()
        torch_dist.all_reduce(total)
        slots = [torch.empty_like(x)]
        torch_dist.all_gather(slots, x)
        torch_dist.broadcast(total, src=0)
        torch.testing.assert_close(total, x)
        torch.testing.assert_close(slots[0], x)
        assert dist._all_shapes(x) == [(4, 3)]
        model = DualEncoder.from_pretrained(folders["student"]).to(context.device)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[context.device.index] if device == "cuda" else None)
        queries, passages = texts(folders)
        wrapped(queries[:2], passages[:4])[-1].sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)  # DDP's reducer ran on this device
        if device == "cuda":
            torch_dist.barrier(device_ids=[0])
            torch.cuda.synchronize()
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("device", DEVICES)
def test_the_cli_encodes_on_the_device_and_in_bf16(folders, device, tmp_path):
    from leadkd.cli import main
    from leadkd.retrieval.pipeline import Embeddings

    common = ["encode", "--model", str(folders["teacher"]), "--data", str(folders["data"])]
    assert main(common + ["--device", device, "--output", str(tmp_path / "fp32")]) in (0, None)
    assert main(common + ["--device", device, "--dtype", "bfloat16", "--output", str(tmp_path / "bf16")]) in (0, None)
    assert main(common + ["--device", "cpu", "--output", str(tmp_path / "cpu")]) in (0, None)
    fp32, bf16, cpu = (Embeddings.load(tmp_path / name) for name in ("fp32", "bf16", "cpu"))
    assert fp32.ids == bf16.ids == cpu.ids and len(fp32.ids) == 32
    np.testing.assert_allclose(fp32.vectors, cpu.vectors, atol=1e-4)  # device changes rounding only
    error = relative_error(torch.tensor(np.array(bf16.vectors)), torch.tensor(np.array(cpu.vectors)))
    assert 0 < error < SCORE_TOLERANCE
