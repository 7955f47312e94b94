"""leadkd.runtime.distributed: single-process no-ops, and two real gloo processes against one process on the
whole batch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port, run_processes
from leadkd.runtime import distributed as D
from leadkd.runtime.errors import LeadkdError

WORLD, B, M, FEAT, DIM, LQ = 2, 3, 3, 5, 4, 4  # processes, queries/process, passages/query, widths, query tokens


# --------------------------------------------------------------------------- single process

@pytest.fixture
def clean_env(monkeypatch):
    for name in D._ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("world", [None, "1"])
def test_single_process_context(clean_env, world):
    if world is not None:
        clean_env.setenv("WORLD_SIZE", world)
    ctx = D.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert ctx.device == torch.device("cpu") and ctx.backend is None
    ctx.barrier()
    ctx.cleanup()
    assert not D.is_distributed() and D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK is not:"),
    ({"WORLD_SIZE": "two"}, "must be an integer"),
    ({"WORLD_SIZE": "0"}, "must be >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR is not"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "outside 0..1"),
])
def test_bad_launch_environment_is_a_clear_error(clean_env, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(LeadkdError, match=message):
        D.init_distributed(device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(clean_env):
    with pytest.raises(LeadkdError, match="CUDA is not available"):
        D.init_distributed(device="cuda")


def test_single_process_helpers_are_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather_with_grad(x) is x
    assert D.gather_padded(x, pad_value=0.0, dim=1) is x
    assert D.all_reduce_mean(2.5) == 2.5
    mean = D.all_reduce_mean(x.sum())
    assert not mean.requires_grad and torch.equal(mean, x.sum().detach())


# --------------------------------------------------------------------------- two processes

def _data() -> dict[str, torch.Tensor]:
    """The global batch, identical in every process: features of queries, passages and their tokens."""
    g = torch.Generator().manual_seed(0)
    lengths = [3 + 2 * r for r in range(WORLD)]  # passage token lengths differ per process (ColBERT case)
    data = {
        "queries": torch.randn(WORLD * B, FEAT, generator=g, dtype=torch.float64),
        "passages": torch.randn(WORLD * B * M, FEAT, generator=g, dtype=torch.float64),
        "query_tokens": torch.randn(WORLD * B, LQ, FEAT, generator=g, dtype=torch.float64),
    }
    for r, length in enumerate(lengths):
        data[f"tokens{r}"] = torch.randn(B * M, length, FEAT, generator=g, dtype=torch.float64)
        mask = torch.ones(B * M, length, dtype=torch.long)
        mask[::2, -1] = 0  # some real padding inside each process's batch too
        data[f"mask{r}"] = mask
    return data


def _encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(FEAT, DIM).double()


def _maxsim(q_tokens: torch.Tensor, p_tokens: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """ColBERT scores [Q, P]: sum over query tokens of the max over real passage tokens."""
    sim = torch.einsum("qid,pjd->qpij", q_tokens, p_tokens)
    sim = sim.masked_fill(p_mask[None, :, None, :] == 0, -1e4)
    return sim.max(dim=-1).values.sum(dim=-1)


def _pad_cat(parts: list[torch.Tensor], value: float) -> torch.Tensor:
    longest = max(part.shape[1] for part in parts)
    return torch.cat([F.pad(part, (0, 0) * (part.dim() - 2) + (0, longest - part.shape[1]), value=value)
                      for part in parts])


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = D.init_distributed(device="cpu", timeout_s=60)
    try:
        _run_checks(ctx, Path(out_dir))
    finally:
        ctx.cleanup()


def _run_checks(ctx: D.DistContext, out_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, data, out = ctx.rank, _data(), {}
    out["context"] = (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend, ctx.device.type)
    local_q = slice(rank * B, (rank + 1) * B)
    local_p = slice(rank * B * M, (rank + 1) * B * M)
    labels = (rank * B + torch.arange(B)) * M  # query i of rank r: positive at global column (r*B + i)*M

    # Candidate order: gathered global passage ids are 0..W*B*M-1 in order, so the labels hit positives.
    ids = D.gather_with_grad(torch.arange(B * M, dtype=torch.float64) + rank * B * M)
    out["gathered_ids"] = ids
    out["label_ids"] = ids[labels]

    # Dual encoder: local queries against all gathered candidates, DDP averages the gradients.
    model = DDP(_encoder(1))
    emb = model(torch.cat([data["queries"][local_q], data["passages"][local_p]]))
    q, p = emb[:B], emb[B:]
    loss = F.cross_entropy(q @ D.gather_with_grad(p).T, labels)
    loss.backward()
    out["de_loss"] = D.all_reduce_mean(loss.detach())
    out["de_grads"] = _grads(model.module)

    # ColBERT-like: passage token lengths differ per process; states and masks padded and gathered.
    model = DDP(_encoder(2))
    tokens, mask = data[f"tokens{rank}"], data[f"mask{rank}"]
    states = model(torch.cat([data["query_tokens"][local_q].reshape(-1, FEAT), tokens.reshape(-1, FEAT)]))
    q_tokens = states[:B * LQ].reshape(B, LQ, DIM)
    p_tokens = states[B * LQ:].reshape(B * M, tokens.shape[1], DIM)
    all_tokens = D.gather_padded(p_tokens, pad_value=0.0, dim=1)
    all_mask = D.gather_padded(mask, pad_value=0, dim=1)
    out["cb_shapes"] = (tuple(all_tokens.shape), tuple(all_mask.shape))
    loss = F.cross_entropy(_maxsim(q_tokens, all_tokens, all_mask), labels)
    loss.backward()
    out["cb_loss"] = D.all_reduce_mean(loss.detach())
    out["cb_grads"] = _grads(model.module)

    # The paper's way, for contrast: non-differentiable gather, local slot re-inserted, global loss.
    model = DDP(_encoder(1))
    emb = model(torch.cat([data["queries"][local_q], data["passages"][local_p]]))
    slots_q = [torch.empty(B, DIM, dtype=torch.float64) for _ in range(WORLD)]
    slots_p = [torch.empty(B * M, DIM, dtype=torch.float64) for _ in range(WORLD)]
    torch.distributed.all_gather(slots_q, emb[:B].detach())
    torch.distributed.all_gather(slots_p, emb[B:].detach())
    slots_q[rank], slots_p[rank] = emb[:B], emb[B:]
    all_q, all_p = torch.cat(slots_q), torch.cat(slots_p)
    F.cross_entropy(all_q @ all_p.T, torch.arange(WORLD * B) * M).backward()
    out["paper_grads"] = _grads(model.module)

    # Unequal dim-0 sizes fail on every process alike (no hang).
    try:
        D.gather_with_grad(torch.zeros(rank + 1, 2))
        out["unequal"] = "no error"
    except ValueError as exc:
        out["unequal"] = str(exc)

    out.update(_duplicate_positive_checks(rank))
    out["mean_float"] = D.all_reduce_mean(float(rank))
    out["mean_tensor"] = D.all_reduce_mean(torch.tensor([rank, 2.0 * rank]))
    ctx.barrier()
    torch.save(out, out_dir / f"rank{rank}.pt")


#: Per process, B groups of M passages as (query positives, passage ids). Rank 0's first positive "p0" is
#: also a hard negative of rank 1's second query, and rank 1's first query has a second judged positive,
#: "p0b", that sits in rank 0's last group: copies only the gathered ids can reveal.
DUP_GROUPS = {
    0: [(("p0",), ["p0", "n0", "n1"]), (("p1",), ["p1", "n2", "n3"]), (("p2",), ["p2", "n4", "p0b"])],
    1: [(("p3", "p0b"), ["p3", "n5", "n6"]), (("p4",), ["p4", "p0", "n7"]), (("p5",), ["p5", "n8", "n9"])],
}


def _dup_samples(rank: int) -> list:
    from leadkd.data.batches import GroupSample

    return [GroupSample(f"q{rank}{i}", "query", ids, ["text"] * M, positive_ids=positives)
            for i, (positives, ids) in enumerate(DUP_GROUPS[rank])]


def _dup_batch(rank: int):
    from leadkd.data.batches import collate_groups

    return collate_groups(_dup_samples(rank))


def _perfect_loss(batch, candidate_ids: list[str], labels: torch.Tensor, mask) -> torch.Tensor:
    """A perfect model's LEAD loss: every judged positive scores 20 above every other candidate."""
    from leadkd.distill.losses import lead_total_loss

    scores = torch.tensor([[20.0 if c in positives else 0.0 for c in candidate_ids]
                           for positives in batch.positive_ids], dtype=torch.float64).expand(2, -1, -1)
    return lead_total_loss(scores, scores, labels, [(0, 0)], candidate_mask=mask)["loss"]


def _duplicate_positive_checks(rank: int) -> dict:
    """The trainer's duplicate mask over gathered candidates, and what it does to a perfect model's loss."""
    from leadkd.distill.losses import group_labels
    from leadkd.distill.objectives import Layout, duplicate_positives

    batch = _dup_batch(rank)
    mask = duplicate_positives(batch, Layout(gathered=True, offset=rank * B, own_group=False))
    everyone = [pid for r in range(WORLD) for _, ids in DUP_GROUPS[r] for pid in ids]
    labels = group_labels(B, M, query_offset=rank * B)
    return {"dup_mask": mask, "dup_loss_masked": D.all_reduce_mean(_perfect_loss(batch, everyone, labels, mask)),
            "dup_loss_plain": D.all_reduce_mean(_perfect_loss(batch, everyone, labels, None))}


def _launch(out_dir: Path, timeout_s: float = 90.0) -> list[dict]:
    run_processes(_worker, (free_port(), str(out_dir)), WORLD, timeout_s)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("dist"))


def _reference() -> dict:
    """One process, the concatenated global batch: what the two processes must reproduce."""
    data, labels, ref = _data(), torch.arange(WORLD * B) * M, {}
    model = _encoder(1)
    emb = model(torch.cat([data["queries"], data["passages"]]))
    loss = F.cross_entropy(emb[:WORLD * B] @ emb[WORLD * B:].T, labels)
    loss.backward()
    ref["de_loss"], ref["de_grads"] = loss.detach(), _grads(model)

    model = _encoder(2)
    tokens = _pad_cat([data[f"tokens{r}"] for r in range(WORLD)], 0.0)
    mask = _pad_cat([data[f"mask{r}"] for r in range(WORLD)], 0)
    states = model(torch.cat([data["query_tokens"].reshape(-1, FEAT), tokens.reshape(-1, FEAT)]))
    q_tokens = states[:WORLD * B * LQ].reshape(WORLD * B, LQ, DIM)
    p_tokens = states[WORLD * B * LQ:].reshape(tokens.shape[0], tokens.shape[1], DIM)
    loss = F.cross_entropy(_maxsim(q_tokens, p_tokens, mask), labels)
    loss.backward()
    ref["cb_loss"], ref["cb_grads"] = loss.detach(), _grads(model)
    return ref


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-6)


def test_two_processes_basics(two_ranks):
    for rank, out in enumerate(two_ranks):
        assert out["context"] == (rank, WORLD, rank == 0, "gloo", "cpu")
        assert torch.equal(out["gathered_ids"], torch.arange(WORLD * B * M, dtype=torch.float64))
        assert torch.equal(out["label_ids"], ((rank * B + torch.arange(B)) * M).double())
        assert "same shape on every process" in out["unequal"]
        assert out["mean_float"] == pytest.approx(0.5)
        assert torch.equal(out["mean_tensor"], torch.tensor([0.5, 1.0]))


def test_gathered_contrastive_loss_and_grads_equal_one_process(two_ranks):
    ref = _reference()
    for out in two_ranks:
        for kind in ("de", "cb"):
            assert _close(out[f"{kind}_loss"], ref[f"{kind}_loss"]), kind
            for name, grad in ref[f"{kind}_grads"].items():
                assert _close(out[f"{kind}_grads"][name], grad), (kind, name)
        assert out["cb_shapes"] == ((WORLD * B * M, 3 + 2 * (WORLD - 1), DIM), (WORLD * B * M, 3 + 2 * (WORLD - 1)))


def test_paper_style_gather_scales_gradients_by_one_over_world(two_ranks):
    ref = _reference()
    for out in two_ranks:
        for name, grad in ref["de_grads"].items():
            assert _close(out["paper_grads"][name], grad / WORLD), name


def _expected_duplicate_mask(rank: int) -> torch.Tensor:
    """Written out: the global candidate columns (rank-major, M per group) each local query must not see."""
    columns = {0: {0: [13]}, 1: {0: [8]}}[rank]  # rank 0 q0: "p0" in rank 1's group 1; rank 1 q0: "p0b"
    mask = torch.zeros(B, WORLD * B * M, dtype=torch.bool)
    for query, cols in columns.items():
        mask[query, cols] = True
    return mask


def test_copies_of_a_positive_in_other_processes_groups_are_masked(two_ranks):
    """Two processes: the mask finds copies in the other process's groups, and a perfect model's loss
    then reaches ~0 (without it, two of the six queries keep P(positive) <= 1/2, i.e. >= log 2 each)."""
    for rank, out in enumerate(two_ranks):
        assert torch.equal(out["dup_mask"], _expected_duplicate_mask(rank))
        assert out["dup_loss_masked"].item() < 1e-6
        assert out["dup_loss_plain"].item() >= 2 * math.log(2) / (WORLD * B) - 1e-6


def test_one_process_on_the_whole_batch_masks_the_same_candidates():
    from leadkd.data.batches import collate_groups
    from leadkd.distill.objectives import Layout, duplicate_positives

    whole = collate_groups([sample for r in range(WORLD) for sample in _dup_samples(r)])
    mask = duplicate_positives(whole, Layout(gathered=False, offset=0, own_group=False))
    assert torch.equal(mask, torch.cat([_expected_duplicate_mask(r) for r in range(WORLD)]))

