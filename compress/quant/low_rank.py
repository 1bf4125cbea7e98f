"""A quantized matrix plus a low-rank correction: W ~ Q(W) + B A (ZeroQuant-V2's LoRC, EoRA).

`LowRankCorrected` wraps any other record (the base: integer codes, GGUF blocks, ...) and two float16 factors,
B (out, rank) and A (rank, in), stored as they are counted: 16 bits per factor entry. It dequantizes to
base + B @ A, computed in float32 from the float16 factors, so what is evaluated is what a runtime computes from
the exported factors. Export formats that hold the base write it as usual and put the factors beside it as a PEFT
LoRA adapter (lora_B = B, lora_A = A, lora_alpha = rank so the scaling is 1; compress/export/adapters.py); dense
export writes the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from compress.recipe.errors import UserError
from compress.recipe.storage import LOW_RANK
from compress.quant.records import StorageBits, WeightRecord, register_record, restore_record, saved_form

FACTOR_BITS = 16  # the factors are float16, in memory and on disk
FACTOR_DTYPE = torch.float16
BASE_PREFIX = "base_"  # the base record's tensors, renamed (tensor names carry no dots)


@register_record
@dataclass
class LowRankCorrected(WeightRecord):
    """`base` plus `lora_b` (out, rank) @ `lora_a` (rank, in), both float16."""

    kind: ClassVar[str] = "low_rank_corrected"

    base: WeightRecord
    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __post_init__(self) -> None:
        rows, columns = self.base.shape
        rank = self.lora_a.shape[0]
        if self.lora_a.shape != (rank, columns) or self.lora_b.shape != (rows, rank):
            raise ValueError(f"low-rank factors {tuple(self.lora_b.shape)} @ {tuple(self.lora_a.shape)} do not make "
                             f"a {rows} x {columns} correction")
        self.lora_a = self.lora_a.to(FACTOR_DTYPE)
        self.lora_b = self.lora_b.to(FACTOR_DTYPE)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    @property
    def stores(self) -> frozenset[str]:
        return self.base.stores | {LOW_RANK}

    def correction(self) -> torch.Tensor:
        """B @ A in float32 (out, in)."""
        return self.lora_b.float() @ self.lora_a.float()

    def dequantize(self) -> torch.Tensor:
        base = self.base.dequantize()
        return base + self.correction().to(base.device)

    def storage_bits(self) -> StorageBits:
        return self.base.storage_bits() + StorageBits(low_rank=self.planned_factor_bits(*self.shape, self.rank))

    @staticmethod
    def planned_factor_bits(rows: int, columns: int, rank: int) -> int:
        return rank * (rows + columns) * FACTOR_BITS

    def to_tensors(self) -> dict[str, torch.Tensor]:
        base_tensors, _ = saved_form(self.base)
        return {**{BASE_PREFIX + name: t for name, t in base_tensors.items()},
                "lora_a": self.lora_a, "lora_b": self.lora_b}

    def metadata(self) -> dict[str, Any]:
        _, entry = saved_form(self.base)
        return {"base": entry}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> LowRankCorrected:
        base = restore_record(metadata["base"], lambda part: tensors[BASE_PREFIX + part])
        return cls(base, tensors["lora_a"], tensors["lora_b"])

    def to(self, device: torch.device | str) -> LowRankCorrected:
        return LowRankCorrected(self.base.to(device), self.lora_a.to(device), self.lora_b.to(device))

    def keep_zeros(self, mask: torch.Tensor) -> LowRankCorrected:
        raise UserError("a low-rank correction is dense, so pruned weights would not stay 0: leave `lorc` out of a "
                        "recipe that prunes")

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "low_rank": self.rank}
