"""Data-parallel calibration: each process (GPU) sees a share of the calibration windows; Hessians are summed.

GPTQ's Hessian is a mean over samples, H = 2/n sum_i x_i x_i^T, so it splits exactly across processes: rank r
accumulates H_r over its n_r windows, and the full Hessian is sum_r n_r H_r / sum_r n_r. Every rank then runs
the very same (deterministic) solve on the very same H, so all ranks hold identical quantized weights and can
propagate their own windows to the next layer without any further communication.

Launch one process per device with torchrun (NCCL on GPUs, gloo on CPU):

    torchrun --nproc-per-node 2 -m cli.main run recipe.yaml --output out/dp

`compress run` then initialises the process group from torchrun's environment, gives each rank every
world_size-th calibration window, and only rank 0 writes the run folder. Nothing changes when
torch.distributed is not initialised: a single process is world size 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def shard_windows(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: every world_size-th one, starting at its rank (all windows when alone)."""
    if not is_distributed():
        return windows
    share = windows[dist.get_rank() :: dist.get_world_size()]
    if share.shape[0] == 0:
        raise ValueError(f"{windows.shape[0]} calibration windows cannot feed {dist.get_world_size()} processes")
    return share


def all_reduce_mean(matrix: torch.Tensor, samples: int) -> tuple[torch.Tensor, int]:
    """Combine per-rank means over `samples` each into the mean over all samples (in place); returns it and the total.

    Sums n_r * H_r and n_r in float64 on the wire (gloo and NCCL both reduce in the tensor's dtype), so the result
    matches a single process to float32 rounding however the samples were split.
    """
    if not is_distributed():
        return matrix, samples
    weighted = matrix.to(torch.float64) * samples
    count = torch.tensor([float(samples)], dtype=torch.float64, device=matrix.device)
    dist.all_reduce(weighted)
    dist.all_reduce(count)
    total = int(count.item())
    matrix.copy_(weighted / max(total, 1))
    return matrix, total
