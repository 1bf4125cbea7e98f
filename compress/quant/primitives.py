"""Uniform integer quantization of weight matrices: the primitives RTN, GPTQ and AWQ share (their record,
`UniformAffine`, and `quantize_rtn` are in compress/quant/records.py).

Conventions (the compressed-tensors / GPTQ ones, so exported codes load in vLLM):
- symmetric: signed codes in [-2^(b-1), 2^(b-1)-1], zero point 0, scale = absmax / ((2^b - 1) / 2).
- asymmetric: unsigned codes in [0, 2^b-1], scale = (max - min) / (2^b - 1) over a range that always
  contains 0, zero point = round(-min / scale).
With these choices every element is reconstructed to within half a quantization step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> QuantSpec:
        """The spec `describe` wrote (JSON in checkpoints and run state)."""
        group = described.get("group_size")
        return cls(int(described["bits"]), bool(described["symmetric"]), PerGroup(int(group)) if group else PerChannel())


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


def codes_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.symmetric else torch.uint8


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
