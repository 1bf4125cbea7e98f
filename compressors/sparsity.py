"""Pure mask helpers shared by the pruning passes (magnitude, wanda, sparsegpt): no models, no hooks.

A mask is a bool tensor shaped like the weight (out_features, in_features), True where a weight is kept, the
convention of `RunContext.masks`. Every function takes a *score* (higher = more important) and decides which
entries survive; the algorithms differ only in the score they pass in.

- `topk_mask(score, sparsity, per="row")`: prune the round(sparsity * in_features) lowest scores of each row
  (Wanda's comparison group); `per="module"`: the round(sparsity * numel) lowest of the whole matrix (magnitude).
- `nm_mask(score, NM(2, 4))`: keep the 2 highest scores in every group of 4 consecutive input columns.
- `owl_sparsities(outlier_shares, target, spread)`: OWL's non-uniform per-layer ratios, mean held at the target.
"""

from __future__ import annotations

from typing import Literal

import torch

from compress.compressors.configs import NM, parse_pattern  # noqa: F401  (re-exported; defined without torch)


def pruned_count(size: int, sparsity: float) -> int:
    """How many of `size` weights a sparsity prunes: the nearest whole number (0.5 of 7 columns prunes 4)."""
    return min(size, max(0, int(round(sparsity * size))))


def topk_mask(score: torch.Tensor, sparsity: float, per: Literal["row", "module"] = "row") -> torch.Tensor:
    """Keep all but the lowest-scoring `sparsity` share of each row (or of the whole matrix). Ties: lower index pruned."""
    if per == "module":
        flat = score.flatten()
        prune = pruned_count(flat.numel(), sparsity)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, prune, largest=False, sorted=False).indices] = False
        return keep.view_as(score)
    prune = pruned_count(score.shape[1], sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, torch.topk(score, prune, dim=1, largest=False, sorted=False).indices, False)
    return keep


def nm_mask(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep the `n` highest scores of every group of `m` consecutive input columns, row by row."""
    rows, columns = score.shape
    if columns % nm.m:
        raise ValueError(f"{nm} sparsity needs the input width to be a multiple of {nm.m}, got {columns}")
    groups = score.reshape(rows, columns // nm.m, nm.m)  # (rows, groups, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, nm.n, dim=2).indices, True)
    return keep.reshape(rows, columns)


def select_mask(score: torch.Tensor, sparsity: float, nm: NM | None, per: Literal["row", "module"] = "row") -> torch.Tensor:
    """The mask for a pass's `pattern`: N:M when given, else unstructured top-k at `sparsity`."""
    return nm_mask(score, nm) if nm is not None else topk_mask(score, sparsity, per)


def is_nm(mask: torch.Tensor, nm: NM) -> bool:
    """Whether every group of `m` consecutive input columns keeps at most `n` weights."""
    rows, columns = mask.shape
    if columns % nm.m:
        return False
    return bool((mask.reshape(rows, columns // nm.m, nm.m).sum(dim=2) <= nm.n).all())


def owl_sparsities(outlier_shares: list[float], target: float, spread: float) -> list[float]:
    """OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"): layers with more outliers keep more weights.

    The outlier shares are rescaled to [0, 2*spread] (OWL's lambda), centred on the target density, and turned
    back into sparsities, so their mean equals `target` exactly and no two layers differ by more than 2*spread.
    """
    shares = torch.tensor(outlier_shares, dtype=torch.float64)
    span = shares.max() - shares.min()
    if len(outlier_shares) < 2 or span == 0:
        return [target] * len(outlier_shares)
    density = (shares - shares.min()) / span * 2 * spread
    density = density - density.mean() + (1 - target)
    return [float(1 - d) for d in density.clamp(0.0, 1.0)]


def outlier_share(score: torch.Tensor, threshold: float) -> float:
    """Share of scores above `threshold` x their mean: OWL's layerwise outlier distribution (its M is 5 to 10)."""
    return float((score > threshold * score.mean()).float().mean())


def measured_sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())
