"""Data-parallel students: one large student trained on N processes (``torchrun``).

Every rank draws the protocol's views of a batch exactly as one process does (the views
depend on the seed, the epoch and the batch alone) and trains on its contiguous part of
the batch; DistributedDataParallel averages the gradients over ranks. Each rank's loss is
scaled by ``N * (its images) / (batch images)``, so the averaged gradient is the gradient of
the whole batch's mean loss even when the batch does not split evenly. What differs from
one process: the order in which floats are summed, and BatchNorm, whose statistics are
each rank's part of the batch unless ``sync_bn`` (``nn.SyncBatchNorm``, CUDA only)
computes them over the whole batch. ``tests/test_ddp.py`` holds 2 gloo ranks against one
process: a student without BatchNorm ends within 1e-4 (relative) of it, weight by weight.

Launch the evaluate stage with ``torchrun --nproc_per_node N -m pipelines.evaluate ...``:
rank 0 logs to MLflow and writes the outputs, every rank trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ranks."""

    rank: int  # 0 .. world - 1
    world: int  # number of ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous part of a batch of ``n`` (sizes differ by at most one)."""
        if n < self.world:
            raise ValueError(
                f"a batch of {n} images cannot be split over {self.world} ranks: use fewer "
                "ranks or a larger protocol batch_size"
            )
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def scale(self, n: int) -> float:
        """Loss scale of this rank's part: DDP's average over ranks then equals the mean over
        the whole batch."""
        part = self.part(n)
        return self.world * (part.stop - part.start) / n


def ranks_from_env() -> Ranks | None:
    """The ranks ``torchrun`` set up (``RANK`` / ``WORLD_SIZE``), or None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(rank=int(os.environ["RANK"]), world=world)


def init_ranks(ranks: Ranks | None, device: torch.device) -> None:
    """Joins the process group (NCCL on CUDA, gloo on CPU) once."""
    if ranks is None or dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def data_parallel(
    model: nn.Module, ranks: Ranks, device: torch.device, *, sync_bn: bool
) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (optionally with SyncBatchNorm)."""
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA devices (nn.SyncBatchNorm has no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index or 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
