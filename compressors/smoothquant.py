"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8 quantization.

Per-token 8-bit activation quantization breaks on the few input channels whose magnitude is 10-100x the
rest. SmoothQuant divides each such channel by a scale folded into the preceding norm and multiplies the
matching weight columns by it, so the layer computes the same function while activations are flatter and
weights a little rougher. It quantizes nothing itself; a quantization pass (with `activations:`) follows.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.engine.layer_sweep import LayerContext
from compress.quant.modules import weight_matrix
from compress.compressors.scaling import ScaleGroup, fold_scales, module_at, scale_groups, unquantized_groups
from compress.compressors.configs import SmoothQuantConfig  # noqa: F401  (re-exported; defined without torch)


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel scales (in_features,) from activation maxima (in_features,) and weights [(out_i, in)].

    Dividing the activations by the result and multiplying the weight columns by it balances their ranges.
    """
    # see SmoothQuant Eq. 4, Xiao et al. 2023: s_j = max|X_j|^α / max|W_j|^(1-α); max|W_j| over all consumers
    W_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    s = act_absmax.float().pow(alpha) / W_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


def max_min_ratio(channel_max: torch.Tensor) -> float:
    """Spread of per-channel maxima: 1 when every channel has the same range (what per-token quant wants)."""
    return (channel_max.max() / channel_max.clamp(min=1e-8).min()).item()


def input_absmax(layer: LayerContext, groups: list[ScaleGroup]) -> dict[str, torch.Tensor]:
    """Max |x| per input channel (in_features,) over every calibration token, keyed by each group's producer."""
    first = {group.previous: module_at(layer.layer, layer.prefix, group.linears[0]) for group in groups}
    absmax: dict[str, torch.Tensor] = {}

    def observe(previous: str, x: torch.Tensor) -> None:
        batch_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        absmax[previous] = torch.maximum(absmax[previous], batch_max) if previous in absmax else batch_max

    layer.observe(first, observe)
    return absmax


def run_smoothquant(layer: LayerContext, cfg: SmoothQuantConfig) -> dict[str, Any]:
    """Fold per-channel smoothing scales into each norm and the linears it feeds (no quantization)."""
    groups = [g for g in scale_groups(layer.layer, layer.prefix) if g.after_norm]
    groups = unquantized_groups(groups, layer.run, "smoothquant")
    absmax = input_absmax(layer, groups)
    results: dict[str, Any] = {}
    for group in groups:
        consumers = [module_at(layer.layer, layer.prefix, name) for name in group.linears]
        scales = smoothing_scales(absmax[group.previous], [weight_matrix(m) for m in consumers], cfg.alpha)
        fold_scales(module_at(layer.layer, layer.prefix, group.previous), consumers, scales)
        entry = {
            "alpha": cfg.alpha,
            "act_max_ratio_before": round(max_min_ratio(absmax[group.previous]), 4),
            "act_max_ratio_after": round(max_min_ratio(absmax[group.previous] / scales), 4),
        }
        results.update({name: dict(entry) for name in group.linears})
    return results
