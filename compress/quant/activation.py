"""Activation fake-quantization (the 'A' in W8A8, FP8 W8A8 and W4A4), installed as forward pre-hooks on quantized
linears, so calibration propagation and evaluation alike compute with the quantized inputs.

What a hook does is fixed by its settings (`ActivationQuantConfig`) and, for calibrated formats, the scale the
calibration windows gave: `input_scale` (a static int/FP8 scale) or `input_global_scale` (NVFP4's FP32 global
scale), under the names compressed-tensors stores them. The run keeps both in `run.results.activation_quant`
(fqn -> `settings_of(...)`), which the report, layer checkpoints, the run state and the export carry.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from compress.quant.config import FP4_GROUPS, ActivationQuantConfig
from compress.quant.element_float import (
    fake_quantize_fp8,
    fake_quantize_mxfp4,
    fake_quantize_nvfp4,
    fp8_scale,
    grouped,
    nvfp4_global_scale,
)
from compress.quant.modules import weight_matrix
from compress.quant.primitives import fake_quantize_per_tensor, fake_quantize_per_token
from compress.recipe.errors import UserError

CALIBRATED_KEYS = ("input_scale", "input_global_scale")  # compressed-tensors' tensor names for them

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def fake_quantize_int_static(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Symmetric integer fake-quantization with a fixed (calibrated) scale; values beyond it saturate."""
    qmax = 2 ** (bits - 1) - 1
    return (torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax) * scale).to(x.dtype)


def fake_quantize_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic FP8 (E4M3): one scale per row of the last dim, amax / 448 (llm-compressor's FP8_DYNAMIC)."""
    return fake_quantize_fp8(x, fp8_scale(x.detach().abs().amax(dim=-1, keepdim=True)))


def fake_quantize_fp8_per_group(x: torch.Tensor, group: int) -> torch.Tensor:
    """Dynamic FP8 (E4M3) with a scale per `group` consecutive features of each token (FP8_BLOCK's activations)."""
    blocks = grouped(x, group)  # (..., groups, group)
    return fake_quantize_fp8(blocks, fp8_scale(blocks.detach().abs().amax(dim=-1, keepdim=True))).flatten(-2)


def fake_quantize_fp8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """Dynamic FP8 (E4M3) with one scale for the whole batch."""
    return fake_quantize_fp8(x, fp8_scale(x.detach().abs().amax()))


def scale_for_clip(cfg: ActivationQuantConfig, clip: torch.Tensor) -> dict[str, float]:
    """The calibrated values (`CALIBRATED_KEYS`) of a per-tensor clip |x| chosen by an observer."""
    if cfg.format == "nvfp4":
        return {"input_global_scale": float(nvfp4_global_scale(clip.reshape(1)))}
    if cfg.format == "fp8":
        return {"input_scale": float(fp8_scale(clip.reshape(1)))}
    qmax = 2 ** (cfg.width - 1) - 1
    return {"input_scale": float(clip) / qmax if float(clip) > 0 else 1.0}  # all-zero inputs: any scale is exact


def quantize_at_clip(cfg: ActivationQuantConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`x (groups, n), clips (groups, 1) -> x` fake-quantized with the scales those clips give (the MSE observer's
    candidates)."""
    def apply(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        if cfg.format == "nvfp4":
            return fake_quantize_nvfp4(x, nvfp4_global_scale(clip.reshape(-1)[:1]), FP4_GROUPS["nvfp4"])
        if cfg.format == "fp8":
            return fake_quantize_fp8(x, fp8_scale(clip))
        qmax = 2 ** (cfg.width - 1) - 1
        scale = torch.where(clip > 0, clip / qmax, torch.ones_like(clip))
        return (torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale).to(x.dtype)

    return apply


def activation_quantizer(cfg: ActivationQuantConfig, calibrated: dict[str, float]) -> Quantizer:
    """The function a hook applies to a linear's input (..., in_features)."""
    if cfg.format == "mxfp4":
        return fake_quantize_mxfp4
    if cfg.format == "nvfp4":
        global_scale = torch.tensor([calibrated["input_global_scale"]], dtype=torch.float32)
        return lambda x: fake_quantize_nvfp4(x, global_scale.to(x.device))
    if cfg.static:
        scale = calibrated["input_scale"]
        if cfg.format == "fp8":
            return lambda x: fake_quantize_fp8(x, torch.tensor(scale, device=x.device))
        return lambda x: fake_quantize_int_static(x, scale, cfg.width)
    if cfg.format == "fp8" and cfg.group_size is not None:
        group = cfg.group_size
        return lambda x: fake_quantize_fp8_per_group(x, group)
    if cfg.format == "fp8":
        return fake_quantize_fp8_per_token if cfg.granularity == "token" else fake_quantize_fp8_per_tensor
    bits = cfg.width
    if cfg.granularity == "token":
        return lambda x: fake_quantize_per_token(x, bits)
    return lambda x: fake_quantize_per_tensor(x, bits)


def settings_of(cfg: ActivationQuantConfig, calibrated: dict[str, float] | None = None) -> dict[str, Any]:
    """What the run records for one module: the config's fields plus its calibrated values (JSON floats, exact)."""
    return {**cfg.model_dump(), **(calibrated or {})}


def config_of(settings: dict[str, Any]) -> tuple[ActivationQuantConfig, dict[str, float]]:
    """`settings_of` read back: the config and the calibrated values."""
    calibrated = {key: float(settings[key]) for key in CALIBRATED_KEYS if key in settings}
    return ActivationQuantConfig(**{k: v for k, v in settings.items() if k not in CALIBRATED_KEYS}), calibrated


def check_groups_fit(fqn: str, module: nn.Module, cfg: ActivationQuantConfig) -> None:
    """Activations scaled per group along the input features: refuse a width the group does not divide."""
    group = cfg.group_size
    width = weight_matrix(module).shape[1]  # (out, in) for Linear and GPT-2's Conv1D alike
    if group and width % group:
        raise UserError(f"{fqn}: {cfg.format} activations are scaled in groups of {group} input features, and this "
                        f"module has {width}; leave it out with `ignore`, or use fp8 per token")


def install_activation_quant(fqn: str, module: nn.Module, cfg: ActivationQuantConfig | None,
                             installed: dict[str, dict[str, Any]], calibrated: dict[str, float] | None = None) -> None:
    """Fake-quantize the module's input on every forward (calibration propagation and evaluation alike).

    `installed` is the run's record of hooks (fqn -> `settings_of`), which the report and checkpoints carry.
    `calibrated` holds the values calibration chose when `cfg.calibrated` (see compressors/activation_scales.py).
    """
    if cfg is None or fqn in installed:
        return
    missing = [key for key in _needed(cfg) if key not in (calibrated or {})]
    if missing:
        raise ValueError(f"{fqn}: {cfg.format} activations need the calibrated {', '.join(missing)}")
    check_groups_fit(fqn, module, cfg)
    quantize = activation_quantizer(cfg, calibrated or {})
    module.register_forward_pre_hook(lambda _m, args: (quantize(args[0]), *args[1:]))
    installed[fqn] = settings_of(cfg, calibrated)


def _needed(cfg: ActivationQuantConfig) -> tuple[str, ...]:
    if cfg.format == "nvfp4":
        return ("input_global_scale",)
    return ("input_scale",) if cfg.static else ()
