"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774): prune a weight matrix column block by column block, choosing in each block the weights whose
removal costs least, w^2 / [H^-1]_jj^2 (OBS saliency), and folding each pruned weight's error into the columns not
yet processed through the inverse Hessian, exactly like GPTQ's rounding-error feedback.

`sparsegpt_prune` is the pure kernel (weight + Hessian in, pruned weight and mask out); the Hessian machinery is
`compressors.hessian`, shared with GPTQ; `run_sparsegpt` is the thin pass. Adaptive mask selection: an
unstructured mask is chosen per block of `block_size` columns from the error-updated weights (the paper's
"adaptive mask selection"), an N:M mask per group of M columns just before the group is processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.layer_sweep import LayerContext, input_groups
from compress.engine.threads import thread_independent_sum
from compress.quant.modules import weight_matrix
from compress.compressors.hessian import (
    HessianAccumulator,
    HessianNotPositiveDefinite,
    collect_hessians,
    inverse_hessian_factor,
    mark_dead_columns,
)
from compress.compressors.magnitude import magnitude_mask
from compress.compressors.pruning import apply_mask, prunable
from compress.compressors.sparsity import NM, nm_mask, topk_mask
from compress.compressors.configs import SparseGPTConfig  # noqa: F401  (re-exported; defined without torch)


@dataclass(frozen=True)
class SparseGPTResult:
    """What `sparsegpt_prune` produced for one weight matrix.

    weight: the reconstructed weights, zero where pruned. mask: bool, True where kept.
    loss: the OBS estimate sum (w_pruned / [H^-1]_jj)^2 / 2, the reference's "error".
    dampening_frac_used / dead_columns: as in GPTQResult.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    dampening_frac_used: float
    dead_columns: int


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: NM | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
) -> SparseGPTResult:
    """Prune `weight` (rows, columns) to `sparsity` (or to `nm`) given the layer Hessian (columns, columns).

    Each block of columns prunes round(sparsity * rows * block) weights (per row with N:M). Neither input is
    modified. Raises HessianNotPositiveDefinite when dampening cannot make the Hessian factorizable.
    """
    if nm is not None and block_size % nm.m:
        raise ValueError(f"block_size {block_size} must be a multiple of M={nm.m} for {nm} sparsity")
    W = weight.detach().float().clone()
    H = hessian.detach().to(W.device, torch.float32, copy=True)
    dead = mark_dead_columns(W, H)
    Hinv, damp_used = inverse_hessian_factor(H, dampening_frac)
    keep, loss = _prune_columns(W, Hinv, sparsity, nm, block_size)
    return SparseGPTResult(W, keep, loss, damp_used, dead)


def _prune_columns(W: torch.Tensor, Hinv: torch.Tensor, sparsity: float, nm: NM | None,
                   block_size: int) -> tuple[torch.Tensor, float]:
    """The lazy-batch OBS loop; W is overwritten with the pruned, error-compensated weights. Returns (mask, loss)."""
    # see SparseGPT Alg. 1 (with GPTQ's lazy batch updates); Frantar & Alistarh 2023
    rows, columns = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    row_loss = torch.zeros(rows, device=W.device)  # per row: a whole-matrix sum would round by thread count
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (block,)
        keep1 = keep[:, i1:i2]
        if nm is None:  # adaptive mask selection: one decision per block, from the weights updated so far
            keep1.copy_(topk_mask(W1.pow(2) / d.pow(2), sparsity, per="module"))
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                group = slice(i, i + nm.m)
                keep1[:, group] = nm_mask(W1[:, group].pow(2) / d[group].pow(2), nm)
            w = W1[:, i]
            q = w * keep1[:, i]
            err = (w - q) / Hinv1[i, i]  # (rows,)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        row_loss += Err1.pow(2).sum(dim=1) / 2
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return keep, thread_independent_sum(row_loss)


def run_sparsegpt(layer: LayerContext, cfg: SparseGPTConfig) -> dict[str, Any]:
    """SparseGPT: prune with second-order weight reconstruction from calibration inputs (Frantar & Alistarh 2023)."""
    modules = prunable(layer, cfg)
    groups = input_groups(layer, modules)
    # Modules of a group ([q, k, v], [gate, up]) read the very same tensor, so they share one Hessian.
    hessians = collect_hessians(layer, {names[0]: modules[names[0]] for names in groups}, cfg.hessian_torch_dtype)
    target = cfg.sparsity_for(layer)
    with layer.timed("solve"):
        return {fqn: prune_module(fqn, modules[fqn], hessians[names[0]], target, cfg, layer.run)
                for names in groups for fqn in names}


def prune_module(fqn: str, module: nn.Module, hessian: HessianAccumulator, target: float, cfg: SparseGPTConfig,
                 run: RunContext) -> dict[str, Any]:
    """SparseGPT one module, write it back, and return its report entry (magnitude fallback recorded)."""
    weight, nm = weight_matrix(module), cfg.nm
    extra: dict[str, Any] = {"hessian_samples": hessian.samples}
    try:
        result = sparsegpt_prune(weight, hessian.hessian, target, nm=nm, block_size=cfg.block_size,
                                 dampening_frac=cfg.damp)
        keep, new_weight = result.mask, result.weight
        extra.update(obs_loss=round(result.loss, 6), damp_used=result.dampening_frac_used,
                     dead_columns=result.dead_columns)
    except HessianNotPositiveDefinite as exc:
        keep, new_weight = magnitude_mask(weight, target, nm), None
        run.results.fallbacks.append({"pass": "sparsegpt", "module": fqn, "fallback": "magnitude", "reason": str(exc)})
        extra["fallback"] = "magnitude"
    return {**apply_mask(fqn, module, keep, new_weight, target, nm, run), **extra}
