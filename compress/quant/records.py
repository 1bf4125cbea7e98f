"""Weight records: what one compressed weight matrix stores, behind the one protocol every storage format implements.

A pass that compresses a linear's weight leaves a `WeightRecord` in `run.results.records[fqn]`. Everything downstream
asks the record, never takes it apart:

    shape                     (out_features, in_features)
    dequantize()              the float32 (out, in) matrix the compressed model computes with
    storage_bits()            `StorageBits`: bits per stored part (codes, scales, zero points, codebooks,
                              outliers) and their `total`; the report's `size` and the bit allocator count these
    stores                    the parts it stores, in the words of compress/recipe/storage.py; an export format
                              refuses a record holding a part it cannot ("... cannot hold a float zero point")
    to_tensors(), metadata()  its tensors (names without dots) and JSON-able settings; with the class's `kind`,
    from_tensors(t, m)        enough to rebuild it: layer checkpoints (--resume) and run state use these
    to(device)                the same record on `device`; a lazy run sheds records to `meta` (shapes only)
    keep_zeros(mask)          the record with every pruned weight (mask False) dequantizing to exactly 0
    describe()                the settings shown in the per-module report entry

Records register by `kind` (`@register_record`), so checkpoint and run-state restore find the class from the stored
`kind` alone; the engine, the report and the savers know no record class. `UniformAffine` (integer codes,
per-group scales, integer zero points: RTN, GPTQ, AWQ) is the first (formerly `QuantizedWeight`).

How other storage formats fit, each one new record class plus the pass producing it, and no engine change:
- float zero points (HQQ): codes, scale and a float16 zero per group; `stores` says FLOAT_ZERO_POINT, so the
  integer layouts (compressed-tensors, GPTQ) refuse it by the table in compress/recipe/storage.py instead of
  rounding the zero point; `storage_bits` counts 16-bit zero points; dense export writes it dequantized. An exact
  zero is not representable with integer codes, so `keep_zeros` keeps the mask as one more stored tensor (counted).
- per-row lookup tables (SqueezeLLM, k-means): index codes (out, in) plus a (out, 2^b) float16 codebook;
  `dequantize` gathers; bits = codes + `codebooks`; CODEBOOK in `stores`; `keep_zeros` reserves entry 0 as 0.0.
- element float formats with block scales (FP8 E4M3, MXFP4 with E8M0 scales per 32, NVFP4 with FP8 scales
  per 16 and one FP32 global scale): built, as `ElementFloat` in compress/quant/float_records.py. Element codes as
  uint8, block scales (+ the global one) as tensors; bits = 4 or 8 per element + `scales` at their stored width;
  ELEMENT_FLOATS and BLOCK_SCALES (or SCALES) in `stores`; floats hold 0 exactly, so `keep_zeros` sets those codes
  to the zero code.
- dense plus sparse outliers (SpQR, LLM.int8-style): an inner record plus outlier (index, value) tensors;
  `dequantize` = inner's + scatter; bits = inner's + `outliers`; tensors are the inner's under a prefix
  ("dense_codes", ...) plus "outlier_index"/"outlier_value", metadata nests the inner's kind and metadata;
  SPARSE_OUTLIERS in `stores`; `keep_zeros` passes the mask to the inner record and drops pruned outliers.
A format that gains a layout for one of these adds the part to its `FORMAT_HOLDS` entry and a writer branch.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch

from compress.quant.primitives import QuantSpec, codes_dtype, compute_qparams, dequantize_codes, group_bounds, quantize_codes
from compress.recipe.errors import UserError
from compress.recipe.storage import INTEGER_CODES, INTEGER_ZERO_POINTS, SCALES

SCALE_BITS = 16  # scales count as float16, whatever dtype we compute them in: what the export formats store


@dataclass(frozen=True)
class StorageBits:
    """Bits one record stores, per part; `total` is what the report's size and the bit allocator's budget count."""

    codes: int = 0
    scales: int = 0
    zero_points: int = 0
    codebooks: int = 0
    outliers: int = 0  # values and their positions
    low_rank: int = 0  # the factors of a low-rank correction (compress/quant/low_rank.py)

    @property
    def total(self) -> int:
        return sum(getattr(self, part.name) for part in dataclasses.fields(self))

    def __add__(self, other: StorageBits) -> StorageBits:
        return StorageBits(**{p.name: getattr(self, p.name) + getattr(other, p.name) for p in dataclasses.fields(self)})


Record = TypeVar("Record", bound="WeightRecord")


class WeightRecord(ABC):
    """One compressed weight matrix (out_features, in_features); see the module docstring for the protocol."""

    kind: ClassVar[str]  # the registry key stored beside its tensors

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def stores(self) -> frozenset[str]:
        """The parts this record stores (compress/recipe/storage.py's words): what an export format must hold."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """float32 (out, in), on the record's device."""

    @abstractmethod
    def storage_bits(self) -> StorageBits: ...

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by part name (no dots: savers prefix it with the module's name)."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """JSON-able settings that, with `to_tensors`, rebuild the record (`from_tensors`)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls: type[Record], tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Record: ...

    @abstractmethod
    def to(self: Record, device: torch.device | str) -> Record:
        """The same record with every tensor on `device` (`meta` keeps only shapes: enough for sizes and configs)."""

    @abstractmethod
    def keep_zeros(self: Record, mask: torch.Tensor) -> Record:
        """The record with every weight where `mask` (bool, out x in) is False dequantizing to exactly 0."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The settings the per-module report entry shows (JSON-able)."""


_RECORDS: dict[str, type[WeightRecord]] = {}
RecordClass = TypeVar("RecordClass", bound=type[WeightRecord])


def register_record(cls: RecordClass) -> RecordClass:
    """Class decorator: make `cls` restorable from its `kind` (checkpoints, run state)."""
    if _RECORDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"record kind {cls.kind!r} is registered twice ({_RECORDS[cls.kind].__qualname__} and "
                         f"{cls.__qualname__})")
    _RECORDS[cls.kind] = cls
    return cls


def record_class(kind: str) -> type[WeightRecord]:
    if kind not in _RECORDS:
        raise UserError(f"saved weights use record kind {kind!r}, which no loaded module registers (known: "
                        f"{', '.join(sorted(_RECORDS))}); import the plugin that defines it")
    return _RECORDS[kind]


def saved_form(record: WeightRecord) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The record's tensors, and the JSON entry that rebuilds it from them (`restore_record`)."""
    tensors = record.to_tensors()
    return tensors, {"kind": record.kind, "tensors": sorted(tensors), "metadata": record.metadata()}


def restore_record(entry: dict[str, Any], take: Callable[[str], torch.Tensor]) -> WeightRecord:
    """The record `saved_form` described by `entry`; `take(part)` returns that part's stored tensor."""
    if "kind" not in entry:  # saved before records had kinds: a bare uniform-affine spec, {bits, symmetric, ...}
        entry = {"kind": UniformAffine.kind, "tensors": ["codes", "scale", "zero"], "metadata": entry}
    cls = record_class(entry["kind"])
    return cls.from_tensors({part: take(part) for part in entry["tensors"]}, entry["metadata"])


@register_record
@dataclass
class UniformAffine(WeightRecord):
    """Integer codes plus per-group scales and integer zero points of one weight matrix (out_features, in_features).

    `codes` is int8 (symmetric, zero point 0) or uint8 (asymmetric); `scale`/`zero` are (rows, groups) float32,
    the zero points whole numbers. Dequantized: (code - zero) * scale, group by group (compress/quant/primitives.py).
    """

    kind: ClassVar[str] = "uniform_affine"

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.codes.shape
        return rows, columns

    @property
    def stores(self) -> frozenset[str]:
        return frozenset({INTEGER_CODES, SCALES} if self.spec.symmetric else {INTEGER_CODES, SCALES, INTEGER_ZERO_POINTS})

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

    def storage_bits(self) -> StorageBits:
        return self.planned_bits(*self.shape, self.spec)

    @staticmethod
    def planned_bits(rows: int, columns: int, spec: QuantSpec) -> StorageBits:
        """Bits of a (rows, columns) matrix quantized with `spec`, before it is: codes plus a 16-bit scale (and a
        `bits`-wide zero point if asymmetric) per row and group. The bit allocator budgets with this."""
        groups = rows * len(group_bounds(columns, spec))
        return StorageBits(codes=rows * columns * spec.bits, scales=groups * SCALE_BITS,
                           zero_points=0 if spec.symmetric else groups * spec.bits)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero}

    def metadata(self) -> dict[str, Any]:
        return self.spec.describe()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> UniformAffine:
        return cls(tensors["codes"], tensors["scale"], tensors["zero"], QuantSpec.from_description(metadata))

    def to(self, device: torch.device | str) -> UniformAffine:
        return UniformAffine(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.spec)

    def keep_zeros(self, mask: torch.Tensor) -> UniformAffine:
        """Pruned weights get the zero point as their code: (zero - zero) * scale is exactly 0."""
        columns = self.codes.shape[1]
        zero_per_column = self.zero.repeat_interleave(self.spec.group_size or columns, dim=1)[:, :columns]
        codes = torch.where(mask.to(self.codes.device), self.codes, zero_per_column.to(self.codes.dtype))
        return UniformAffine(codes, self.scale, self.zero, self.spec)

    def describe(self) -> dict[str, Any]:
        return self.spec.describe()


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> UniformAffine:
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
    return UniformAffine(
        codes=torch.cat(codes, dim=1).to(codes_dtype(spec)),
        scale=torch.cat(scales, dim=1),
        zero=torch.cat(zeros, dim=1),
        spec=spec,
    )


# The element-float records (FP8, NVFP4, MXFP4), GGUF blocks and low-rank corrections register on import; importing them here makes every built-in record
# kind restorable wherever records are (checkpoints, run state). Last, because that module builds on the above.
# GGUF blocks first: float_records imports gguf_records (GGUFSpec is one of the weight formats).
from compress.quant import gguf_records as _gguf_records  # noqa: E402,F401
from compress.quant import float_records as _float_records  # noqa: E402,F401
from compress.quant import low_rank as _low_rank  # noqa: E402,F401
from compress.quant import lookup_records as _lookup_records  # noqa: E402,F401
