"""Observers: the clip |x| a calibrated (static) scale maps onto its format's largest value, from calibration inputs.

Every observer sees the calibration inputs one batch at a time, as `(groups, n)` float tensors (one group for a
per-tensor scale, one per head for a per-head KV-cache scale), so its memory is one batch plus a fixed-size
summary (a max, a histogram, an error per candidate), never the whole calibration set. Some need two passes over
the inputs (the max first); `passes` says how many, and `observe(x, pass_index)` is called for each batch of each.
See `ObserverOptions` (compress/quant/config.py) for what each one chooses and when to prefer it.
"""

from __future__ import annotations

from typing import Callable

import torch

from compress.quant.config import ObserverOptions

HISTOGRAM_BINS = 2048
# llm-compressor's MSE observer grid (maxshrink 0.2, grid 100): clips of 1.00, 0.99, ..., 0.81 times the max
MSE_SHRINK = tuple(1 - step / 100 for step in range(20))

QuantizeAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Fake-quantizes `x` (groups, n) with clips (groups, 1): what a candidate clip would do to the inputs."""


class MinMax:
    """The largest |x| per group."""

    passes = 1

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, pass_index: int = 0) -> None:
        batch_max = x.detach().abs().amax(dim=-1).float()
        self.amax = batch_max if self.amax is None else torch.maximum(self.amax, batch_max)

    def clip(self) -> torch.Tensor:
        if self.amax is None:
            raise RuntimeError("the observer saw no calibration input")
        return self.amax


class Percentile(MinMax):
    """The `percentile`-th percentile of |x| per group, from a histogram up to the max (exact to a bin width)."""

    passes = 2

    def __init__(self, percentile: float, bins: int = HISTOGRAM_BINS):
        super().__init__()
        self.percentile = percentile
        self.bins = bins
        self.counts: torch.Tensor | None = None  # (groups, bins)

    def observe(self, x: torch.Tensor, pass_index: int = 0) -> None:
        if pass_index == 0:
            super().observe(x)
            return
        amax = super().clip().to(x.device)
        bin_of = (x.detach().abs().float() / amax.clamp(min=1e-30)[:, None] * self.bins).long().clamp(max=self.bins - 1)
        counts = torch.zeros(x.shape[0], self.bins, dtype=torch.float64, device=x.device)
        counts.scatter_add_(1, bin_of, torch.ones_like(bin_of, dtype=torch.float64))
        self.counts = counts if self.counts is None else self.counts + counts

    def clip(self) -> torch.Tensor:
        amax = super().clip()
        if self.counts is None:
            raise RuntimeError("the percentile observer needs its second pass")
        return percentile_of_histogram(self.counts.to(amax.device), amax, self.percentile)


def percentile_of_histogram(counts: torch.Tensor, amax: torch.Tensor, percentile: float) -> torch.Tensor:
    """The upper edge of the bin (of `counts` (groups, bins) over [0, amax]) where the percentile falls: at or
    above the true percentile by less than one bin, amax / bins."""
    cumulative = counts.cumsum(dim=-1)
    target = cumulative[:, -1:] * (percentile / 100)
    index = torch.searchsorted(cumulative, target).squeeze(-1).clamp(max=counts.shape[-1] - 1)  # first bin reaching it
    return (index + 1).to(amax.dtype) * amax / counts.shape[-1]


class MeanSquaredError(MinMax):
    """Of the clips `MSE_SHRINK` x max, the one whose fake-quantization of the inputs has the least squared error."""

    passes = 2

    def __init__(self, quantize_at: QuantizeAt):
        super().__init__()
        self.quantize_at = quantize_at
        self.errors: torch.Tensor | None = None  # (groups, candidates), float64 sums over every batch

    def candidates(self) -> torch.Tensor:
        """Candidate clips (groups, candidates)."""
        amax = super().clip()
        return amax[:, None] * torch.tensor(MSE_SHRINK, dtype=amax.dtype, device=amax.device)

    def observe(self, x: torch.Tensor, pass_index: int = 0) -> None:
        if pass_index == 0:
            super().observe(x)
            return
        x = x.detach().float()
        candidates = self.candidates().to(x.device)
        errors = torch.stack([((self.quantize_at(x, candidates[:, [c]]) - x) ** 2).sum(dim=-1, dtype=torch.float64)
                              for c in range(candidates.shape[1])], dim=-1)
        self.errors = errors if self.errors is None else self.errors + errors

    def clip(self) -> torch.Tensor:
        if self.errors is None:
            raise RuntimeError("the MSE observer needs its second pass")
        candidates = self.candidates()
        best = self.errors.to(candidates.device).argmin(dim=-1, keepdim=True)  # ties: the larger clip (listed first)
        return candidates.gather(1, best).squeeze(1)


Observer = MinMax | Percentile | MeanSquaredError


def make_observer(options: ObserverOptions, quantize_at: QuantizeAt) -> Observer:
    """The observer `options` names; `quantize_at` is what the MSE observer measures candidate clips with."""
    if options.observer == "percentile":
        return Percentile(options.percentile)
    if options.observer == "mse":
        return MeanSquaredError(quantize_at)
    return MinMax()
