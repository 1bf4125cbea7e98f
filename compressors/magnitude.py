"""Magnitude pruning: drop the smallest |W| (the data-free baseline of the Wanda and SparseGPT papers).

`magnitude_mask` is the pure kernel; `run_magnitude` the thin pass. Unstructured masks compare the whole
matrix (layer-wise, as the papers' magnitude baseline does); N:M masks compare each group of M input columns.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.engine.layer_sweep import LayerContext
from compress.quant.modules import weight_matrix
from compress.compressors.pruning import apply_mask, prunable
from compress.compressors.sparsity import NM, select_mask
from compress.compressors.configs import MagnitudeConfig  # noqa: F401  (re-exported; defined without torch)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: NM | None = None) -> torch.Tensor:
    """Bool (rows, columns), True where |W| is among the largest 1 - sparsity of the matrix (or n of every m)."""
    return select_mask(weight.detach().float().abs(), sparsity, nm, per="module")


def run_magnitude(layer: LayerContext, cfg: MagnitudeConfig) -> dict[str, Any]:
    """Magnitude pruning: zero the smallest weights of every linear, unstructured or N:M."""
    target, nm = cfg.sparsity_for(layer), cfg.nm
    results = {}
    for fqn, module in prunable(layer, cfg).items():
        keep = magnitude_mask(weight_matrix(module), target, nm)
        results[fqn] = apply_mask(fqn, module, keep, None, target, nm, layer.run)
    return results
