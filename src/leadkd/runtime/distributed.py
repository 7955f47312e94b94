"""Multi-process training on top of ``torch.distributed``: setup, autograd-aware gathers, rank-aware writes.

Launch with ``torchrun --nproc_per_node=N``; without torchrun's environment everything here is a cheap
no-op, so the same training code runs in one plain process (and in the tests) unchanged.

How gathered candidates keep the gradient exact. Each process scores its B local queries against the
candidates of *all* processes (in-batch + cross-process negatives, spec §2.3), gathered with
:func:`gather_with_grad`. Its backward is a reduce-scatter: every process receives the sum, over all
processes, of the gradient that flowed into its own slice. So if every process computes the mean loss
over its local queries, DDP's gradient *averaging* yields exactly the gradient of one process computing
the mean loss over the concatenated global batch (``tests/test_distributed.py`` checks this to 1e-6).
The paper's code instead re-inserts the local tensor into a non-differentiable gather and has every
process compute the full global loss; after DDP averaging its gradient is 1/world_size of that, which
matters for gradient clipping, not for Adam's direction: the paper's max norm 2.0 with its 8 processes
is 16.0 here (the recipes say so; ``tests/test_configs.py`` checks each one).

Everything that is not a gather for the loss - layer choices, log values, file writes - goes through
the small helpers at the end, so no module calls ``torch.distributed`` directly.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import LeadkdError

__all__ = [
    "DistContext", "init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process",
    "barrier", "gather_with_grad", "gather_padded", "gather_object", "all_gather_object", "all_reduce_mean",
    "all_reduce_max", "peers_answering",
]

T = TypeVar("T")

#: torchrun's variables; WORLD_SIZE alone decides whether we are distributed.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- process group

def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs."""
    return get_rank() == 0


def _collective_device() -> torch.device:
    """Where small helper tensors must live for the current backend (NCCL only moves CUDA memory)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@dataclass(frozen=True)
class DistContext:
    """What a training loop needs to know about its process: who it is and where its tensors go."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        barrier()

    def cleanup(self) -> None:
        """Tear down the process group if :func:`init_distributed` created it (safe to call twice)."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            _control_groups.clear()
            dist.destroy_process_group()


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    if text is None:
        raise LeadkdError(f"WORLD_SIZE is set but {name} is not: launch multi-process runs with torchrun "
                          "(e.g. torchrun --nproc_per_node=2 -m leadkd.cli ...)")
    try:
        return int(text)
    except ValueError:
        raise LeadkdError(f"environment variable {name} must be an integer, got {text!r}") from None


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise LeadkdError(f"device {str(device)!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LeadkdError("device 'cuda' was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked: for single-process
    commands such as encode, search and mine."""
    return _pick_device(device, 0)


def init_distributed(device: str | torch.device | None = None, backend: str | None = None,
                     timeout_s: float | None = None) -> DistContext:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) or describe the single local process.

    ``device`` is ``"auto"``/None (CUDA when available), ``"cpu"`` or ``"cuda"``; each process uses
    ``cuda:LOCAL_RANK``. Without ``WORLD_SIZE`` (or with 1) no process group is created. Calling it
    again inside an existing group returns a context for that group without touching it.
    """
    world_text = os.environ.get("WORLD_SIZE")
    world_size = 1 if world_text is None else _env_int("WORLD_SIZE")
    if world_size < 1:
        raise LeadkdError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return DistContext(device=_pick_device(device, local_rank))

    if not dist.is_available():
        raise LeadkdError("this torch build has no torch.distributed support; run a single process")
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                           device=_pick_device(device, local_rank), backend=dist.get_backend(), owns_group=False)

    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LeadkdError(f"WORLD_SIZE is set but {name} is not: launch multi-process runs with torchrun")
    if not 0 <= rank < world_size:
        raise LeadkdError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    chosen = _pick_device(device, local_rank)
    backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        kwargs["device_id"] = chosen  # binds the communicator to this GPU up front
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen, backend=backend,
                       owns_group=True)


# --------------------------------------------------------------------------- gathers for the loss

_MAX_DIMS = 8


def _all_shapes(tensor: torch.Tensor) -> list[tuple[int, ...]]:
    """Every process's shape of ``tensor`` (one tiny all_gather), so mismatches fail everywhere alike."""
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"cannot gather tensors of more than {_MAX_DIMS} dimensions, got {tensor.dim()}")
    encoded = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=tensor.device)
    encoded[0] = tensor.dim()
    encoded[1:tensor.dim() + 1] = torch.tensor(tensor.shape, dtype=torch.int64)
    slots = [torch.empty_like(encoded) for _ in range(dist.get_world_size())]
    dist.all_gather(slots, encoded)
    return [tuple(row[1:int(row[0]) + 1].tolist()) for row in (slot.cpu() for slot in slots)]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward passes on a contiguous gradient.

    Losses such as ColBERT's MaxSim (einsum + max) produce gradients with permuted strides; sliced per
    rank they reach the all-gather's backward non-contiguous, and gloo's scatter then silently writes
    them in the wrong order (pytorch/pytorch#192920, #24836): wrong gradients, no error. Making the
    gathered tensor's gradient contiguous makes every slice contiguous too.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch >= 2.10 flags it as deprecated in favour of a private, compile-oriented API; it is the
        # public differentiable all-gather, works on gloo and NCCL, and is what we want here.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(tensor.contiguous())
    gathered = torch.cat(parts, dim=0)
    return _ContiguousGrad.apply(gathered) if gathered.requires_grad else gathered


def gather_with_grad(tensor: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order, keeping autograd.

    Process r's rows land at ``[r*n, (r+1)*n)``; gradients flowing into any slice are summed back to the
    process that owns it (see the module docstring for why that makes DDP averaging exact). All
    processes must pass the same shape - use ``drop_last`` batches; ``check_shapes`` verifies it with one
    tiny extra collective and raises the same ValueError on every process (instead of a hang or garbage).
    In a single process the input is returned unchanged.
    """
    if not is_distributed():
        return tensor
    if check_shapes:
        shapes = _all_shapes(tensor)
        if len(set(shapes)) != 1:
            raise ValueError(f"gather_with_grad needs the same shape on every process, got {shapes} "
                             "(by rank); use equal per-process batches (drop_last)")
    return _gather_cat(tensor)


def gather_padded(tensor: torch.Tensor, pad_value: float = 0.0, dim: int = 1) -> torch.Tensor:
    """Like :func:`gather_with_grad`, but ``dim`` may differ per process: each pads to the longest first.

    For ColBERT token states ``[n, T_r, d]`` whose length T_r depends on each process's batch. Gather the
    attention mask with the same call (``pad_value=0``) so padded positions stay masked after the gather
    - the paper's code gathered the states but kept the local mask (spec §7.4-1). Padding goes at the
    end of ``dim``; it carries no gradient. In a single process the input is returned unchanged.
    """
    if not is_distributed():
        return tensor
    dim = dim % tensor.dim()
    if dim == 0:
        raise ValueError("gather_padded pads a dimension other than 0 (the one gathered along)")
    shapes = _all_shapes(tensor)
    others = {shape[:dim] + shape[dim + 1:] for shape in shapes}
    if len(others) != 1 or len({len(shape) for shape in shapes}) != 1:
        raise ValueError(f"gather_padded needs equal shapes except along dim {dim}, got {shapes} (by rank)")
    longest = max(shape[dim] for shape in shapes)
    missing = longest - tensor.shape[dim]
    if missing:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = missing
        tensor = torch.cat([tensor, tensor.new_full(pad_shape, pad_value)], dim=dim)
    return _gather_cat(tensor)


# --------------------------------------------------------------------------- everything else

def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """Every process's picklable ``obj``, in rank order, on rank ``dst`` (None on the others); ``[obj]`` in
    a single process. For small results each process computed on its share (e.g. top-k lists)."""
    if not is_distributed():
        return [obj]
    holder: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, holder, dst=dst)
    return holder


def all_gather_object(obj: T) -> list[T]:
    """Every process's picklable ``obj``, in rank order, on every process; ``[obj]`` in a single process.
    For small per-step metadata the loss needs from all processes (e.g. the candidates' passage ids)."""
    if not is_distributed():
        return [obj]
    holder: list[Any] = [None] * get_world_size()
    dist.all_gather_object(holder, obj)
    return holder


def all_reduce_mean(value: float | torch.Tensor) -> float | torch.Tensor:
    """The mean of ``value`` over processes, detached: for logging, and for statistics every process
    must agree on (e.g. the teacher layers' CE that sets LEAD's layer weights). A float comes back as a
    float, a tensor as a tensor on its own device.
    """
    if isinstance(value, torch.Tensor):
        if not is_distributed():
            return value.detach()
        reduced = value.detach().clone().to(_collective_device())
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return (reduced / get_world_size()).to(value.device)
    if not is_distributed():
        return float(value)
    reduced = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.item() / get_world_size()


_control_groups: dict[str, Any] = {}


def _control_group() -> Any:
    """The group host-side decisions travel on: the default one, or beside NCCL a gloo group of the same
    processes, whose all-reduce of a CPU tensor never waits for the GPU (an NCCL one would queue behind
    the step's kernels and make the host wait for them, every step). Made on first use, which every
    process reaches at the same step."""
    if dist.get_backend() != "nccl":
        return None
    if "gloo" not in _control_groups:
        _control_groups["gloo"] = dist.new_group(backend="gloo")
    return _control_groups["gloo"]


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over processes (one tiny all-reduce, on the host); ``value`` itself in a single
    process. For decisions every process must take at the same step, e.g. stopping on a signal one rank
    received."""
    if not is_distributed():
        return int(value)
    reduced = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=_control_group())
    return int(reduced.numpy()[0])


# --------------------------------------------------------------------------- a process that is gone

#: How gloo, NCCL and the store report a peer that died (connection closed) or hangs (timeout).
_CLOSED = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
           "connection refused", "read error", "write error")
_TIMED_OUT = ("timed out", "timeout", "watchdog")


def peer_failure(exc: BaseException, timeout_s: float | None = None) -> str | None:
    """What a collective's RuntimeError says about another process, in words; None if it is not that."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if any(sign in text for sign in _CLOSED):
        return "its connection closed: it died or was killed"
    if any(sign in text for sign in _TIMED_OUT):
        after = f" after {timeout_s:g} s" if timeout_s is not None else ""
        return f"a collective timed out{after}"
    return None


@contextlib.contextmanager
def peers_answering(timeout_s: float | None = None, then: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn a collective that failed because another process died or hangs into one LeadkdError line.

    A dead peer shows up as a RuntimeError from whatever collective comes next (a gradient all-reduce in
    backward, a barrier, a gather): "Connection closed by peer" when it died, a timeout after the process
    group's ``timeout_s`` (the config's ``ddp_timeout``) when it hangs. ``then`` adds what the user can do
    (e.g. which checkpoint to resume from). Outside a process group nothing is caught.
    """
    try:
        yield
    except RuntimeError as exc:
        if not is_distributed():
            raise
        reason = peer_failure(exc, timeout_s)
        if reason is None:
            raise
        tail = f"; {then()}" if then is not None else ""
        raise LeadkdError(f"a process of this torchrun job stopped answering ({reason}); rank {get_rank()} "
                          f"stops too{tail}") from None
