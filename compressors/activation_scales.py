"""Calibrated activation scales: static int/FP8 input scales and NVFP4's global scale, from the calibration windows.

The quantizers (rtn, gptq, awq) call `install_activations` for the linears of one decoder layer. Dynamic formats
need nothing from the data and are installed at once. Calibrated ones first run the layer's calibration inputs
through it (once per observer pass, compress/quant/observers.py) with an observer on each module's input, then
install the hook with the scale chosen. The inputs are observed before the layer's own activation hooks exist, on
the inputs the earlier (already quantized) layers hand on, as a runtime with static scales would be calibrated.
"""

from __future__ import annotations


from torch import nn

from compress.engine import distributed
from compress.engine.layer_sweep import LayerContext
from compress.quant.activation import install_activation_quant, quantize_at_clip, scale_for_clip
from compress.quant.config import ActivationQuantConfig
from compress.quant.observers import Observer, make_observer
from compress.recipe.errors import UserError


def observe_inputs(layer: LayerContext, modules: dict[str, nn.Module], cfg: ActivationQuantConfig) -> dict[str, Observer]:
    """One observer per module, fed its whole input (one per-tensor group) on every calibration batch."""
    if distributed.is_distributed():
        raise UserError(f"{cfg.format} activations with a calibrated scale are calibrated in one process (each torchrun "
                        "rank would choose its own scale from its share of the windows); run without torchrun")
    observers = {fqn: make_observer(cfg, quantize_at_clip(cfg)) for fqn in modules}
    for pass_index in range(observers[next(iter(observers))].passes):
        layer.observe(modules, lambda fqn, x: observers[fqn].observe(x.reshape(1, -1), pass_index))
    return observers


def install_activations(layer: LayerContext, modules: dict[str, nn.Module], cfg: ActivationQuantConfig | None) -> None:
    """Install `cfg`'s activation fake-quantization on every module (fqn -> linear), calibrating it if it needs it."""
    installed = layer.run.results.activation_quant
    todo = {fqn: module for fqn, module in modules.items() if fqn not in installed}
    if cfg is None or not todo:
        return
    calibrated: dict[str, dict[str, float]] = {fqn: {} for fqn in todo}
    if cfg.calibrated:
        observers = observe_inputs(layer, todo, cfg)
        calibrated = {fqn: scale_for_clip(cfg, observer.clip()) for fqn, observer in observers.items()}
    for fqn, module in todo.items():
        install_activation_quant(fqn, module, cfg, installed, calibrated[fqn])
