"""The layer-Hessian machinery that GPTQ and SparseGPT share (Frantar et al. 2022; Frantar & Alistarh 2023).

Both minimise the layer reconstruction error ||W X - W' X||^2, whose Hessian in each weight row is
H = 2 X X^T. This module builds H from calibration inputs, repairs the columns of inputs that never fired,
and gives the upper Cholesky factor of the damped inverse that both kernels walk column by column.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.distributed import all_reduce_mean
from compress.engine import LayerContext
from compress.modules import weight_matrix

# When the damped Hessian is still not positive definite, retry with the dampening multiplied by this factor,
# at most this many times, before the caller degrades (GPTQ falls back to RTN, SparseGPT to magnitude).
DAMPENING_GROWTH = 10.0
DAMPENING_RETRIES = 3


class HessianNotPositiveDefinite(RuntimeError):
    """Cholesky failed even after the dampening retries; the caller decides how to degrade (and records it)."""


class HessianAccumulator:
    """H = 2/n * sum_samples X X^T over calibration inputs, as a running mean in fp32 (no per-sample storage).

    `n` counts sequences, not tokens, exactly like the reference `add_batch`, so `loss` values compare with it.
    """

    def __init__(self, columns: int, device: torch.device):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Fold in one batch of inputs (..., columns); every leading dim but the last token dim counts as samples."""
        batch = inputs.shape[0] if inputs.dim() > 2 else 1
        x = inputs.reshape(-1, inputs.shape[-1]).float()  # (tokens, columns)
        total = self.samples + batch
        # Running mean: H <- H * n/(n+b) + (2/(n+b)) X^T X, one fused matmul.
        self.hessian.addmm_(x.t(), x, beta=self.samples / total, alpha=2.0 / total)
        self.samples = total


def collect_hessians(layer: LayerContext, modules: dict[str, nn.Module]) -> dict[str, HessianAccumulator]:
    """One Hessian per module from every calibration batch.

    Each forward stops once all modules saw their input: q/k/v only need the input norm, not the attention and
    MLP, so re-capturing per group (true_sequential) costs about two layer forwards instead of four.
    """
    hessians = {
        name: HessianAccumulator(weight_matrix(m).shape[1], weight_matrix(m).device) for name, m in modules.items()
    }
    layer.observe(modules, lambda name, inputs: hessians[name].add(inputs), stop_early=True)
    for accumulator in hessians.values():  # data-parallel calibration: sum the ranks' shares (no-op alone)
        accumulator.hessian, accumulator.samples = all_reduce_mean(accumulator.hessian, accumulator.samples)
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
    """
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
