"""Non-uniform grids and sparse outliers (SqueezeLLM's dense-and-sparse decomposition, Kim et al. 2023).

`LookupTable`: every row of a matrix has its own table of 2^b float16 values (a codebook); each weight stores the
b-bit index of its entry. Dequantized: table[row, index]. Bits: b per weight plus 16 x 2^b per row.

`WithOutliers`: any record plus a few weights kept exactly (float16) at their positions, replacing what the inner
record gives there. Bits: the inner record's plus 16 (value) + 32 (flat position) per outlier, which is what a
coordinate list stores; a CSR layout would store less, so the count is an upper bound of the format's cost.

No runtime format we write lays these out (compressed-tensors and GPTQ hold integer grids only), so the export
formats refuse them except `dense`, which writes the dequantized weights: the report says the file is dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from compress.quant.config import LUT_LABELS
from compress.recipe.errors import UserError
from compress.recipe.storage import CODEBOOK, SPARSE_OUTLIERS
from compress.quant.records import StorageBits, WeightRecord, register_record, restore_record, saved_form

TABLE_BITS = 16  # codebook entries are float16
OUTLIER_VALUE_BITS = 16
OUTLIER_POSITION_BITS = 32  # a flat index into (rows x columns)
INNER_PREFIX = "inner_"
CHUNK_ELEMENTS = 1 << 24  # rows x columns x entries of the k-means distance table held at once (64 MiB of float32)
KMEANS_ITERS = 30  # Lloyd rounds: the assignment has settled by then on LLM weight rows


@dataclass(frozen=True)
class LookupSpec:
    """A per-row table of 2^bits float16 entries: what a bit plan's `lut:3` names (one of WeightFormat)."""

    bits: int

    @property
    def label(self) -> str:
        return f"lut:{self.bits}"

    @classmethod
    def from_label(cls, label: str) -> LookupSpec:
        if label not in LUT_LABELS:
            raise UserError(f"unknown lookup-table format {label!r}; choose one of {', '.join(LUT_LABELS)}")
        return cls(int(label.removeprefix("lut:")))

    def describe(self) -> dict[str, Any]:
        return {"format": self.label, "bits": self.bits}

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> LookupSpec:
        return cls.from_label(str(described["format"]))


def _nearest(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index (rows, columns) of each weight's nearest entry in its row's `table` (rows, k), chunked over rows."""
    rows, columns = w.shape
    step = max(1, CHUNK_ELEMENTS // max(1, columns * table.shape[1]))
    parts = [(w[r:r + step, :, None] - table[r:r + step, None, :]).abs().argmin(dim=-1) for r in range(0, rows, step)]
    return torch.cat(parts)


def weighted_kmeans_rows(w: torch.Tensor, importance: torch.Tensor, bits: int, iters: int = KMEANS_ITERS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (rows, columns) and tables (rows, 2^bits) of `w` by k-means per row, each weight counted with its
    `importance` ((rows, columns) or (columns,), >= 0), from the row's quantiles (Lloyd's iterations).

    The tables are rounded to float16 (what is stored) before the last assignment, so the codes are the nearest
    entries of the stored table.
    """
    w = w.float()
    weight = (importance if importance.dim() == 2 else importance.expand_as(w)).float()
    k = 1 << bits
    quantiles = (torch.arange(k, dtype=torch.float32, device=w.device) + 0.5) / k
    table = torch.quantile(w, quantiles, dim=1).T.contiguous()  # (rows, k)
    for _ in range(iters):
        codes = _nearest(w, table)
        mass = torch.zeros_like(table).scatter_add_(1, codes, weight)
        moment = torch.zeros_like(table).scatter_add_(1, codes, weight * w)
        table = torch.where(mass > 0, moment / mass.clamp_min(torch.finfo(torch.float32).tiny), table)
    table = table.to(torch.float16).float()
    return _nearest(w, table), table


def quantize_lookup(w: torch.Tensor, spec: LookupSpec, importance: torch.Tensor | None = None,
                    iters: int = KMEANS_ITERS) -> LookupTable:
    """`w` (rows, columns) onto per-row k-means tables; every weight counts alike without `importance`."""
    weights = torch.ones(w.shape[1], device=w.device) if importance is None else importance
    codes, table = weighted_kmeans_rows(w, weights, spec.bits, iters)
    return LookupTable(codes, table, spec.bits)


@register_record
@dataclass
class LookupTable(WeightRecord):
    """`codes` uint8 (rows, columns) indexing `table` float16 (rows, 2^bits)."""

    kind: ClassVar[str] = "lookup_table"

    codes: torch.Tensor
    table: torch.Tensor
    bits: int

    def __post_init__(self) -> None:
        self.table = self.table.to(torch.float16)
        self.codes = self.codes.to(torch.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.codes.shape
        return rows, columns

    @property
    def stores(self) -> frozenset[str]:
        return frozenset({CODEBOOK})

    def dequantize(self) -> torch.Tensor:
        return torch.gather(self.table.float(), 1, self.codes.long())

    def storage_bits(self) -> StorageBits:
        return self.planned_bits(*self.shape, self.bits)

    @staticmethod
    def planned_bits(rows: int, columns: int, bits: int) -> StorageBits:
        return StorageBits(codes=rows * columns * bits, codebooks=rows * (1 << bits) * TABLE_BITS)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "table": self.table}

    def metadata(self) -> dict[str, Any]:
        return {"bits": self.bits}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> LookupTable:
        return cls(tensors["codes"], tensors["table"], int(metadata["bits"]))

    def to(self, device: torch.device | str) -> LookupTable:
        return LookupTable(self.codes.to(device), self.table.to(device), self.bits)

    def keep_zeros(self, mask: torch.Tensor) -> LookupTable:
        raise UserError("a per-row lookup table need not hold 0, so pruned weights would not stay 0: prune after "
                        "choosing another quantizer, or leave pruning out")

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "grid": "per-row lookup table"}


@register_record
@dataclass
class WithOutliers(WeightRecord):
    """`inner` with the weights at flat positions `index` (int64) replaced by `value` (float16)."""

    kind: ClassVar[str] = "with_outliers"

    inner: WeightRecord
    index: torch.Tensor
    value: torch.Tensor

    def __post_init__(self) -> None:
        self.index = self.index.to(torch.int64)
        self.value = self.value.to(torch.float16)

    @property
    def outliers(self) -> int:
        return int(self.index.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    @property
    def stores(self) -> frozenset[str]:
        return self.inner.stores | {SPARSE_OUTLIERS}

    def dequantize(self) -> torch.Tensor:
        dense = self.inner.dequantize()
        flat = dense.reshape(-1)
        flat[self.index.to(flat.device)] = self.value.to(flat.device).float()
        return dense

    def storage_bits(self) -> StorageBits:
        return self.inner.storage_bits() + StorageBits(outliers=self.outliers * (OUTLIER_VALUE_BITS + OUTLIER_POSITION_BITS))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        inner, _ = saved_form(self.inner)
        return {**{INNER_PREFIX + name: t for name, t in inner.items()}, "outlier_index": self.index,
                "outlier_value": self.value}

    def metadata(self) -> dict[str, Any]:
        return {"inner": saved_form(self.inner)[1]}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> WithOutliers:
        inner = restore_record(metadata["inner"], lambda part: tensors[INNER_PREFIX + part])
        return cls(inner, tensors["outlier_index"], tensors["outlier_value"])

    def to(self, device: torch.device | str) -> WithOutliers:
        return WithOutliers(self.inner.to(device), self.index.to(device), self.value.to(device))

    def keep_zeros(self, mask: torch.Tensor) -> WithOutliers:
        kept = mask.reshape(-1).to(self.index.device)[self.index]
        return WithOutliers(self.inner.keep_zeros(mask), self.index[kept], self.value[kept])

    def describe(self) -> dict[str, Any]:
        rows, columns = self.shape
        return {**self.inner.describe(), "outliers": self.outliers,
                "outlier_fraction": round(self.outliers / (rows * columns), 6)}
