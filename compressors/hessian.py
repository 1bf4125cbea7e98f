"""The layer-Hessian machinery that GPTQ and SparseGPT share (Frantar et al. 2022; Frantar & Alistarh 2023).

Both minimise the layer reconstruction error ||W X - W' X||^2, whose Hessian in each weight row is
H = 2 X X^T. This module builds H from calibration inputs, repairs the columns of inputs that never fired,
and gives the upper Cholesky factor of the damped inverse that both kernels walk column by column.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.engine.distributed import all_reduce_sum
from compress.engine.layer_sweep import LayerContext
from compress.engine.threads import single_threaded
from compress.quant.modules import weight_matrix
from compress.compressors.configs import HessianOptions  # noqa: F401  (re-exported; defined without torch)

# When the damped Hessian is still not positive definite, retry with the dampening multiplied by this factor,
# at most this many times, before the caller degrades (GPTQ falls back to RTN, SparseGPT to magnitude).
DAMPENING_GROWTH = 10.0
DAMPENING_RETRIES = 3


class HessianNotPositiveDefinite(RuntimeError):
    """Cholesky failed even after the dampening retries; the caller decides how to degrade (and records it)."""


class HessianAccumulator:
    """H = 2/n * sum_samples X X^T over calibration inputs, with no per-sample storage.

    `n` counts sequences, not tokens, exactly like the reference `add_batch`, so `loss` values compare with it.

    The sum is kept in float64 by default. Each *window's* X^T X is a float32 matmul over that window's tokens
    (never over a whole batch: the grouping of tokens would change the float32 rounding, so halving the batches
    after an out-of-memory error, or another `calibration.batch_size`, would change the codes), and float64 adds
    those float32 terms exactly in practice (53 bits hold a few float32 terms of similar size without rounding),
    so the sum, and the float32 H read from it, depend neither on the batching nor on the order the batches
    arrive in. Data-parallel
    calibration (compress/engine/distributed.py) relies on this: ranks that each sum a share of the batches then add
    their sums reproduce the single-process Hessian bit for bit, so GPTQ gives the very same codes.
    `dtype=torch.float32` halves the accumulator's memory (d^2 x 4 bytes instead of 8) at the cost of that.
    """

    def __init__(self, columns: int, device: torch.device, dtype: torch.dtype = torch.float64):
        self.total: torch.Tensor | None = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.samples = 0
        self._hessian: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor) -> None:
        """Fold in one batch of inputs (..., columns); every leading dim but the last token dim counts as samples."""
        if self.total is None:
            raise RuntimeError("this Hessian was already read; accumulate into a new HessianAccumulator")
        windows = inputs.reshape(-1, *inputs.shape[-2:]) if inputs.dim() > 2 else inputs.unsqueeze(0)
        if self.total.dtype == torch.float32:
            for window in windows:
                x = window.float()
                self.total.addmm_(x.t(), x)
        else:
            product = torch.empty(self.total.shape, dtype=torch.float32, device=self.total.device)
            scratch = wide_scratch(self.total)
            for window in windows:  # (tokens, columns): one product per window, whatever the batching
                x = window.float()
                torch.mm(x.t(), x, out=product)  # float32 product, float64 sum (see the class docstring)
                add_exactly(self.total, product, scratch)
        self.samples += inputs.shape[0] if inputs.dim() > 2 else 1

    @property
    def hessian(self) -> torch.Tensor:
        """The float32 Hessian 2/n * sum X X^T (zeros when no sample arrived). Reading it frees the float64 sum."""
        if self._hessian is None:
            assert self.total is not None
            scale = 2.0 / self.samples if self.samples else 0.0
            self._hessian = (self.total * scale).to(torch.float32)
            self.total = None
        return self._hessian


# float64 elements `add_exactly` converts at a time on a CPU: 4 MiB, which stays in cache between the conversion and
# the add.
WIDE_CHUNK = 1 << 19


def wide_scratch(total: torch.Tensor) -> torch.Tensor | None:
    """The float64 rows `add_exactly` converts through on a CPU (None elsewhere: the add itself is fast there)."""
    if total.device.type != "cpu":
        return None
    rows = max(1, WIDE_CHUNK // max(1, total.shape[1]))
    return torch.empty(min(rows, total.shape[0]), total.shape[1], dtype=torch.float64)


def add_exactly(total: torch.Tensor, product: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """total (float64) += product (float32), the same bits as `total.add_(product)`: every float32 converts to
    float64 exactly, so converting first changes nothing. On a CPU, adding a float32 tensor into a float64 one
    converts element by element inside the add, 3.6x slower than converting a cache-sized slice (`scratch`, from
    `wide_scratch`) with a vectorised copy and adding float64 to float64 (measured at 2816 x 2816: 18.7 ms against
    5.1 ms)."""
    if scratch is None:
        total.add_(product)
        return
    rows = scratch.shape[0]
    for start in range(0, product.shape[0], rows):
        stop = min(start + rows, product.shape[0])
        part = scratch[:stop - start]
        part.copy_(product[start:stop])
        total[start:stop].add_(part)


def collect_hessians(
    layer: LayerContext, modules: dict[str, nn.Module], dtype: torch.dtype = torch.float64
) -> dict[str, HessianAccumulator]:
    """One Hessian per module from every calibration batch.

    Each forward stops once all modules saw their input: q/k/v only need the input norm, not the attention and
    MLP, so re-capturing per group (true_sequential) costs about two layer forwards instead of four.
    """
    hessians = {
        name: HessianAccumulator(weight_matrix(m).shape[1], weight_matrix(m).device, dtype)
        for name, m in modules.items()
    }
    with layer.timed("statistics"):  # the layer forwards and the accumulation: report.json seconds_by_part
        layer.observe(modules, lambda name, inputs: hessians[name].add(inputs), stop_early=True)
        for accumulator in hessians.values():  # data-parallel calibration: add the ranks' sums (no-op alone)
            assert accumulator.total is not None
            accumulator.samples = all_reduce_sum(accumulator.total, accumulator.samples)
    return hessians


def mark_dead_columns(W: torch.Tensor, H: torch.Tensor) -> int:
    """Inputs that were always zero leave H singular; the reference sets H_ii = 1 and drops those weights.

    Modifies both in place; returns how many columns were dead.
    """
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return int(dead.sum())


def inverse_hessian_factor(H: torch.Tensor, dampening_frac: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising the dampening until it factorizes.

    Returns the factor and the dampening fraction that worked; raises HessianNotPositiveDefinite.
    Single-threaded: MKL's Cholesky rounds differently with each thread count, and every code depends on this
    factor (compress/engine/threads.py). The cost is the one-thread factorization: 2 ms at 256 columns, 22 ms at
    768, 2.5 s at 4096 on a 2-core machine at load 1.3 (bench/threads.py); CUDA tensors are not affected.
    """
    with single_threaded():
        return _damped_inverse_factor(H, dampening_frac)


def _damped_inverse_factor(H: torch.Tensor, dampening_frac: float) -> tuple[torch.Tensor, float]:
    mean_diag = torch.diag(H).mean()
    frac = dampening_frac
    for _attempt in range(DAMPENING_RETRIES + 1):
        damped = H.clone()
        damped.diagonal().add_(frac * mean_diag)
        # see GPTQ Sec. 4 "Cholesky reformulation"; Frantar et al. 2022
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(Hinv.diagonal()).all():  # NaN inputs factorize 'fine'
                return Hinv, frac
        frac *= DAMPENING_GROWTH
    raise HessianNotPositiveDefinite(
        f"Hessian not positive definite even with dampening {frac / DAMPENING_GROWTH:g} x mean diagonal"
    )
