"""Round-to-nearest (RTN) weight quantization: the data-free baseline every calibrated method must beat."""

from __future__ import annotations

from typing import Any

from compress.engine.layer_sweep import LayerContext
from compress.quant.modules import weight_matrix
from compress.quant.records import quantize_rtn
from compress.compressors.activation_scales import install_activations
from compress.compressors.base import keep_pruned_zeros, spec_for, write_back
from compress.compressors.configs import RTNConfig  # noqa: F401  (re-exported; defined without torch)


def run_rtn(layer: LayerContext, cfg: RTNConfig) -> dict[str, Any]:
    """Round each weight to the nearest point of a uniform integer grid (per channel or per group)."""
    results = {}
    modules = layer.linears(cfg.ignore)
    for fqn, module in modules.items():
        qweight = quantize_rtn(weight_matrix(module), spec_for(fqn, cfg, layer.run))
        qweight = keep_pruned_zeros(qweight, layer.run.handoff.masks.get(fqn))
        results[fqn] = write_back(fqn, module, qweight, layer.run)
    install_activations(layer, modules, cfg.activations)  # after the rounding: a static scale sees rounded weights' outputs
    return results
