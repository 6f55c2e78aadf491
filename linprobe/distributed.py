"""Running across processes with torch.distributed: ranks, shards of the data, and the few collectives we need.

Everything here is a no-op in a single process (no process group, or a world of one), so the rest of
linprobe calls these helpers unconditionally. Launch with ``torchrun --nproc_per_node=N``; ``probe``
then joins the job itself (:func:`init_from_env`), or uses the process group the caller already made.
Every rank must make the same calls in the same order: a rank that fails leaves the others waiting
until torchrun (or the process group's timeout) ends the job.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")
_alone = False  # inside ``local()``: this process works on its own share, as a job of one


def active() -> bool:
    """True inside a process group of more than one process (and not inside ``local()``)."""
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local() -> Iterator[None]:
    """Within this block the process acts as rank 0 of a job of one, though it belongs to a larger job: for work
    split by whole items (a sweep's checkpoints), where each process probes its items with no collectives."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def init_from_env() -> bool:
    """Join the job torchrun describes in the environment (``WORLD_SIZE`` > 1) unless a process group exists.

    CPU tensors go through gloo and CUDA tensors through NCCL (``cpu:gloo,cuda:nccl``); on a GPU machine
    each process takes the GPU ``LOCAL_RANK``. Returns whether the process is now part of a larger job.
    """
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return active()


def shard_range(n: int, rank: int, world: int, block: int = 1) -> range:
    """Rank ``rank``'s contiguous rows of ``n``: whole blocks of ``block`` rows, the first ranks taking one
    block more when the blocks do not divide evenly. The ranges of all ranks cover 0..n-1 exactly once."""
    if not 0 <= rank < world or block < 1:
        raise ValueError(f"need 0 <= rank < world and block >= 1, got rank={rank}, world={world}, block={block}")
    per, extra = divmod(-(-n // block), world)
    start = rank * per + min(rank, extra)
    stop = start + per + (rank < extra)
    return range(min(start * block, n), min(stop * block, n))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (whose forward would run collectives), else the model."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over ranks, in place (``t`` itself without a process group)."""
    if active():
        dist.all_reduce(t)
    return t


def total(n: int, device: torch.device | str = "cpu") -> int:
    """The sum of an integer (e.g. a row count) over ranks."""
    return int(all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=device)).item())


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` (any number per rank), concatenated in rank order."""
    if not active():
        return t
    counts = [int(c) for c in all_gather_object(len(t))]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def sum_(tensors: Iterable[torch.Tensor], scale: float = 1.0) -> None:
    """Replace each float tensor by its sum over ranks (times ``scale``), packed into one all-reduce."""
    tensors = list(tensors)
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat *= scale
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def average_replicas_(module: nn.Module) -> None:
    """Average the gradients and float buffers (e.g. running statistics) of a module's copies on every rank, as
    DDP does before the optimiser step, so that copies that start equal stay equal."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    sum_([*grads, *(b for b in module.buffers() if b.is_floating_point())], 1.0 / world_size())


@torch.no_grad()
def global_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``top1_error``, ``cross_entropy``, ``top5_error`` (more than five classes) and ``balanced_error`` over the
    rows of every rank, from summed counts: the same numbers as the single-process metrics on all the rows."""
    classes = logits.shape[1]
    hit = logits.topk(min(5, classes), dim=1).indices == y[:, None]
    wrong = ~hit[:, 0]
    head = [len(y), wrong.sum().item(), (~hit.any(1)).sum().item(),
            F.cross_entropy(logits.float(), y, reduction="sum").item()]
    sums = torch.cat([torch.tensor(head, dtype=torch.float64, device=y.device),
                      torch.bincount(y, weights=wrong.double(), minlength=classes),
                      torch.bincount(y, minlength=classes).double()])
    n, top1, top5, ce = all_reduce_sum(sums)[:4].tolist()
    per_wrong, per_count = sums[4:4 + classes], sums[4 + classes:]
    out = {"top1_error": top1 / n, "cross_entropy": ce / n}
    if classes > 5:
        out["top5_error"] = top5 / n
    out["balanced_error"] = (per_wrong / per_count.clamp_min(1))[per_count > 0].mean().item()
    return out


def assign(costs: Sequence[float], world: int) -> list[int]:
    """The rank that takes each job: longest first, each to the least loaded rank (ties to the lower rank)."""
    load, owner = [0.0] * world, [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: -costs[j]):
        owner[job] = min(range(world), key=lambda r: load[r])
        load[owner[job]] += costs[job]
    return owner
