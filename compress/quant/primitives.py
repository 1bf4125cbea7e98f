"""Uniform integer quantization of weight matrices: the primitives RTN, GPTQ and AWQ share.

Conventions (the compressed-tensors / GPTQ ones, so exported codes load in vLLM):
- symmetric: signed codes in [-2^(b-1), 2^(b-1)-1], zero point 0, scale = absmax / ((2^b - 1) / 2).
- asymmetric: unsigned codes in [0, 2^b-1], scale = (max - min) / (2^b - 1) over a range that always
  contains 0, zero point = round(-min / scale).
With these choices every element is reconstructed to within half a quantization step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerChannel:
    """One scale per output row."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per output row and per `size` consecutive input columns; the last group may be shorter."""

    size: int


Granularity = PerChannel | PerGroup


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    symmetric: bool = True
    granularity: Granularity = PerChannel()

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if isinstance(self.granularity, PerGroup) and self.granularity.size < 1:
            raise ValueError(f"group size must be positive, got {self.granularity.size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def group_size(self) -> int | None:
        return self.granularity.size if isinstance(self.granularity, PerGroup) else None

    def describe(self) -> dict[str, object]:
        return {"bits": self.bits, "symmetric": self.symmetric, "group_size": self.group_size}


def group_bounds(columns: int, spec: QuantSpec) -> list[tuple[int, int]]:
    """[start, end) column ranges of the quantization groups; the last one is shorter when size does not divide."""
    size = spec.group_size or columns
    return [(start, min(start + size, columns)) for start in range(0, columns, size)]


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` (rows, cols), computed over all of its columns."""
    w = w.float()
    if spec.symmetric:
        absmax = w.abs().amax(dim=1)
        scale = absmax / ((spec.qmax - spec.qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        # The range must contain 0 so that zeros (pruned weights, padding) stay exactly representable.
        wmin = w.amin(dim=1).clamp(max=0)
        wmax = w.amax(dim=1).clamp(min=0)
        scale = (wmax - wmin) / spec.qmax
        zero = torch.round(-wmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
    # An all-zero row would give scale 0; any positive scale reconstructs it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of `w` (rows, cols) for per-row `scale`/`zero` of shape (rows,) or (rows, 1)."""
    scale = scale.reshape(-1, 1)
    zero = zero.reshape(-1, 1)
    return torch.clamp(torch.round(w.float() / scale) + zero, spec.qmin, spec.qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero.reshape(-1, 1)) * scale.reshape(-1, 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize: the weights the quantized model computes with."""
    return dequantize_codes(quantize_codes(w, scale, zero, spec), scale, zero)


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group scales and zero points of one weight matrix (out_features, in_features).

    Kept for export: `codes` is int8 (symmetric) or uint8 (asymmetric); `scale`/`zero` are (rows, groups).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        rows, columns = self.codes.shape
        size = self.spec.group_size or columns
        full = columns // size * size
        parts = []
        if full:  # every whole group at once: (rows * groups, size) rows with one scale each
            blocks = dequantize_codes(self.codes[:, :full].reshape(-1, size), self.scale[:, : full // size],
                                      self.zero[:, : full // size])
            parts.append(blocks.reshape(rows, full))
        if full < columns:  # the shorter last group
            parts.append(dequantize_codes(self.codes[:, full:], self.scale[:, -1], self.zero[:, -1]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def storage_bits(self) -> int:
        """Bits to store this matrix: see `storage_bits`."""
        return storage_bits(self.codes.shape[0], self.codes.shape[1], self.spec)


def storage_bits(rows: int, columns: int, spec: QuantSpec) -> int:
    """Bits to store a (rows, columns) matrix quantized with `spec`: codes plus a 16-bit scale (and a `bits`-wide
    zero point if asymmetric) per row and group. The report's sizes and the bit allocator's budget both use this."""
    per_group = 16 + (0 if spec.symmetric else spec.bits)
    return rows * columns * spec.bits + rows * len(group_bounds(columns, spec)) * per_group


def codes_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.symmetric else torch.uint8


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight matrix (rows, cols), group by group.

    The whole groups are quantized in one go as a (rows * groups, size) matrix with a scale per row: the same
    element-wise arithmetic as a loop over the groups, hence the same codes, without a pass per group.
    """
    rows, columns = w.shape
    size = spec.group_size or columns
    full = columns // size * size
    codes, scales, zeros = [], [], []
    if full:
        blocks = w[:, :full].reshape(-1, size)
        scale, zero = compute_qparams(blocks, spec)
        codes.append(quantize_codes(blocks, scale, zero, spec).reshape(rows, full))
        scales.append(scale.reshape(rows, -1))
        zeros.append(zero.reshape(rows, -1))
    if full < columns:  # the shorter last group
        scale, zero = compute_qparams(w[:, full:], spec)
        codes.append(quantize_codes(w[:, full:], scale, zero, spec))
        scales.append(scale.reshape(rows, 1))
        zeros.append(zero.reshape(rows, 1))
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(codes_dtype(spec)),
        scale=torch.cat(scales, dim=1),
        zero=torch.cat(zeros, dim=1),
        spec=spec,
    )


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic symmetric per-token activation quantization (W8A8's 'A8'): one scale per row of the last dim."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).float() / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax) * scale).to(x.dtype)


def fake_quantize_per_tensor(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic symmetric per-tensor activation quantization: one scale for the whole batch."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax().float() / qmax
    scale = scale if scale > 0 else torch.ones_like(scale)
    return (torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax) * scale).to(x.dtype)
