"""Element-float weight records: FP8 E4M3 (per tensor, per channel, 128x128 blocks), NVFP4 and MXFP4.

A `FloatSpec` says which format and scale layout a weight gets (the float counterpart of `QuantSpec`); an
`ElementFloat` record holds one matrix in it. What it stores, for a (rows, columns) matrix:

    fp8 tensor | channel | block   codes: E4M3 bit patterns, uint8 (rows, columns)
                                   scale: float32 (1, 1) | (rows, 1) | (ceil(rows/128), ceil(columns/128))
    nvfp4                          codes: E2M1 nibbles (sign bit 3), one per uint8 in memory, 4 bits stored
                                   scale: FP8 E4M3 values (as float32) per 16 columns, (rows, columns/16)
                                   global_scale: float32 (1,); an element's scale is scale / global_scale
    mxfp4                          codes as nvfp4; scale: powers of two (E8M0) per 32 columns, (rows, columns/32)

The scales are the formats' own (compress/quant/element_float.py, equal to compressed-tensors'), and they are
counted at the width they are stored at: 8 bits for FP8 and E8M0 scales, 32 for the FP8 formats' float32 scales
and NVFP4's global one. FP8 scales are kept in float32 (as DeepSeek's block scales and compressed-tensors' FP8
checkpoints store them) so the exported checkpoint dequantizes to exactly what we evaluated.

Recipe example:

    passes:
      - rtn: {format: fp8, strategy: channel}     # or tensor, or block (128x128)
      - gptq: {format: nvfp4}                     # FP4 elements, FP8 scale per 16, FP32 global scale
      - rtn: {format: mxfp4}                      # FP4 elements, E8M0 scale per 32
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

import torch
import torch.nn.functional as F

from compress.quant import element_float as ef
from compress.quant.config import FLOAT_FORMATS, FLOAT_LABELS, FP8_STRATEGIES
from compress.quant.primitives import QuantSpec
from compress.quant.records import StorageBits, UniformAffine, WeightRecord, quantize_rtn, register_record
from compress.recipe.storage import BLOCK_SCALES, ELEMENT_FLOATS, SCALES

FP8_BLOCK = 128  # DeepSeek-V3's weight blocks, what vLLM's block-FP8 kernels expect
GROUP_OF = {"nvfp4": ef.NVFP4_GROUP, "mxfp4": ef.MXFP4_GROUP}
FP32_SCALE_BITS = 32
NARROW_SCALE_BITS = 8  # FP8 E4M3 (NVFP4) and E8M0 (MXFP4) block scales


@dataclass(frozen=True)
class FloatSpec:
    """An element-float weight format: `format` fp8 | nvfp4 | mxfp4; `strategy` (fp8 only) tensor | channel | block."""

    format: str
    strategy: str = "group"

    def __post_init__(self) -> None:
        if self.format not in FLOAT_FORMATS:
            raise ValueError(f"element-float format must be one of {', '.join(FLOAT_FORMATS)}, got {self.format!r}")
        allowed = FP8_STRATEGIES if self.format == "fp8" else ("group",)
        if self.strategy not in allowed:
            raise ValueError(f"{self.format} scales are per {' | '.join(allowed)}, got strategy {self.strategy!r}")

    @property
    def bits(self) -> int:
        """Bits per element code."""
        return 8 if self.format == "fp8" else 4

    @property
    def group_size(self) -> int | None:
        return GROUP_OF.get(self.format)

    @property
    def label(self) -> str:
        """The name a bit plan and the allocator's candidates use: fp8 (per channel), fp8-tensor, fp8-block, nvfp4."""
        if self.format == "fp8":
            return "fp8" if self.strategy == "channel" else f"fp8-{self.strategy}"
        return self.format

    @classmethod
    def from_label(cls, label: str) -> FloatSpec:
        name, _, strategy = label.partition("-")
        return cls(name, strategy or ("channel" if name == "fp8" else "group"))

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "strategy": self.strategy, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> FloatSpec:
        return cls(str(described["format"]), str(described["strategy"]))


if TYPE_CHECKING:
    from compress.quant.gguf_records import GGUFSpec
    from compress.quant.lookup_records import LookupSpec

# GGUFSpec and LookupSpec by name: their modules build on this module's neighbours and are imported on demand
WeightFormat = Union[QuantSpec, FloatSpec, "GGUFSpec", "LookupSpec"]
"""What a quantizer rounds one weight matrix to: uniform integer codes, an element-float format, a GGUF type, or
per-row lookup tables."""

__all__ = ["FLOAT_LABELS", "ElementFloat", "FloatSpec", "WeightFormat", "format_from_description", "planned_bits",
           "quantize_float_rtn", "quantize_weight_rtn"]


def format_from_description(described: dict[str, Any]) -> WeightFormat:
    """The spec a `describe()` wrote (checkpoints, run state): float and GGUF specs carry a `format` key."""
    if str(described.get("format", "")).startswith("gguf:"):
        from compress.quant.gguf_records import GGUFSpec

        return GGUFSpec.from_description(described)
    if str(described.get("format", "")).startswith("lut:"):
        from compress.quant.lookup_records import LookupSpec

        return LookupSpec.from_description(described)
    return FloatSpec.from_description(described) if "format" in described else QuantSpec.from_description(described)


def planned_bits(rows: int, columns: int, spec: WeightFormat) -> StorageBits:
    """Bits of a (rows, columns) matrix stored in `spec`, before it is quantized: what the bit allocator budgets."""
    if isinstance(spec, QuantSpec):
        return UniformAffine.planned_bits(rows, columns, spec)
    from compress.quant.gguf_records import GGUFSpec, planned_gguf_bits

    if isinstance(spec, GGUFSpec):
        return planned_gguf_bits(rows, columns, spec)
    from compress.quant.lookup_records import LookupSpec, LookupTable

    if isinstance(spec, LookupSpec):
        return LookupTable.planned_bits(rows, columns, spec.bits)
    return StorageBits(codes=rows * columns * spec.bits, scales=_scale_bits(rows, columns, spec))


def _scale_bits(rows: int, columns: int, spec: FloatSpec) -> int:
    if spec.format == "fp8":
        count = {"tensor": 1, "channel": rows,
                 "block": math.ceil(rows / FP8_BLOCK) * math.ceil(columns / FP8_BLOCK)}[spec.strategy]
        return count * FP32_SCALE_BITS
    blocks = rows * math.ceil(columns / GROUP_OF[spec.format])
    return blocks * NARROW_SCALE_BITS + (FP32_SCALE_BITS if spec.format == "nvfp4" else 0)


# ---------------------------------------------------------------------------------------------------
# Scales and grids


def _block_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    """amax of every (block x block) tile of w (rows, columns), zero-padded at the edges: (row tiles, column tiles)."""
    rows, columns = w.shape
    padded = F.pad(w.abs(), (0, -columns % block, 0, -rows % block))
    return padded.unflatten(0, (-1, block)).unflatten(2, (-1, block)).amax(dim=(1, 3))


def float_scales(w: torch.Tensor, spec: FloatSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, global scale or None) of `w` (rows, columns, float32) in the layout `ElementFloat` stores."""
    if spec.format == "fp8":
        amax = {"tensor": lambda: w.abs().amax().reshape(1, 1), "channel": lambda: w.abs().amax(dim=1, keepdim=True),
                "block": lambda: _block_amax(w, FP8_BLOCK)}[spec.strategy]()
        return ef.fp8_scale(amax), None
    block_amax = ef.grouped(w, GROUP_OF[spec.format]).abs().amax(dim=-1)  # (rows, groups)
    if spec.format == "nvfp4":
        global_scale = ef.nvfp4_global_scale(w.abs().amax())
        return ef.nvfp4_block_scales(block_amax, global_scale), global_scale
    return ef.e8m0_scale(block_amax), None


def element_scales(spec: FloatSpec, scale: torch.Tensor, global_scale: torch.Tensor | None,
                   shape: tuple[int, int]) -> torch.Tensor:
    """The scale of every element, (rows, columns) float32 (or broadcastable to it for fp8 tensor/channel)."""
    rows, columns = shape
    if spec.format == "fp8":
        if spec.strategy != "block":
            return scale
        return scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :columns]
    per_block = scale if global_scale is None else scale / global_scale  # NVFP4: the order compressed-tensors divides in
    return per_block.repeat_interleave(GROUP_OF[spec.format], 1)


def round_to_grid(spec: FloatSpec, x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) on the format's element grid, float32."""
    return ef.round_to_fp8_e4m3(x) if spec.format == "fp8" else ef.round_to_fp4_e2m1(x)


def grid_codes(spec: FloatSpec, values: torch.Tensor) -> torch.Tensor:
    """uint8 codes of grid values: E4M3 bit patterns, or E2M1 nibbles."""
    return ef.fp8_e4m3_bits(values) if spec.format == "fp8" else ef.fp4_e2m1_codes(values)


def grid_values(spec: FloatSpec, codes: torch.Tensor) -> torch.Tensor:
    return ef.fp8_e4m3_from_bits(codes) if spec.format == "fp8" else ef.fp4_e2m1_values(codes)


def check_columns(columns: int, spec: FloatSpec) -> None:
    """NVFP4 / MXFP4 scale whole groups of columns: compressed-tensors and vLLM refuse a partial last group."""
    group = spec.group_size
    if group and columns % group:
        raise ValueError(f"{spec.format} needs in_features divisible by {group}, got {columns}")


# ---------------------------------------------------------------------------------------------------
# The record


@register_record
@dataclass
class ElementFloat(WeightRecord):
    """Element-float codes plus their scales for one weight matrix (see the module docstring for the layouts)."""

    kind: ClassVar[str] = "element_float"

    codes: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    spec: FloatSpec

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.codes.shape
        return rows, columns

    @property
    def stores(self) -> frozenset[str]:
        if self.spec.format == "fp8" and self.spec.strategy != "block":
            return frozenset({ELEMENT_FLOATS, SCALES})
        if self.spec.format == "nvfp4":  # FP8 block scales and the FP32 global scale
            return frozenset({ELEMENT_FLOATS, BLOCK_SCALES, SCALES})
        return frozenset({ELEMENT_FLOATS, BLOCK_SCALES})

    def element_scale(self) -> torch.Tensor:
        return element_scales(self.spec, self.scale, self.global_scale, self.shape)

    def dequantize(self) -> torch.Tensor:
        return grid_values(self.spec, self.codes) * self.element_scale()

    def storage_bits(self) -> StorageBits:
        return planned_bits(*self.shape, self.spec)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"codes": self.codes, "scale": self.scale}
        if self.global_scale is not None:
            tensors["global_scale"] = self.global_scale
        return tensors

    def metadata(self) -> dict[str, Any]:
        return self.spec.describe()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> ElementFloat:
        return cls(tensors["codes"], tensors["scale"], tensors.get("global_scale"), FloatSpec.from_description(metadata))

    def to(self, device: torch.device | str) -> ElementFloat:
        moved = None if self.global_scale is None else self.global_scale.to(device)
        return ElementFloat(self.codes.to(device), self.scale.to(device), moved, self.spec)

    def keep_zeros(self, mask: torch.Tensor) -> ElementFloat:
        """Pruned weights get code 0, which is +0.0 in both E4M3 and E2M1: exactly 0 whatever the scale."""
        codes = torch.where(mask.to(self.codes.device), self.codes, torch.zeros_like(self.codes))
        return ElementFloat(codes, self.scale, self.global_scale, self.spec)

    def describe(self) -> dict[str, Any]:
        return self.spec.describe()


def record_from_values(values: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
                       spec: FloatSpec) -> ElementFloat:
    """The record of grid values (rows, columns) that already sit on the element grid (before scaling)."""
    return ElementFloat(grid_codes(spec, values), scale, global_scale, spec)


def quantize_float_rtn(w: torch.Tensor, spec: FloatSpec) -> ElementFloat:
    """Round-to-nearest onto the format's grid, with the format's own scales (data-free)."""
    w = w.detach().float()
    check_columns(w.shape[1], spec)
    scale, global_scale = float_scales(w, spec)
    values = round_to_grid(spec, w / element_scales(spec, scale, global_scale, (w.shape[0], w.shape[1])))
    return record_from_values(values, scale, global_scale, spec)


def quantize_weight_rtn(w: torch.Tensor, spec: WeightFormat) -> WeightRecord:
    """Round-to-nearest in either kind of format: the data-free baseline, and GPTQ's recorded fallback."""
    from compress.quant.gguf_records import GGUFSpec, quantize_gguf_rtn

    if isinstance(spec, GGUFSpec):
        return quantize_gguf_rtn(w, spec)
    from compress.quant.lookup_records import LookupSpec, quantize_lookup

    if isinstance(spec, LookupSpec):  # the nearest entry of an unweighted k-means table: its "round to nearest"
        return quantize_lookup(w, spec)
    return quantize_float_rtn(w, spec) if isinstance(spec, FloatSpec) else quantize_rtn(w, spec)
