"""Dynamic activation fake-quantization (the 'A' in W8A8), installed as forward pre-hooks on quantized linears."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from compress.quant.primitives import fake_quantize_per_tensor, fake_quantize_per_token
from compress.recipe.registry import StrictConfig


class ActivationQuantConfig(StrictConfig):
    """Dynamic symmetric activation fake-quantization of every quantized linear's input (the 'A' in W8A8)."""

    bits: int = Field(8, ge=4, le=8)
    per: Literal["token", "tensor"] = "token"


def install_activation_quant(fqn: str, module: nn.Module, cfg: ActivationQuantConfig | None,
                             installed: dict[str, dict[str, Any]]) -> None:
    """Fake-quantize the module's input on every forward (calibration propagation and evaluation alike).

    `installed` is the run's record of hooks (fqn -> settings), which the report and checkpoints carry.
    """
    if cfg is None or fqn in installed:
        return
    quantize = fake_quantize_per_token if cfg.per == "token" else fake_quantize_per_tensor
    bits = cfg.bits
    module.register_forward_pre_hook(lambda _m, args: (quantize(args[0], bits), *args[1:]))
    installed[fqn] = cfg.model_dump()
