"""Dynamic activation fake-quantization (the 'A' in W8A8), installed as forward pre-hooks on quantized linears."""

from __future__ import annotations

from typing import Any

from torch import nn

from compress.quant.primitives import fake_quantize_per_tensor, fake_quantize_per_token
from compress.quant.config import ActivationQuantConfig  # noqa: F401  (re-exported; defined without torch)


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
