"""The quantization layer's settings that recipes name, in a module that imports no torch: recipes validate
against them before torch loads (`compress validate`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.recipe.registry import StrictConfig

DEFAULT_IGNORE = ("lm_head",)


class ActivationQuantConfig(StrictConfig):
    """Dynamic symmetric activation fake-quantization of every quantized linear's input (the 'A' in W8A8)."""

    bits: int = Field(8, ge=4, le=8)
    per: Literal["token", "tensor"] = "token"


# Element-float weight formats (compress/quant/float_records.py), named here without torch so recipes validate first.
FLOAT_FORMATS = ("fp8", "nvfp4", "mxfp4")
FP8_STRATEGIES = ("tensor", "channel", "block")
# The names a bit plan and the allocator's candidates use for them: fp8 is per channel.
FLOAT_LABELS = ("fp8", "fp8-tensor", "fp8-block", "nvfp4", "mxfp4")


def label_bits(label: str) -> int:
    """Bits per element code of a float label: 8 for the FP8 ones, 4 for NVFP4 / MXFP4."""
    return 8 if label.startswith("fp8") else 4
