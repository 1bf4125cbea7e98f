"""The quantization layer's settings that recipes name, in a module that imports no torch: recipes validate
against them before torch loads (`compress validate`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.quant.gguf_types import GGUF_LABELS, gguf_type
from compress.recipe.registry import StrictConfig

DEFAULT_IGNORE = ("lm_head",)

ActivationFormat = Literal["int", "fp8", "nvfp4", "mxfp4"]
Observer = Literal["minmax", "percentile", "mse"]
# The group each FP4 activation format scales by, along the input features (compressed-tensors' NVFP4 / MXFP4 presets).
FP4_GROUPS = {"nvfp4": 16, "mxfp4": 32}
# FP8 per group: dynamic per-token groups of 128, as compressed-tensors' FP8_BLOCK preset (DeepSeek-V3 style)
FP8_GROUP = 128
DEFAULT_PERCENTILE = 99.99


class ObserverOptions(StrictConfig):
    """How a static scale is chosen from calibration inputs (activations or the KV cache), one forward per pass:

    - `minmax`: the largest |x| seen (one pass). Never clips, so one outlier coarsens every other value.
    - `percentile`: the `percentile`-th percentile of |x| over all calibration tokens (two passes: the max, then a
      2048-bin histogram of |x| up to it, so the clip is exact to 1/2048 of the max); clips the rarer outliers.
    - `mse`: of the clips max x (1.00, 0.99, ..., 0.81) (llm-compressor's MSE observer grid), the one whose
      fake-quantization of the calibration inputs has the least squared error (two passes: the max, then the
      error of every candidate, summed batch by batch).
    """

    observer: Observer = "minmax"
    percentile: float = Field(DEFAULT_PERCENTILE, gt=50, le=100)

    @model_validator(mode="after")
    def _percentile_needs_its_observer(self) -> "ObserverOptions":
        # compared with the default, not `model_fields_set`: a saved settings dump carries every field
        if self.percentile != DEFAULT_PERCENTILE and self.observer != "percentile":
            raise ValueError(f"`percentile` is read only by `observer: percentile` (this one is {self.observer!r})")
        return self


class ActivationQuantConfig(ObserverOptions):
    """Fake-quantization of every quantized linear's input, in every forward (calibration and evaluation alike).

    format: `int` (symmetric integers of `bits`: W8A8 int8), `fp8` (E4M3), `nvfp4` (E2M1 in groups of 16 with FP8
    scales under a per-tensor FP32 global scale calibrated on the calibration windows, as compressed-tensors' NVFP4
    preset), `mxfp4` (E2M1 in groups of 32 with power-of-two E8M0 scales, no calibration).
    per: `token` (a scale per token, computed on the fly), `tensor` (one scale for the whole input), `group` (a
    scale per 128 input features of each token for fp8, as FP8_BLOCK; the only choice of the FP4 formats). static: int or fp8 per tensor only; the scale is calibrated once on
    the calibration windows with `observer` (see ObserverOptions) instead of computed from each batch, as a
    runtime with static input scales does. nvfp4 calibrates its global scale with `observer` too.

    Recipe example:

        activations: {bits: 8, per: token}                              # int8 dynamic per token (W8A8)
        activations: {format: fp8, per: token}                          # FP8 dynamic per token (FP8_DYNAMIC)
        activations: {format: fp8, per: tensor, static: true, observer: mse}
        activations: {format: nvfp4}                                    # W4A4 with nvfp4 weights
    """

    format: ActivationFormat = "int"
    bits: int | None = Field(None, ge=4, le=8)
    per: Literal["token", "tensor", "group"] | None = None
    static: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "ActivationQuantConfig":
        fp4 = self.format in FP4_GROUPS
        if self.bits is not None and self.format != "int":
            raise ValueError(f"`bits` is for `format: int`; {self.format} has its own width (leave `bits` out)")
        if fp4 and self.per not in (None, "group"):
            raise ValueError(f"{self.format} activations are scaled per group of {FP4_GROUPS[self.format]}; "
                             f"leave `per` out (got {self.per!r})")
        if self.format == "int" and self.per == "group":
            raise ValueError("per: group is for float activations (fp8, nvfp4, mxfp4); int takes token or tensor")
        if self.static and (fp4 or self.granularity != "tensor"):
            raise ValueError("static: true is one calibrated scale per tensor: it needs format int or fp8 with "
                             "per: tensor (nvfp4 calibrates its global scale anyway; mxfp4 has no static form)")
        if self.observer != "minmax" and not self.calibrated:
            raise ValueError(f"observer {self.observer!r} chooses a calibrated scale, and these activations are "
                             "dynamic: set static: true (per: tensor), or leave `observer` out")
        return self

    @property
    def width(self) -> int:
        """Bits per activation element."""
        return (self.bits or 8) if self.format in ("int", "fp8") else 4

    @property
    def granularity(self) -> str:
        """token, tensor or group: what one scale covers."""
        return self.per or ("group" if self.format in FP4_GROUPS else "token")

    @property
    def group_size(self) -> int | None:
        """Input features per scale when scaled per group."""
        return FP4_GROUPS.get(self.format, FP8_GROUP) if self.granularity == "group" else None

    @property
    def calibrated(self) -> bool:
        """Whether a scale comes from the calibration windows (static scales, NVFP4's global scale)."""
        return self.static or self.format == "nvfp4"


# Element-float weight formats (compress/quant/float_records.py), named here without torch so recipes validate first.
FLOAT_FORMATS = ("fp8", "nvfp4", "mxfp4")
FP8_STRATEGIES = ("tensor", "channel", "block")
# The names a bit plan and the allocator's candidates use for them: fp8 is per channel.
FLOAT_LABELS = ("fp8", "fp8-tensor", "fp8-block", "nvfp4", "mxfp4")


# Per-row lookup tables of 2^b float16 entries (SqueezeLLM's non-uniform grids, compress/quant/lookup_records.py).
LUT_LABELS = ("lut:2", "lut:3", "lut:4")

# Every format a bit plan or an allocator candidate may name besides an integer width: the element floats,
# llama.cpp's GGUF block types (`gguf:q4_k`, compress/quant/gguf_types.py), and per-row lookup tables (`lut:3`).
PLAN_LABELS = FLOAT_LABELS + GGUF_LABELS + LUT_LABELS


def label_bits(label: str) -> int:
    """Bits per element code of a label: 8 for the FP8 ones, 4 for NVFP4 / MXFP4, the code width of a GGUF type."""
    if label in GGUF_LABELS:
        return gguf_type(label).code_bits
    if label in LUT_LABELS:
        return int(label.removeprefix("lut:"))
    return 8 if label.startswith("fp8") else 4
