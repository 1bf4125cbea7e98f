"""The `kv_cache` pass: an FP8 KV cache with scales calibrated on the calibration windows (per tensor or per head).

For each decoder layer: route its attention through the KV hook (compress/quant/kv_cache.py), check on the first
calibration batch that doing so changes nothing by itself, observe the key and value states attention reads on
every calibration batch (one or two passes, per the observer), then attach the scales, so the next layer's
inputs, and every evaluation after the run, see the quantized cache. A family whose attention never hands its
states to transformers' attention interface is refused by name, as is one whose outputs the rerouting changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.engine import distributed
from compress.engine.layer_sweep import LayerContext
from compress.quant.element_float import fp8_scale
from compress.quant.element_float import fake_quantize_fp8
from compress.quant.kv_cache import KVCacheQuant, attach, install_kv_cache, kv_state, per_group_rows, route_through_kv_hook
from compress.quant.observers import Observer, make_observer
from compress.recipe.errors import UserError
from compress.compressors.configs import KVCacheConfig  # noqa: F401  (re-exported; defined without torch)


def attention_modules(layer: LayerContext) -> dict[str, nn.Module]:
    """The layer's attention modules by fqn: those whose class is named *Attention and that carry the model config."""
    found = {fqn: module for fqn, module in layer.layer.named_modules(prefix=layer.prefix)
             if type(module).__name__.endswith("Attention") and hasattr(module, "config")}
    if not found:
        raise UserError(f"kv_cache: decoder layer {layer.prefix} ({type(layer.layer).__name__}) has no attention module "
                        "holding its model config, so the KV cache cannot be quantized in this family")
    return found


def _family(module: nn.Module) -> str:
    return f"{getattr(module.config, 'model_type', '?')} ({type(module).__name__})"


def quantize_fp8_at(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    return fake_quantize_fp8(x, fp8_scale(clip))


def _first_output(layer: LayerContext) -> torch.Tensor:
    return next(iter(layer.outputs()))


def route(layer: LayerContext, modules: dict[str, nn.Module]) -> None:
    """Send attention through the hook; refuse if that alone changes the layer's output on a calibration batch."""
    before = _first_output(layer)
    for module in modules.values():
        route_through_kv_hook(module.config)
    states = {fqn: attach(module, KVCacheQuant()) for fqn, module in modules.items()}
    after = _first_output(layer)
    silent = [fqn for fqn, state in states.items() if state.calls == 0]
    if silent:
        raise UserError(f"kv_cache: the attention of {_family(modules[silent[0]])} never passes its key and value states "
                        "to transformers' attention interface, so the KV cache cannot be quantized in this family")
    if not torch.equal(before, after):
        raise UserError(f"kv_cache: rerouting the attention of {_family(next(iter(modules.values())))} through the KV "
                        "hook changes its outputs by itself, so the KV cache cannot be quantized in this family")


def observe_states(layer: LayerContext, modules: dict[str, nn.Module], cfg: KVCacheConfig) -> dict[str, tuple[Observer, Observer]]:
    """A (key, value) observer pair per attention module, fed every calibration batch's states, once per pass."""
    if distributed.is_distributed():
        raise UserError("kv_cache calibrates in one process (each torchrun rank would choose its own scales from its "
                        "share of the windows); run without torchrun")
    observers = {fqn: (make_observer(cfg, quantize_fp8_at), make_observer(cfg, quantize_fp8_at)) for fqn in modules}
    for pass_index in range(observers[next(iter(observers))][0].passes):
        for fqn, (keys, values) in observers.items():
            def observe(key: torch.Tensor, value: torch.Tensor, keys: Observer = keys, values: Observer = values,
                        p: int = pass_index) -> None:
                keys.observe(per_group_rows(key, cfg.strategy), p)
                values.observe(per_group_rows(value, cfg.strategy), p)
            kv_state(modules[fqn]).observe = observe  # type: ignore[union-attr]
        for _ in layer.outputs():
            pass
    for module in modules.values():
        kv_state(module).observe = None  # type: ignore[union-attr]
    return observers


def kv_settings(cfg: KVCacheConfig, k_scale: torch.Tensor, v_scale: torch.Tensor) -> dict[str, Any]:
    """What the run records for one attention module (JSON: the scales as lists of floats, exact)."""
    return {**cfg.model_dump(), "k_scale": k_scale.flatten().tolist(), "v_scale": v_scale.flatten().tolist()}


def run_kv_cache(layer: LayerContext, cfg: KVCacheConfig) -> dict[str, Any]:
    """Calibrate and install an FP8 KV cache on every attention module of the layer."""
    modules = attention_modules(layer)
    route(layer, modules)
    observers = observe_states(layer, modules, cfg)
    results: dict[str, Any] = {}
    for fqn, (keys, values) in observers.items():
        k_scale, v_scale = fp8_scale(keys.clip()), fp8_scale(values.clip())
        install_kv_cache(fqn, modules[fqn], kv_settings(cfg, k_scale, v_scale), layer.run.results.kv_cache)
        results[fqn] = {"kv_cache": cfg.format, "strategy": cfg.strategy, "observer": cfg.observer,
                        "k_scale_max": float(k_scale.max()), "v_scale_max": float(v_scale.max())}
    return results
