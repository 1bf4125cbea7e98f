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
