"""Round-to-nearest (RTN) weight quantization: the data-free baseline every calibrated method must beat, onto a
uniform integer grid or an element-float one (FP8, NVFP4, MXFP4: compress/quant/float_records.py)."""

from __future__ import annotations

from typing import Any

from compress.engine.layer_sweep import LayerContext
from compress.quant.modules import weight_matrix
from compress.quant.float_records import quantize_weight_rtn
from compress.compressors.activation_scales import install_activations
from compress.compressors.base import checked_spec, keep_pruned_zeros, write_back
from compress.compressors.configs import RTNConfig  # noqa: F401  (re-exported; defined without torch)


def run_rtn(layer: LayerContext, cfg: RTNConfig) -> dict[str, Any]:
    """Round each weight to the nearest point of its grid: integers per channel or group, or an element-float format."""
    results = {}
    modules = layer.linears(cfg.ignore)
    for fqn, module in modules.items():
        spec = checked_spec(fqn, module, cfg, layer.run)
        qweight = quantize_weight_rtn(weight_matrix(module), spec)
        qweight = keep_pruned_zeros(qweight, layer.run.handoff.masks.get(fqn))
        results[fqn] = write_back(fqn, module, qweight, layer.run)
    install_activations(layer, modules, cfg.activations)  # after the rounding: a static scale sees rounded weights' outputs
    return results
