"""Single-process or DistributedDataParallel, decided by the environment torchrun sets.

``torchrun --nproc_per_node=N -m training ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; then
every rank trains on its shard with gloo (CPU) or nccl (CUDA) and only rank 0 evaluates and
writes files, so a distributed run saves each model once.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from surgery.devices import describe, resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init(device: str | None = None) -> Context:
    """Join the process group if launched by torchrun; otherwise a single-process context.

    ``device`` as :func:`surgery.devices.resolve_device` takes it (None: ``$SURGERY_DEVICE``, else auto);
    under torchrun a CUDA run puts each rank on its ``LOCAL_RANK`` GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    target = resolve_device(device)
    if world_size == 1:
        logger.info("device %s", describe(target))
        return Context(device=target)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=target)
    logger.info("rank %d of %d on %s", ctx.rank, ctx.world_size, target)
    return ctx


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DDP-wrap for training; the caller keeps the unwrapped model for evaluation and saving."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # No buffer broadcast: NNCF's bool masks are derived from the (synchronised) weights, so they
    # agree on every rank anyway, and each rank's BN statistics estimate the same data; rank 0's
    # are the ones saved.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


@contextmanager
def main_first(ctx: Context):
    """Run the body on rank 0 first (e.g. a dataset download), then on the other ranks."""
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()
