"""Pieces every weight-pruning pass shares (magnitude, wanda, sparsegpt): its config, per-layer sparsity, mask
bookkeeping and the per-module report entry. The algorithms themselves live in their own modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.distributed import all_reduce_sum
from compress.engine.layer_sweep import LayerContext
from compress.engine.threads import single_threaded
from compress.recipe.errors import UserError
from compress.quant.modules import set_weight_matrix, weight_matrix
from compress.compressors.sparsity import NM, is_nm, measured_sparsity
from compress.compressors.configs import PruneConfig  # noqa: F401  (re-exported; defined without torch)


def prunable(layer: LayerContext, cfg: PruneConfig) -> dict[str, nn.Module]:
    """The layer's linears minus `ignore`; a user error if an N:M pattern does not tile one's input width."""
    modules = layer.linears(cfg.ignore)
    nm = cfg.nm
    for fqn, module in modules.items():
        columns = weight_matrix(module).shape[1]
        if nm is not None and columns % nm.m:
            raise UserError(f"{fqn} has {columns} input features, not a multiple of {nm.m}, so it cannot be "
                            f"pruned {nm}: add it to `ignore`")
    return modules


def apply_mask(fqn: str, module: nn.Module, keep: torch.Tensor, new_weight: torch.Tensor | None,
               target: float, nm: NM | None, run: RunContext) -> dict[str, Any]:
    """Zero the pruned weights (or write a reconstructed `new_weight`), record the mask, return the report entry.

    The mask is AND-ed with one an earlier pruning pass left, so weights pruned once stay pruned.
    """
    previous = run.handoff.masks.get(fqn)
    keep = keep.cpu() if previous is None else keep.cpu() & previous
    original = weight_matrix(module).float().clone()
    source = original if new_weight is None else new_weight.float()
    pruned = source * keep.to(source.device)
    set_weight_matrix(module, pruned)
    run.handoff.masks[fqn] = keep
    with single_threaded():  # a whole-matrix norm sums one partial per thread (compress/engine/threads.py)
        error = (pruned - original).norm() / original.norm().clamp_min(1e-12)
    entry: dict[str, Any] = {
        "target_sparsity": round(target, 6),
        "sparsity": round(measured_sparsity(weight_matrix(module)), 6),
        "mask_sparsity": round(1 - float(keep.float().mean()), 6),
        "weight_rel_error": round(error.item(), 6),
    }
    if nm is not None:
        entry["pattern"] = str(nm)
        entry["nm_valid"] = is_nm(keep, nm)
    return entry


def input_sq_norms(layer: LayerContext, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per module, the squared L2 norm of each input feature over every calibration token: ||X_j||^2, (in_features,)."""
    # float64 sums of float32 per-batch terms: independent of batch order and of the data-parallel split
    norms = {name: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64, device=weight_matrix(m).device)
             for name, m in modules.items()}

    def add(name: str, x: torch.Tensor) -> None:
        windows = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x.unsqueeze(0)
        for window in windows:  # per window, as the Hessian sums: the batching cannot change a bit
            norms[name] += window.float().pow(2).sum(dim=0)

    layer.observe(modules, add, stop_early=True)
    for total in norms.values():
        all_reduce_sum(total, 0)  # data-parallel calibration: add the ranks' shares (no-op alone)
    return {name: total.to(torch.float32) for name, total in norms.items()}
