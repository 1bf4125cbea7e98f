"""OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity", arXiv:2310.05175): non-uniform per-layer sparsity.

Layers with a larger share of outlier Wanda scores (|W| * ||X||_2 above `threshold` x the layer mean) matter more,
so they are pruned less; the ratios span at most 2 x `spread` and their mean is held at the target. The pass
measures the dense model on the calibration windows and writes `RunContext.layer_sparsity`, which the next
pruning pass (magnitude, wanda, sparsegpt; unstructured) uses instead of its own `sparsity`, as a quantizer
uses a bit plan.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.engine.context import RunContext
from compress.engine.layer_sweep import LayerContext, SweepStep, run_sweep
from compress.engine.model_io import ModelHandle
from compress.quant.modules import weight_matrix
from compress.recipe.registry import StrictConfig
from compress.compressors.pruning import input_sq_norms
from compress.compressors.sparsity import outlier_share, owl_sparsities
from compress.compressors.wanda import wanda_score
from compress.compressors.configs import OWLConfig  # noqa: F401  (re-exported; defined without torch)


def _measure(shares: dict[str, float], cfg: OWLConfig) -> Any:
    def measure(layer: LayerContext, _cfg: Any) -> dict[str, Any]:
        modules = layer.linears(cfg.ignore)
        norms = input_sq_norms(layer, modules)
        scores = torch.cat([wanda_score(weight_matrix(m), norms[fqn]).flatten() for fqn, m in modules.items()])
        shares[layer.prefix] = outlier_share(scores, cfg.threshold)
        return {}

    return measure


def run_owl(handle: ModelHandle, cfg: OWLConfig, run: RunContext,
            next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """OWL: per-layer sparsity from the share of activation outliers, mean held at the target."""
    shares: dict[str, float] = {}
    run_sweep(handle, [SweepStep("owl: outlier shares", _measure(shares, cfg), cfg, True)], run)
    ratios = owl_sparsities(list(shares.values()), cfg.sparsity, cfg.spread)
    run.handoff.layer_sparsity.update(zip(shares, ratios))
    return {prefix: {"outlier_share": round(share, 6), "sparsity": round(ratio, 6)}
            for (prefix, share), ratio in zip(shares.items(), ratios)}
