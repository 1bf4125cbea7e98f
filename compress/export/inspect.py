"""`compress inspect CHECKPOINT`: what a saved checkpoint holds, module by module, read from its files alone.

Reads safetensors headers (dtype, shape, byte ranges) and config.json's `quantization_config`; decodes
only the small `weight_shape` tensors and, for sparsity, each module's codes. Totals itemise the bytes a
format adds beyond codes + scales (+ zero points): the safetensors header, shape/index tensors
(`weight_shape`, `g_idx`), zero points the GPTQ layout stores even for symmetric codes, and packing padding.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from compress.recipe.errors import UserError

DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
              "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}
CONFIG_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}


@dataclass
class ModuleRow:
    module: str
    format: str
    bits: float | None
    group_size: int | None
    parameters: int
    bytes: int
    sparsity: float | None


@dataclass
class CheckpointSummary:
    path: str
    format: str
    original_dtype: str
    modules: list[ModuleRow]
    totals: dict[str, Any] = field(default_factory=dict)
    overhead: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header bytes including its 8-byte length, tensor entries) of a safetensors file, without loading data."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def _tensor_bytes(entry: dict[str, Any]) -> int:
    start, end = entry["data_offsets"]
    return int(end - start)


def _numel(entry: dict[str, Any]) -> int:
    count = 1
    for dim in entry["shape"]:
        count *= int(dim)
    return count


def _group_by_module(header: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    modules: dict[str, dict[str, dict[str, Any]]] = {}
    for name, entry in header.items():
        module, _, local = name.rpartition(".")
        modules.setdefault(module, {})[local] = entry
    return modules


def _ct_scheme_of(module: str, qconfig: dict[str, Any]) -> dict[str, Any] | None:
    for group in qconfig.get("config_groups", {}).values():
        if module in group.get("targets", []):
            return dict(group)
    return None


def _zero_fraction(values: torch.Tensor, zero: torch.Tensor | int = 0) -> float:
    return round(float((values == zero).float().mean()), 6)


class _Reader:
    """Per-module rows for one safetensors file of a checkpoint in `fmt`."""

    def __init__(self, path: Path, fmt: str, qconfig: dict[str, Any], original_bits: int):
        self.path, self.fmt, self.qconfig, self.original_bits = path, fmt, qconfig, original_bits
        self.overhead = {"shape_and_index_tensors": 0, "stored_symmetric_zero_points": 0, "packing_padding": 0}

    def rows(self, header: dict[str, Any]) -> list[ModuleRow]:
        rows = []
        with safe_open(str(self.path), framework="pt") as handle:
            for module, tensors in _group_by_module(header).items():
                if "weight_packed" in tensors or ("weight" in tensors and "weight_scale" in tensors):
                    rows.append(self._compressed_tensors(module, tensors, handle))
                elif "qweight" in tensors:
                    rows.append(self._gptq(module, tensors))
                else:
                    rows += self._plain(module, tensors, handle)
        return rows

    def _compressed_tensors(self, module: str, tensors: dict[str, Any], handle: Any) -> ModuleRow:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        scheme = _ct_scheme_of(module, self.qconfig) or {}
        weights = scheme.get("weights") or {}
        bits = int(weights.get("num_bits", 8))
        if "weight_packed" in tensors:
            shape = [int(v) for v in handle.get_tensor(f"{module}.weight_shape").tolist()]
            codes = unpack_from_int32(handle.get_tensor(f"{module}.weight_packed"), bits, torch.Size(shape))
            self.overhead["shape_and_index_tensors"] += _tensor_bytes(tensors["weight_shape"])
            self.overhead["packing_padding"] += _tensor_bytes(tensors["weight_packed"]) - shape[0] * shape[1] * bits // 8
            fmt = "pack-quantized"
        else:
            codes = handle.get_tensor(f"{module}.weight")
            fmt = "int-quantized"
        sparsity = _zero_fraction(codes) if weights.get("symmetric", True) else None
        return ModuleRow(module, fmt, bits, weights.get("group_size"), codes.numel(),
                         sum(_tensor_bytes(e) for e in tensors.values()), sparsity)

    def _gptq(self, module: str, tensors: dict[str, Any]) -> ModuleRow:
        bits = int(self.qconfig["bits"])
        packed_rows, out_features = tensors["qweight"]["shape"]
        parameters = packed_rows * (32 // bits) * out_features
        self.overhead["shape_and_index_tensors"] += _tensor_bytes(tensors["g_idx"])
        if self.qconfig.get("sym", True):
            self.overhead["stored_symmetric_zero_points"] += _tensor_bytes(tensors["qzeros"])
        group_size = self.qconfig.get("group_size")
        return ModuleRow(module, "gptq", bits, None if group_size == -1 else group_size, parameters,
                         sum(_tensor_bytes(e) for e in tensors.values()), None)

    def _plain(self, module: str, tensors: dict[str, Any], handle: Any) -> list[ModuleRow]:
        rows = []
        for local, entry in tensors.items():
            name = f"{module}.{local}" if module else local
            values = handle.get_tensor(name) if local == "weight" else None
            sparsity = _zero_fraction(values) if values is not None else None
            fmt = "bitsandbytes" if self.fmt == "bitsandbytes" and entry["dtype"] == "U8" else f"dense {entry['dtype']}"
            rows.append(ModuleRow(name, fmt, DTYPE_BITS.get(entry["dtype"]), None, _numel(entry), _tensor_bytes(entry),
                                  sparsity))
        return rows


def checkpoint_format(config: dict[str, Any]) -> str:
    method = str((config.get("quantization_config") or {}).get("quant_method"))
    return {"compressed-tensors": "compressed-tensors", "gptq": "gptq", "bitsandbytes": "bitsandbytes"}.get(method, "dense")


def inspect_checkpoint(folder: Path) -> CheckpointSummary:
    """Module table plus totals: parameters, bytes on disk, effective bits per weight, ratio vs the original dtype."""
    config_path = folder / "config.json"
    files = sorted(folder.glob("*.safetensors"))
    if not config_path.is_file() or not files:
        raise UserError(f"{folder} is not a checkpoint folder (needs config.json and *.safetensors)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fmt = checkpoint_format(config)
    qconfig = config.get("quantization_config") or {}
    original_dtype = _original_dtype(folder, config)
    original_bits = CONFIG_DTYPE_BITS.get(original_dtype, 16)
    rows: list[ModuleRow] = []
    header_bytes = 0
    overhead: dict[str, int] = {}
    for path in files:
        size, header = read_header(path)
        header_bytes += size
        reader = _Reader(path, fmt, qconfig, original_bits)
        rows += reader.rows(header)
        for key, value in reader.overhead.items():
            overhead[key] = overhead.get(key, 0) + value
    overhead = {"safetensors_header": header_bytes, **overhead}
    disk = sum(p.stat().st_size for p in files)
    parameters = sum(row.parameters for row in rows if row.format != "dense I64")
    totals = {
        "parameters": parameters,
        "bytes_on_disk": disk,
        "effective_bits_per_weight": round(8 * disk / parameters, 4) if parameters else None,
        "original_bytes": parameters * original_bits // 8,
        "compression_ratio": round(parameters * original_bits / (8 * disk), 4) if disk else None,
        "overhead_bytes": sum(overhead.values()),
    }
    return CheckpointSummary(str(folder), fmt, original_dtype, rows, totals, overhead)


def _original_dtype(folder: Path, config: dict[str, Any]) -> str:
    """The precision the model had before compression: from the run report when the export carries one."""
    report = folder / "compress_report.json"
    if report.is_file():
        size = json.loads(report.read_text(encoding="utf-8")).get("size") or {}
        if size.get("reference_dtype"):
            return str(size["reference_dtype"])
    return str(config.get("dtype") or config.get("torch_dtype") or "float16")
