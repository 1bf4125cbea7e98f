"""SqueezeLLM: sensitivity-weighted k-means grids per row, plus sparse exact outliers (Kim et al. 2023).

The kernel, `weighted_kmeans_rows` (compress/quant/lookup_records.py, where the allocator's `lut:b` candidates
use it too): for every row of W, 2^b centroids minimising sum_j importance_j (w_j - c(w_j))^2, by Lloyd's
iterations from the row's quantiles. The importance of a weight is the second moment of its input column on the
calibration windows: the diagonal of the layer Hessian, under which that sum is the diagonal approximation of the
output error. `split_outliers` picks the weights kept exactly.
`run_squeezellm` is the pass on the decoder-layer engine; it leaves `LookupTable` records, wrapped in
`WithOutliers` when any are kept (compress/quant/lookup_records.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from compress.engine.layer_sweep import LayerContext
from compress.quant.lookup_records import LookupSpec, WithOutliers, quantize_lookup
from compress.quant.modules import weight_matrix
from compress.quant.records import WeightRecord
from compress.compressors.base import keep_pruned_zeros, write_back
from compress.compressors.configs import SqueezeLLMConfig  # noqa: F401  (re-exported; defined without torch)


def split_outliers(w: torch.Tensor, energy: torch.Tensor, share: float) -> torch.Tensor:
    """Flat positions of the ceil(share x size) weights with the largest |w| x sqrt(energy of their input)."""
    count = math.ceil(share * w.numel()) if share > 0 else 0
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=w.device)
    score = (w.abs() * energy.sqrt()).reshape(-1)
    return torch.topk(score, count).indices


def squeeze_weight(w: torch.Tensor, energy: torch.Tensor, cfg: SqueezeLLMConfig) -> WeightRecord:
    """The record of one matrix (rows, columns) given its input columns' second moments `energy` (columns,)."""
    w = w.float()
    outliers = split_outliers(w, energy, cfg.outliers)
    importance = energy.expand_as(w).clone()
    importance.reshape(-1)[outliers] = 0  # kept exactly: they must not pull the centroids
    record: WeightRecord = quantize_lookup(w, LookupSpec(cfg.bits), importance, cfg.iters)
    if outliers.numel():
        record = WithOutliers(record, outliers, w.reshape(-1)[outliers])
    return record


def run_squeezellm(layer: LayerContext, cfg: SqueezeLLMConfig) -> dict[str, Any]:
    """Every linear of the layer onto its rows' k-means tables, from one calibration forward for the energies."""
    modules = layer.linears(cfg.ignore)
    energy = {fqn: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64, device=weight_matrix(m).device)
              for fqn, m in modules.items()}
    tokens = dict.fromkeys(modules, 0)

    def observe(fqn: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        energy[fqn] += flat.double().pow(2).sum(dim=0)
        tokens[fqn] += flat.shape[0]

    with layer.timed("statistics"):
        layer.observe(modules, observe, stop_early=True)
    results = {}
    for fqn, module in modules.items():
        mean_energy = (energy[fqn] / max(tokens[fqn], 1)).float()
        with layer.timed("solve"):
            record = squeeze_weight(weight_matrix(module), mean_energy + 1e-8 * mean_energy.mean().clamp_min(1e-30), cfg)
        record = keep_pruned_zeros(record, layer.run.handoff.masks.get(fqn))
        results[fqn] = write_back(fqn, module, record, layer.run)
    return results
