"""Results that do not depend on the torch thread count: the few CPU kernels whose rounding does, run on one thread.

Measured on the demo GPTQ recipe (MKL, 1 vs 2 threads, 16 calibration windows): the Hessians of layer 0's q/k/v
were identical, but the upper Cholesky factor of their damped inverse differed by up to 4e-8, because MKL's LAPACK
factorizations (potrf, potri) split their blocked updates over the threads and the split changes the float rounding.
The group scales GPTQ computes from the error-updated weights then differed in their last bits, so did o_proj's
inputs and Hessian, and the differences grew layer by layer: up to 18% of a last-layer module's 4-bit codes flipped
(perplexity 6.780 vs 6.793 on 16 windows). The other kernels the passes use gave equal bits at 1 to 16 threads
(MKL_DYNAMIC=FALSE) up to 4096 wide (bench/threads.py): matmuls (MKL splits the output over threads, not the summed
dimension), elementwise ops, and reductions with more than one output (torch splits only the kept dimensions over
threads). A full reduction to one number of more than 32,768 elements does not: torch sums one partial per thread.

So the factorization and the full sums that reach a result or a report (losses, errors, sensitivities) run
single-threaded; everything else keeps every thread. On CUDA tensors the CPU thread count changes nothing.
Not covered yet: the Hessian-vector products behind the allocator's trace estimates (autograd's double backward
through the model) still differ from about the 8th significant digit between 1 and 2 threads on the demo model.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from compress.engine.distributed import world_size


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with `count` torch intra-op threads, then restore the caller's count (also on an exception)."""
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded() -> contextlib.AbstractContextManager[None]:
    """One torch thread for the body: the kernels whose rounding depends on the thread count (see above)."""
    return torch_threads(1)


def thread_independent_sum(values: torch.Tensor) -> float:
    """`float(values.sum())` with the same bits at any thread count (a one-thread sum: one fixed order)."""
    with single_threaded():
        return float(values.sum())


def parallelism() -> dict[str, int]:
    """report.json's `parallelism`: how this run was spread, which the weights do not depend on (see above)."""
    return {
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "world_size": world_size(),
    }
