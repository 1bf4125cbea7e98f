"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695):
score each weight by |W_ij| * ||X_j||_2, its magnitude times the L2 norm of its input feature over the
calibration tokens, and drop the lowest scores of each output row. No weight update.

`wanda_mask` is the pure kernel; `run_wanda` the thin pass that gathers the input norms in the layer engine.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.engine.layer_sweep import LayerContext
from compress.quant.modules import weight_matrix
from compress.compressors.pruning import apply_mask, prunable, input_sq_norms
from compress.compressors.sparsity import NM, select_mask
from compress.compressors.configs import WandaConfig  # noqa: F401  (re-exported; defined without torch)


def wanda_score(weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2, (rows, columns); `act_sq_norm` is ||X_j||^2 per input column, (columns,)."""
    return weight.detach().float().abs() * act_sq_norm.float().sqrt().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float, nm: NM | None = None) -> torch.Tensor:
    """Bool (rows, columns), True where kept: per output row (Wanda's comparison group), or n of every m columns."""
    return select_mask(wanda_score(weight, act_sq_norm), sparsity, nm, per="row")


def run_wanda(layer: LayerContext, cfg: WandaConfig) -> dict[str, Any]:
    """Wanda: prune by |weight| x input-activation norm per output row (Sun et al. 2023)."""
    modules = prunable(layer, cfg)
    norms = input_sq_norms(layer, modules)
    target, nm = cfg.sparsity_for(layer), cfg.nm
    results = {}
    for fqn, module in modules.items():
        keep = wanda_mask(weight_matrix(module), norms[fqn], target, nm)
        results[fqn] = apply_mask(fqn, module, keep, None, target, nm, layer.run)
    return results
