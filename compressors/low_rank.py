"""Low-rank compensation of the quantization error (ZeroQuant-V2's LoRC; fitted to activations as in EoRA).

After a layer quantizer left Q(W) for a linear, `lorc` adds B A (rank r) so that W ~ Q(W) + B A, chosen to
minimise the module's output error on its calibration inputs X (rows are tokens):

    min ||(E - B A) X^T||_F^2 = tr((E - B A) H (E - B A)^T),    E = W - Q(W),  H = X^T X (+ damping)

With H = V diag(l) V^T, that is an ordinary low-rank approximation of E V diag(sqrt l), whose best rank-r answer
is its truncated SVD (Eckart-Young), mapped back by diag(1 / sqrt l) V^T. `low_rank_correction` is that pure
kernel; `run_lorc` the pass on the decoder-layer engine, which wraps each quantizer record in a
`LowRankCorrected` (compress/quant/low_rank.py) with the float16 factors.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.engine.layer_sweep import LayerContext, input_groups
from compress.quant.low_rank import FACTOR_DTYPE, LowRankCorrected
from compress.quant.modules import set_weight_matrix, weight_matrix
from compress.recipe.errors import UserError
from compress.compressors.configs import LowRankConfig  # noqa: F401  (re-exported; defined without torch)
from compress.compressors.hessian import HessianAccumulator, collect_hessians


def low_rank_correction(error: torch.Tensor, hessian: torch.Tensor, rank: int,
                        damp: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, rank) and A (rank, in), float32, with B A the best rank-`rank` fit of `error` (out, in) in the norm
    of `hessian` (in, in; symmetric positive semi-definite) plus `damp` x its mean eigenvalue on the diagonal.

    The singular values are split evenly between the factors (sqrt to each), which keeps both in float16's range.
    """
    h = hessian.double()
    eigenvalues, eigenvectors = torch.linalg.eigh((h + h.T) / 2)
    eigenvalues = eigenvalues.clamp_min(0)
    eigenvalues = eigenvalues + damp * eigenvalues.mean().clamp_min(torch.finfo(torch.float32).tiny)
    root = eigenvalues.sqrt()
    whitened = (error.double() @ eigenvectors) * root  # E V diag(sqrt l)
    left, singular, right = torch.linalg.svd(whitened, full_matrices=False)
    share = singular[:rank].sqrt()
    b = left[:, :rank] * share
    a = (share[:, None] * right[:rank]) / root @ eigenvectors.T
    return b.float(), a.float()


def weighted_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T): the summed squared output error of a weight error E on inputs with X^T X = H."""
    e = error.double()
    return float(((e @ hessian.double()) * e).sum())


def _weight_before(layer: LayerContext, fqn: str, module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as it was before this sweep's quantizer, float32 (out, in)."""
    from transformers.pytorch_utils import Conv1D

    assert layer.state_before is not None
    stored = layer.state_before[fqn[len(layer.prefix) + 1:] + ".weight"].float()
    return stored.t() if isinstance(module, Conv1D) else stored


def shared_hessians(layer: LayerContext, modules: dict[str, torch.nn.Module]) -> dict[str, HessianAccumulator]:
    """Each module's input Hessian, one accumulated per group of modules reading the very same input (q/k/v,
    gate/up), as GPTQ shares them; a module no probe batch reached gets its own."""
    groups = input_groups(layer, modules)
    grouped = {name for group in groups for name in group}
    groups += [[name] for name in modules if name not in grouped]
    hessians = collect_hessians(layer, {group[0]: modules[group[0]] for group in groups})
    return {name: hessians[group[0]] for group in groups for name in group}


def run_lorc(layer: LayerContext, cfg: LowRankConfig) -> dict[str, Any]:
    """Fit and add B A to every quantized linear of the layer (the quantizer ran on it just before, in this sweep)."""
    records = layer.run.results.records
    modules = {fqn: m for fqn, m in layer.linears(cfg.ignore).items() if fqn in records}
    if any(fqn in layer.run.handoff.masks for fqn in modules):
        raise UserError(f"lorc: {layer.prefix} was pruned, and a low-rank correction is dense: leave one of them out")
    hessians = shared_hessians(layer, modules)
    results = {}
    for fqn, module in modules.items():
        record = records[fqn]
        rows, columns = record.shape
        rank = cfg.rank_for(rows, columns)
        device = weight_matrix(module).device
        original = _weight_before(layer, fqn, module).to(device)
        base = record.dequantize().to(device)
        error = original - base
        if not bool(error.any()):
            raise UserError(f"lorc: {fqn} has no quantization error to correct: lorc must follow its quantizer "
                            "directly, in the same sweep over the layers")
        hessian = hessians[fqn].hessian
        with layer.timed("solve"):
            b, a = low_rank_correction(error, hessian, rank, cfg.damp)
        corrected = LowRankCorrected(record, a.to(FACTOR_DTYPE), b.to(FACTOR_DTYPE))
        correction = corrected.correction().to(device)
        set_weight_matrix(module, base + correction)  # corrected.dequantize(), without dequantizing the base again
        records[fqn] = corrected.to("cpu")
        before, after = weighted_error(error, hessian), weighted_error(error - correction, hessian)
        results[fqn] = {**corrected.describe(),
                        "output_error_kept": round(after / before, 6) if before > 0 else 0.0}
    return results
