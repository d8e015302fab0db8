"""torch.distributed helpers for training under torchrun (DESIGN.md, Distribution).

``torchrun --nproc-per-node N -m vlcache train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and starts the process group
(NCCL when training on CUDA, gloo on CPU). Without those variables everything degrades to a single
process: rank 0 of 1, no process group, :func:`wrap_model` returns the model itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "resolve_device", "rank", "world_size", "is_main", "barrier",
           "wrap_model", "unwrap", "broadcast_object", "all_reduce_mean", "all_gather_cat", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: the local rank's GPU when CUDA is available, else CPU. ``"cuda"`` picks the local rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def init_distributed(device: torch.device | str = "cpu") -> DistInfo:
    """Start the process group from torchrun's environment (idempotent); single-process without it.

    Backend: NCCL for a CUDA device, gloo otherwise. Sets the current CUDA device to the local rank's.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank_ = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"invalid torchrun environment: RANK={rank_}, WORLD_SIZE={world}")
    if world == 1:
        return DistInfo(0, 1, local, None)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank_, world_size=world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes run files."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def wrap_model(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when the process group is up; the model itself otherwise.

    ``find_unused_parameters``: set it when some parameters get no gradient in a step (DDP otherwise
    fails at the next step with "Expected to have finished reduction in the prior iteration"); it costs
    a walk of the autograd graph per step, so only models that need it ask for it.
    """
    if not _active() or dist.get_world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for decoding, state dicts)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (a no-op in a single process)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; unchanged in a single process)."""
    out = value.detach().clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, the same on every rank (detached:
    no gradient flows back to other ranks); ``tensor.detach()`` itself in a single process.

    Ranks may hold different numbers of rows (a smaller last batch): ``dist.all_gather`` needs equal
    shapes, so the row counts are gathered first and every part padded to the largest, then trimmed.
    The number of dimensions and the sizes beyond dim 0 must agree across ranks. Every rank must call
    it (a collective).
    """
    t = tensor.detach()
    if t.dim() == 0:
        raise ValueError("all_gather_cat needs a tensor with a row dimension, got a 0-d tensor")
    if not _active() or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    shape = torch.tensor(t.shape, dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(s[1:].tolist() != list(t.shape[1:]) for s in shapes):
        raise ValueError("all_gather_cat: ranks disagree beyond dim 0: shapes "
                         f"{[tuple(s.tolist()) for s in shapes]}")
    rows = [int(s[0]) for s in shapes]
    most = max(rows)
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])])
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, rows)])


def cleanup() -> None:
    if _active():
        dist.destroy_process_group()
