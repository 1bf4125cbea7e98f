"""Layer dropping by block influence (ShortGPT, Men et al. 2024, arXiv:2403.03853; the layer-importance measure of
"Layer-Wise Quantization", Dumitru et al. 2024): a decoder layer whose output hidden states point where its inputs
already did (cosine similarity near 1) changes little, so it is removed whole.

`block_influence` and `layers_to_drop` are the pure kernels; `run_layer_drop` is a model-scope pass: it measures
every layer on the calibration windows (on the unpruned model, as ShortGPT does), deletes the chosen layers from the
decoder-layer list and rewrites `config.num_hidden_layers` (and `config.layer_types`), so `save_pretrained` writes
a smaller model that plain transformers loads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.layer_sweep import LayerContext, SweepStep, run_sweep
from compress.engine.model_io import ModelHandle
from compress.engine.threads import thread_independent_sum
from compress.recipe.registry import StrictConfig
from compress.compressors.configs import LayerDropConfig  # noqa: F401  (re-exported; defined without torch)


def block_influence(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of 1 - cos(x_in, x_out), and the token count; (..., hidden) inputs. BI = sum / count."""
    cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (...,)
    return thread_independent_sum(1 - cos), cos.numel()


def layers_to_drop(influence: list[float], count: int) -> list[int]:
    """Indices of the `count` least influential layers, ascending."""
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    return sorted(order[:count])


def _measure(influence: dict[int, tuple[float, int]]) -> Any:
    def measure(layer: LayerContext, _cfg: Any) -> dict[str, Any]:
        assert layer.inputs is not None  # registered with needs_calibration
        total, tokens = 0.0, 0
        for item, out in zip(layer.inputs, layer.forward()):
            part, n = block_influence(item.hidden, out)
            total, tokens = total + part, tokens + n
        influence[layer.index] = (total, tokens)
        return {}

    return measure


def run_layer_drop(handle: ModelHandle, cfg: LayerDropConfig, run: RunContext,
                   next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """Layer drop: remove the decoder layers with the lowest block influence (ShortGPT)."""
    sums: dict[int, tuple[float, int]] = {}
    run_sweep(handle, [SweepStep("layer_drop: block influence", _measure(sums), cfg, True)], run)
    influence = [sums[i][0] / sums[i][1] for i in range(len(handle.layers))]
    dropped = layers_to_drop(influence, cfg.count_for(len(influence)))
    before = handle.parameter_count()
    remove_layers(handle, dropped)
    results: dict[str, Any] = {
        f"{handle.layers_prefix}.{i}": {"block_influence": round(bi, 6), "dropped": i in dropped}
        for i, bi in enumerate(influence)
    }
    results[handle.layers_prefix] = {"parameters_before": before, "parameters_after": handle.parameter_count(),
                                     "layers_before": len(influence), "layers_after": len(handle.layers)}
    return results


def remove_layers(handle: ModelHandle, indices: list[int]) -> None:
    """Delete decoder layers in place, renumber the rest, and make the config describe the smaller model."""
    layers = handle.layers
    kept = [layer for i, layer in enumerate(layers) if i not in set(indices)]
    parent_name, _, attr = handle.layers_prefix.rpartition(".")
    parent = handle.model.get_submodule(parent_name) if parent_name else handle.model
    setattr(parent, attr, nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # attention modules index the KV cache by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_index)
    config: Any = handle.model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(indices)]
    config.num_hidden_layers = len(kept)
