"""Data-parallel calibration: each process (GPU) sees a share of the calibration windows; Hessians are summed.

GPTQ's Hessian is a mean over samples, H = 2/n sum_i x_i x_i^T, so it splits exactly across processes: rank r
sums x_i x_i^T over its n_r windows (in float64, compressors/hessian.py), the ranks add their sums and counts,
and each divides. Every rank then runs the very same (deterministic) solve on the very same H, so all ranks
hold identical quantized weights and can propagate their own windows to the next layer without any further
communication.

Each rank gets a contiguous share of the windows (rank 0 the first ones), cut so that shares are whole
calibration batches where possible: a rank then forms exactly the batches one process would, and the per-batch
products, their float64 sum and hence the Hessian and the codes equal a single process's bit for bit.

Launch one process per device with torchrun (NCCL on GPUs, gloo on CPU):

    torchrun --nproc-per-node 2 -m cli.main run recipe.yaml --output out/dp

`compress run` then initialises the process group from torchrun's environment, gives each rank every
world_size-th calibration window, and only rank 0 writes the run folder. Nothing changes when
torch.distributed is not initialised: a single process is world size 1.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist

from compress.recipe.errors import UserError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether this is a distributed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shard_windows(windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """This rank's calibration windows: a contiguous share, in whole batches of `batch_size` where possible.

    All windows when alone. Batches are dealt out as evenly as possible (the first ranks get one more when they
    do not divide), so every rank's batches are the ones a single process would form.
    """
    if not is_distributed():
        return windows
    world, me = dist.get_world_size(), dist.get_rank()
    batches = torch.arange(windows.shape[0]).split(batch_size)
    if len(batches) < world:
        raise UserError(
            f"{windows.shape[0]} calibration windows in batches of {batch_size} cannot feed {world} processes; "
            f"use more samples or a smaller calibration.batch_size"
        )
    mine = torch.tensor_split(torch.arange(len(batches)), world)[me]
    return windows[torch.cat([batches[i] for i in mine.tolist()])]


def all_reduce_sum(total: torch.Tensor, samples: int) -> int:
    """Add every rank's `total` into each rank's (in place) and return the summed sample count.

    The wire carries float64 (gloo and NCCL reduce in the tensor's dtype): a float64 sum is left as it is, and a
    float32 one is widened for the reduction so the ranks' partial sums add without further rounding.
    """
    if not is_distributed():
        return samples
    wide = total if total.dtype == torch.float64 else total.to(torch.float64)
    count = torch.tensor([float(samples)], dtype=torch.float64, device=total.device)
    dist.all_reduce(wide)
    dist.all_reduce(count)
    if wide is not total:
        total.copy_(wide)
    return int(count.item())


def sum_over_ranks(count: int) -> int:
    """An integer summed over the ranks (itself when alone): token counts for the report."""
    if not is_distributed():
        return count
    return all_reduce_sum(torch.zeros(0, dtype=torch.float64), count)


def from_rank_zero(value: T) -> T:
    """Rank 0's `value` on every rank (itself when alone).

    For decisions each rank makes from its own data that must nonetheless agree because the ranks' collective
    calls follow from them: which sublayers share an input is found on a probe batch, and an MoE rank whose
    probe reached different experts would otherwise call a different sequence of all-reduces and hang.
    """
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
