"""Data parallelism on ``torch.distributed``: the few collective steps probe training, evaluation
and head scoring need.

Launch any script or the CLI under ``torchrun --nproc-per-node N``: :func:`init_from_env` joins
the process group torchrun describes (NCCL on CUDA, gloo on CPU). Each rank then renders or reads
its own shard of every batch (:func:`shard_range`), computes on it, and the ranks average their
gradients (:func:`all_reduce_mean`) or gather their results. Without a process group every
function is the identity of one process, so the same code runs alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a lone process): the one that writes files."""
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR`` …); NCCL for CUDA devices, gloo otherwise. Returns whether one was joined.
    A no-op without ``WORLD_SIZE`` or when already initialised."""
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def local_device(device: str | torch.device) -> torch.device:
    """``cuda`` → this rank's GPU (``LOCAL_RANK``); other devices unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_range(n: int) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` items (the first ranks take one more
    when ``n`` does not divide)."""
    W, r = world_size(), rank()
    base, extra = divmod(n, W)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` over the ranks in place, with one collective over a flat buffer."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over the ranks in place (one collective)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()
