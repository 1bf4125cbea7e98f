"""Weights on a GGUF block type's grid (llama.cpp's Q4_0 ... Q6_K, compress/quant/gguf_types.py): the record, its
round-to-nearest with the type's own two-level scales, and the exact byte layout llama.cpp reads.

Scales first, codes second: per sub-block an ideal step (and minimum) is searched over a few clipped ranges,
weighted by the input importance when one is given (GPTQ passes the Hessian diagonal), then quantized onto the
type's grid (a float16 `d` per block times a small integer `sc` per sub-block; likewise `dmin` and `m`). With
those fixed, every weight's code is rounded on its sub-block's grid: here to nearest, in GPTQ with error
feedback (compressors/gptq.py `gptq_quantize_gguf`). The record keeps exactly what the block stores, so the
bytes `gguf_bytes()` writes dequantize (gguf-py, llama.cpp) to the very floats `dequantize()` returns.

Recipe example:

    passes:
      - rtn: {format: "gguf:q4_k"}
      - gptq: {format: "gguf:q6_k"}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from compress.quant.gguf_types import GGUF_TYPES, GGUFType, gguf_type
from compress.quant.records import StorageBits, WeightRecord, register_record
from compress.recipe.errors import UserError
from compress.recipe.storage import GGUF_BLOCKS

# Clipping factors of the range searched per sub-block (1.0 = min/max): llama.cpp's make_qkx2_quants searches
# a similar span of scales around the min/max one.
CLIP_FACTORS = tuple(1.0 - 0.025 * i for i in range(13))


@dataclass(frozen=True)
class GGUFSpec:
    """A GGUF block type as a weight format (`gguf:q4_k`); the float counterpart is FloatSpec."""

    type_name: str

    def __post_init__(self) -> None:
        if self.type_name not in GGUF_TYPES:
            gguf_type(f"gguf:{self.type_name}")  # raises, listing the known ones

    @property
    def gguf(self) -> GGUFType:
        return GGUF_TYPES[self.type_name]

    @property
    def label(self) -> str:
        return self.gguf.label

    @property
    def bits(self) -> int:
        return self.gguf.code_bits

    @property
    def group_size(self) -> int:
        """Input columns one block covers: a weight's width must be a multiple of it."""
        return self.gguf.block

    @classmethod
    def from_label(cls, label: str) -> GGUFSpec:
        return cls(gguf_type(label).name)

    def describe(self) -> dict[str, Any]:
        return {"format": self.label, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> GGUFSpec:
        return cls.from_label(str(described["format"]))


def check_gguf_columns(fqn: str, columns: int, spec: GGUFSpec) -> None:
    """A GGUF block covers `block` whole columns: a narrower remainder has no type to go in."""
    if columns % spec.group_size:
        raise UserError(f"{spec.label} stores blocks of {spec.group_size} input columns, and {fqn} has {columns}: "
                        f"no GGUF type of that block holds it; add it to the pass's `ignore` (it stays F16), or use "
                        "a 32-wide type (gguf:q4_0, q8_0, q4_1, q5_1) if {columns} is a multiple of 32")


# ---------------------------------------------------------------------------------------------------
# The record


@register_record
@dataclass
class GGUFBlocks(WeightRecord):
    """One matrix (rows, columns) in a GGUF block type: codes int8 (rows, columns); d, dmin float16 (rows, blocks);
    sc, m int16 (rows, sub-blocks). Dequantized: (d * sc) * q - (dmin * m), sub-block by sub-block."""

    kind: ClassVar[str] = "gguf_blocks"

    codes: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor
    m: torch.Tensor
    spec: GGUFSpec

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.codes.shape
        return rows, columns

    @property
    def stores(self) -> frozenset[str]:
        return frozenset({GGUF_BLOCKS})

    def step_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per element (rows, columns) float32: x = step * q - bias, in gguf-py's order of float32 operations."""
        return element_step_bias(self.d, self.sc, self.dmin, self.m, self.spec.gguf)

    def dequantize(self) -> torch.Tensor:
        step, bias = self.step_and_bias()
        return step * self.codes.float() - bias

    def storage_bits(self) -> StorageBits:
        return planned_gguf_bits(*self.shape, self.spec)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "d": self.d, "sc": self.sc, "dmin": self.dmin, "m": self.m}

    def metadata(self) -> dict[str, Any]:
        return self.spec.describe()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> GGUFBlocks:
        return cls(tensors["codes"], tensors["d"], tensors["sc"], tensors["dmin"], tensors["m"],
                   GGUFSpec.from_description(metadata))

    def to(self, device: torch.device | str) -> GGUFBlocks:
        return GGUFBlocks(self.codes.to(device), self.d.to(device), self.sc.to(device), self.dmin.to(device),
                          self.m.to(device), self.spec)

    def keep_zeros(self, mask: torch.Tensor) -> GGUFBlocks:
        """Symmetric types hold 0 exactly (code 0); the asymmetric ones put 0 at -bias + k * step, rarely on 0."""
        if self.spec.gguf.asymmetric:
            raise UserError(f"{self.spec.label} has a minimum per block, so pruned weights would not stay exactly 0; "
                            "a pruned model takes a symmetric GGUF type: gguf:q4_0, q8_0, q3_k or q6_k")
        codes = torch.where(mask.to(self.codes.device), self.codes, torch.zeros_like(self.codes))
        return GGUFBlocks(codes, self.d, self.sc, self.dmin, self.m, self.spec)

    def describe(self) -> dict[str, Any]:
        return self.spec.describe()

    def gguf_bytes(self) -> np.ndarray:
        """The tensor as llama.cpp stores it: uint8 (rows, blocks per row * bytes per block)."""
        return pack_blocks(self)


def planned_gguf_bits(rows: int, columns: int, spec: GGUFSpec) -> StorageBits:
    """The type's bytes per block, split into element codes and the rest (d, dmin, sub-scales, high bits)."""
    total = spec.gguf.bits(rows, columns) if columns % spec.group_size == 0 else \
        rows * -(-columns // spec.group_size) * spec.gguf.bytes_per_block * 8
    codes = rows * columns * spec.bits
    return StorageBits(codes=codes, scales=total - codes)


def element_step_bias(d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor, m: torch.Tensor,
                      gtype: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) step and bias from the block parts: the products gguf-py forms, d * sc and dmin * m."""
    per_block = gtype.block // gtype.sub
    step = d.float().repeat_interleave(per_block, dim=1) * sc.float()  # (rows, sub-blocks)
    bias = dmin.float().repeat_interleave(per_block, dim=1) * m.float()
    return step.repeat_interleave(gtype.sub, dim=1), bias.repeat_interleave(gtype.sub, dim=1)


# ---------------------------------------------------------------------------------------------------
# Choosing the grid: scales and minimums per sub-block, then on the type's two-level grid


@dataclass(frozen=True)
class GGUFGrid:
    """The fixed part of a GGUF matrix: d, dmin float16 (rows, blocks); sc, m int16 (rows, sub-blocks)."""

    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor
    m: torch.Tensor

    def step_and_bias(self, gtype: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
        return element_step_bias(self.d, self.sc, self.dmin, self.m, gtype)


def gguf_grid(w: torch.Tensor, spec: GGUFSpec, importance: torch.Tensor | None = None) -> GGUFGrid:
    """The grid of `w` (rows, columns): per sub-block the clipped range with the least importance-weighted squared
    error (`importance` (columns,), e.g. the Hessian diagonal; uniform if None), then d/sc and dmin/m on the type's grid."""
    gtype = spec.gguf
    rows, columns = w.shape
    subs = w.float().reshape(rows, columns // gtype.sub, gtype.sub)  # (rows, sub-blocks, sub)
    weight = torch.ones(columns) if importance is None else importance.float().cpu().clamp_min(0) + 1e-12
    weight = weight.to(w.device).reshape(1, columns // gtype.sub, gtype.sub)
    step, bias = _best_sub_ranges(subs, weight, gtype)  # (rows, sub-blocks) each
    return _two_level(step, bias, gtype)


def _sub_range(subs: torch.Tensor, factor: float, gtype: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and bias (rows, sub-blocks) of the range clipped by `factor`: x = step * q - bias."""
    low_q, high_q = gtype.q_range
    if not gtype.asymmetric:  # the element of largest magnitude lands on the most negative code, as llama.cpp's Q4_0
        extreme = subs.gather(-1, subs.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        return extreme * factor / low_q, torch.zeros_like(extreme)
    low = subs.amin(dim=-1) if gtype.float_min else subs.amin(dim=-1).clamp(max=0)  # k-quant minimums are >= 0
    high = subs.amax(dim=-1)
    low, high = low * factor, high * factor
    return (high - low) / high_q, -low


def _round_on(subs: torch.Tensor, step: torch.Tensor, bias: torch.Tensor, gtype: GGUFType) -> torch.Tensor:
    """Codes of `subs` (..., sub) on per-sub-block step/bias (...,): nearest grid point, clamped to the type's range."""
    low_q, high_q = gtype.q_range
    safe = torch.where(step == 0, torch.ones_like(step), step).unsqueeze(-1)
    codes = torch.round((subs + bias.unsqueeze(-1)) / safe).clamp(low_q, high_q)
    return torch.where(step.unsqueeze(-1) == 0, torch.zeros_like(codes).clamp(low_q, high_q), codes)


def _best_sub_ranges(subs: torch.Tensor, weight: torch.Tensor, gtype: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    best_step, best_bias = _sub_range(subs, CLIP_FACTORS[0], gtype)
    best_error = torch.full_like(best_step, float("inf"))
    for factor in CLIP_FACTORS:
        step, bias = _sub_range(subs, factor, gtype)
        codes = _round_on(subs, step, bias, gtype)
        error = (weight * (subs - (step.unsqueeze(-1) * codes - bias.unsqueeze(-1))) ** 2).sum(dim=-1)
        better = error < best_error
        best_step, best_bias = torch.where(better, step, best_step), torch.where(better, bias, best_bias)
        best_error = torch.where(better, error, best_error)
    return best_step, best_bias


def _two_level(step: torch.Tensor, bias: torch.Tensor, gtype: GGUFType) -> GGUFGrid:
    """Ideal per-sub-block step/bias (rows, sub-blocks) onto the type's float16 d / dmin and integer sc / m."""
    rows = step.shape[0]
    if gtype.sc_range is None:  # 32-wide types: d is the step itself; Q4_1 / Q5_1 keep a float16 minimum
        ones = torch.ones_like(step, dtype=torch.int16)
        dmin = bias.half() if gtype.float_min else torch.zeros_like(bias).half()
        return GGUFGrid(step.half(), ones, dmin, ones if gtype.float_min else torch.zeros_like(ones))
    per_block = gtype.block // gtype.sub
    d, sc = _integer_scales(step.reshape(rows, -1, per_block), gtype.sc_range)
    if gtype.m_range is None:
        zeros = torch.zeros_like(d)
        return GGUFGrid(d, sc.reshape(rows, -1), zeros, torch.zeros_like(sc).reshape(rows, -1))
    dmin, m = _integer_scales(bias.reshape(rows, -1, per_block), gtype.m_range)
    return GGUFGrid(d, sc.reshape(rows, -1), dmin, m.reshape(rows, -1))


def _integer_scales(values: torch.Tensor, int_range: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """values (rows, blocks, per block) as float16 d (rows, blocks) times integers in `int_range`.

    Signed ranges put the value of largest magnitude on the most negative integer (-32 for Q3_K, as llama.cpp
    does); unsigned ones (values >= 0) put the largest on the top integer."""
    low, high = int_range
    if low < 0:
        extreme = values.gather(-1, values.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        d = (extreme / low).half()
    else:
        d = (values.amax(dim=-1) / high).half()
    d_float = d.float().unsqueeze(-1)
    safe = torch.where(d_float == 0, torch.ones_like(d_float), d_float)
    ints = torch.where(d_float == 0, torch.zeros_like(values), torch.round(values / safe).clamp(low, high))
    return d, ints.to(torch.int16)


def gguf_record(codes: torch.Tensor, grid: GGUFGrid, spec: GGUFSpec) -> GGUFBlocks:
    return GGUFBlocks(codes.to(torch.int8), grid.d, grid.sc, grid.dmin, grid.m, spec)


def quantize_gguf_rtn(w: torch.Tensor, spec: GGUFSpec, importance: torch.Tensor | None = None) -> GGUFBlocks:
    """Round-to-nearest on the type's grid: the grid from `gguf_grid`, then every code to its nearest point."""
    w = w.detach().float()
    rows, columns = w.shape
    if columns % spec.group_size:
        raise ValueError(f"{spec.label} needs in_features divisible by {spec.group_size}, got {columns}")
    grid = gguf_grid(w, spec, importance)
    step, bias = grid.step_and_bias(spec.gguf)
    codes = round_codes(w, step, bias, spec.gguf)
    return gguf_record(codes, grid, spec)


def round_codes(w: torch.Tensor, step: torch.Tensor, bias: torch.Tensor, gtype: GGUFType,
                offsets: torch.Tensor | None = None,
                round_: Callable[[torch.Tensor], torch.Tensor] = torch.round) -> torch.Tensor:
    """Codes of w on a fixed per-element step/bias (same shape, or broadcastable): GPTQ calls it column by column.
    SignRound adds its learned `offsets` (in grid steps) before rounding, with a straight-through `round_`."""
    low_q, high_q = gtype.q_range
    safe = torch.where(step == 0, torch.ones_like(step), step)
    scaled = (w + bias) / safe
    codes = round_(scaled if offsets is None else scaled + offsets).clamp(low_q, high_q)
    return torch.where(step == 0, torch.zeros_like(codes).clamp(low_q, high_q), codes)


# ---------------------------------------------------------------------------------------------------
# Bytes as llama.cpp lays them out (the inverse of gguf-py's dequantize_blocks, type by type)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(u: np.ndarray, half: int) -> np.ndarray:
    """(n, chunks * 2 * half) values < 16 -> (n, chunks * half) bytes: low nibble the first half of each chunk."""
    n = u.shape[0]
    chunks = u.reshape(n, -1, 2, half)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, -1).astype(np.uint8)


def _bit_planes(u: np.ndarray, bits: int, width: int) -> np.ndarray:
    """(n, chunks * planes * width) values of `bits` bits -> (n, chunks * width) bytes: plane p at bit p * bits."""
    n = u.shape[0]
    planes = 8 // bits
    chunks = u.reshape(n, -1, planes, width).astype(np.uint16)
    shifts = (np.arange(planes, dtype=np.uint16) * bits).reshape(1, 1, planes, 1)
    return (chunks << shifts).sum(axis=2).astype(np.uint8).reshape(n, -1)


def _k_scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K's 12 bytes of eight 6-bit scales and mins (gguf-py `Q4_K.get_scale_min`, inverted)."""
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return np.concatenate([low, mid, high], axis=1).astype(np.uint8)


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of sixteen 6-bit scales (stored +32): low nibbles in 8 bytes, the top 2 bits in 4."""
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    high = _bit_planes((s >> 4) & 3, 2, 4)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def pack_blocks(record: GGUFBlocks) -> np.ndarray:
    gtype = record.spec.gguf
    rows, columns = record.shape
    n = rows * columns // gtype.block
    q = record.codes.cpu().numpy().astype(np.int16).reshape(n, gtype.block)
    u = (q - gtype.q_range[0]).astype(np.uint8) if gtype.name != "q8_0" else q.astype(np.int8).view(np.uint8)
    d = _f16_bytes(record.d.cpu().numpy().reshape(n))
    dmin = _f16_bytes(record.dmin.cpu().numpy().reshape(n))
    sc = record.sc.cpu().numpy().astype(np.int16).reshape(n, -1)
    m = record.m.cpu().numpy().astype(np.int16).reshape(n, -1)
    name = gtype.name
    if name == "q8_0":
        parts = [d, u]
    elif name == "q4_0":
        parts = [d, _nibbles(u, 16)]
    elif name == "q4_1":
        parts = [d, _f16_bytes(-record.dmin.cpu().numpy().reshape(n)), _nibbles(u, 16)]
    elif name == "q5_1":
        high_bits = np.packbits((u >> 4) & 1, axis=-1, bitorder="little")
        parts = [d, _f16_bytes(-record.dmin.cpu().numpy().reshape(n)), high_bits, _nibbles(u & 0xF, 16)]
    elif name == "q2_k":
        parts = [(sc | (m << 4)).astype(np.uint8), _bit_planes(u, 2, 32), d, dmin]
    elif name == "q3_k":
        parts = [_bit_planes(u >> 2, 1, 32), _bit_planes(u & 3, 2, 32), _q3_k_scales((sc + 32).astype(np.uint8)), d]
    elif name == "q4_k":
        parts = [d, dmin, _k_scales_6bit(sc.astype(np.uint8), m.astype(np.uint8)), _nibbles(u, 32)]
    elif name == "q5_k":
        parts = [d, dmin, _k_scales_6bit(sc.astype(np.uint8), m.astype(np.uint8)), _bit_planes(u >> 4, 1, 32),
                 _nibbles(u & 0xF, 32)]
    elif name == "q6_k":
        parts = [_nibbles(u & 0xF, 64), _bit_planes(u >> 4, 2, 32), sc.astype(np.int8).view(np.uint8), d]
    else:  # pragma: no cover - GGUF_TYPES and this table are kept together
        raise ValueError(f"no packer for {name}")
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == gtype.bytes_per_block, (name, blocks.shape)
    return blocks.reshape(rows, -1)
