"""`compress inspect CHECKPOINT`: what a saved checkpoint holds, module by module, read from its files alone.

Reads safetensors headers (dtype, shape, byte ranges) and config.json's `quantization_config`; decodes
only the small `weight_shape` tensors and bitsandbytes' JSON quant states and, for sparsity, each module's codes.
Totals itemise the bytes a format adds beyond what the run report counts (codes + 16-bit scales (+ zero points),
bitsandbytes' stored tensors, everything else at the checkpoint's precision): the safetensors header, shape/index
tensors (`weight_shape`, `g_idx`), zero points the GPTQ layout stores even for symmetric codes, packing padding,
and integer layouts' scales stored wider than 16 bits. Element-float layouts (float-quantized FP8, nvfp4- and
mxfp4-pack-quantized) add nothing: the report counts their scales at the width they are stored at (float32 FP8
scales, FP8 / E8M0 block scales, NVFP4's float32 global scale). So `bytes` (on disk minus that overhead) is the
report's `size.bytes` for an export in the run's own layout, and `bits_per_weight` / `quantized_bits_per_weight`
are the report's too.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from compress.quant import bnb_layout
from compress.quant.records import SCALE_BITS
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
    overhead_bytes: int = 0  # of `bytes`, what the format adds beyond what the run report counts (see the totals)
    activations: str | None = None  # how a runtime quantizes this linear's input (`input_activations`), if it does


@dataclass
class CheckpointSummary:
    path: str
    format: str
    original_dtype: str
    modules: list[ModuleRow]
    totals: dict[str, Any] = field(default_factory=dict)
    overhead: dict[str, int] = field(default_factory=dict)
    kv_cache: str | None = None  # the config's `kv_cache_scheme`, in words; its k_scale/v_scale rows are in `modules`

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
        module, local = bnb_layout.split_name(name)
        modules.setdefault(module, {})[local] = entry
    return modules


def _ct_scheme_of(module: str, qconfig: dict[str, Any]) -> dict[str, Any] | None:
    for group in qconfig.get("config_groups", {}).values():
        if module in group.get("targets", []):
            return dict(group)
    return None


def scheme_text(args: dict[str, Any] | None) -> str | None:
    """A compressed-tensors quantization args entry (input activations, KV cache) in words: "fp8 dynamic per token"."""
    if not args:
        return None
    kind = "fp8" if args.get("type") == "float" and args.get("num_bits") == 8 else (
        "fp4" if args.get("type") == "float" else f"int{args.get('num_bits')}")
    timing = {True: "dynamic", "local": "dynamic with a static global scale"}.get(args.get("dynamic"), "static")
    group = f" of {args['group_size']}" if args.get("group_size") else ""
    return f"{kind} {timing} per {args.get('strategy')}{group}"


def _with_activations(row: ModuleRow, scheme: dict[str, Any]) -> ModuleRow:
    row.activations = scheme_text(scheme.get("input_activations"))
    return row


def _zero_fraction(values: torch.Tensor, zero: torch.Tensor | int = 0) -> float:
    return round(float((values == zero).float().mean()), 6)


class _Reader:
    """Per-module rows for one safetensors file of a checkpoint in `fmt`."""

    def __init__(self, path: Path, fmt: str, qconfig: dict[str, Any], sparsity: bool):
        self.path, self.fmt, self.qconfig, self.sparsity = path, fmt, qconfig, sparsity
        self.overhead = {"shape_and_index_tensors": 0, "stored_symmetric_zero_points": 0, "packing_padding": 0,
                         "scales_beyond_16_bits": 0}

    def _add(self, kind: str, count: int) -> int:
        self.overhead[kind] += count
        return count

    def rows(self, header: dict[str, Any]) -> list[ModuleRow]:
        rows = []
        with safe_open(str(self.path), framework="pt") as handle:
            for module, tensors in _group_by_module(header).items():
                # a bias stays in the checkpoint's precision beside the quantized weight: a row of its own
                weight = {local: entry for local, entry in tensors.items() if local != "bias"}
                rest = {local: entry for local, entry in tensors.items() if local == "bias"}
                if "weight_packed" in weight or ("weight" in weight and "weight_scale" in weight):
                    rows.append(self._compressed_tensors(module, weight, handle))
                elif "qweight" in weight:
                    rows.append(self._gptq(module, weight))
                elif bnb_layout.is_quantized(weight):
                    rows += self._bitsandbytes(module, weight, handle)
                else:
                    rest = tensors
                rows += self._plain(module, rest, handle)
        return rows

    def _compressed_tensors(self, module: str, tensors: dict[str, Any], handle: Any) -> ModuleRow:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        scheme = _ct_scheme_of(module, self.qconfig) or {}
        weights = scheme.get("weights") or {}
        if weights.get("type") == "float":
            return _with_activations(self._element_float(module, tensors, handle, scheme), scheme)
        bits = int(weights.get("num_bits", 8))
        overhead = self._add("scales_beyond_16_bits", _beyond_16_bits(tensors["weight_scale"]))
        if "weight_packed" in tensors:
            shape = [int(v) for v in handle.get_tensor(f"{module}.weight_shape").tolist()]
            codes = (unpack_from_int32(handle.get_tensor(f"{module}.weight_packed"), bits, torch.Size(shape))
                     if self.sparsity else None)
            overhead += self._add("shape_and_index_tensors", _tensor_bytes(tensors["weight_shape"]))
            overhead += self._add("packing_padding", _tensor_bytes(tensors["weight_packed"]) - shape[0] * shape[1] * bits // 8)
            if "weight_zero_point" in tensors:  # (rows, groups) zero points packed along the rows
                groups = _numel(tensors["weight_scale"])
                overhead += self._add("packing_padding", _tensor_bytes(tensors["weight_zero_point"]) - groups * bits // 8)
            fmt = "pack-quantized"
        else:
            shape = tensors["weight"]["shape"]
            codes = handle.get_tensor(f"{module}.weight") if self.sparsity else None
            fmt = "int-quantized"
        sparsity = _zero_fraction(codes) if codes is not None and weights.get("symmetric", True) else None
        row = ModuleRow(module, fmt, bits, weights.get("group_size"), int(shape[0]) * int(shape[1]),
                        sum(_tensor_bytes(e) for e in tensors.values()), sparsity, overhead)
        return _with_activations(row, scheme)

    def _element_float(self, module: str, tensors: dict[str, Any], handle: Any, scheme: dict[str, Any]) -> ModuleRow:
        """FP8 (float8_e4m3fn weights) or NVFP4 / MXFP4 (two E2M1 codes per byte): every byte is counted as stored."""
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

        weights = scheme.get("weights") or {}
        if "weight_packed" in tensors:
            rows, half = tensors["weight_packed"]["shape"]
            shape, bits = (int(rows), 2 * int(half)), 4
            codes = (unpack_fp4_from_uint8(handle.get_tensor(f"{module}.weight_packed"), *shape, dtype=torch.float32)
                     if self.sparsity else None)
            fmt = str(scheme.get("format") or "fp4-pack-quantized")
        else:
            shape, bits = (int(tensors["weight"]["shape"][0]), int(tensors["weight"]["shape"][1])), 8
            codes = handle.get_tensor(f"{module}.weight").float() if self.sparsity else None
            fmt = f"{scheme.get('format') or 'float-quantized'} ({weights.get('strategy')})"
        sparsity = _zero_fraction(codes) if codes is not None else None
        return ModuleRow(module, fmt, bits, weights.get("group_size"), shape[0] * shape[1],
                         sum(_tensor_bytes(e) for e in tensors.values()), sparsity)

    def _gptq(self, module: str, tensors: dict[str, Any]) -> ModuleRow:
        bits = int(self.qconfig["bits"])
        packed_rows, out_features = tensors["qweight"]["shape"]
        parameters = packed_rows * (32 // bits) * out_features
        overhead = self._add("shape_and_index_tensors", _tensor_bytes(tensors["g_idx"]))
        if self.qconfig.get("sym", True):
            overhead += self._add("stored_symmetric_zero_points", _tensor_bytes(tensors["qzeros"]))
        group_size = self.qconfig.get("group_size")
        return ModuleRow(module, "gptq", bits, None if group_size == -1 else group_size, parameters,
                         sum(_tensor_bytes(e) for e in tensors.values()), None, overhead)

    def _bitsandbytes(self, module: str, tensors: dict[str, Any], handle: Any) -> list[ModuleRow]:
        """One row for the quantized weight (every tensor compress/quant/bnb_layout.py names), one per other tensor."""
        parts = {local: entry for local, entry in tensors.items() if bnb_layout.part_of(local) is not None}
        states = [local for local in parts if local.startswith(bnb_layout.QUANT_STATE)]
        if states:  # 4-bit: the codes are packed two per byte; the JSON state has the weight's shape and block size
            state = bnb_layout.quant_state_json(bytes(handle.get_tensor(f"{module}.{states[0]}").tolist()))
            shape, bits, group = [int(d) for d in state["shape"]], 4, state.get("blocksize")
            fmt = f"bitsandbytes {state.get('quant_type', '4-bit')}"
        else:  # LLM.int8(): int8 codes (out, in), one float32 scale per row
            shape, bits, group, fmt = tensors["weight"]["shape"], 8, None, "bitsandbytes int8"
        row = ModuleRow(module, fmt, bits, group, shape[0] * shape[1], sum(_tensor_bytes(e) for e in parts.values()), None)
        return [row] + self._plain(module, {k: v for k, v in tensors.items() if k not in parts}, handle)

    def _plain(self, module: str, tensors: dict[str, Any], handle: Any) -> list[ModuleRow]:
        rows = []
        for local, entry in tensors.items():
            name = f"{module}.{local}" if module else local
            values = handle.get_tensor(name) if local == "weight" and self.sparsity else None
            sparsity = _zero_fraction(values) if values is not None else None
            rows.append(ModuleRow(name, f"dense {entry['dtype']}", DTYPE_BITS.get(entry["dtype"]), None, _numel(entry),
                                  _tensor_bytes(entry), sparsity))
        return rows


def _beyond_16_bits(entry: dict[str, Any]) -> int:
    """Bytes a scale tensor stores beyond the 16 bits per scale the run report counts (float32 scales)."""
    return max(0, (DTYPE_BITS[entry["dtype"]] - SCALE_BITS) * _numel(entry) // 8)


def checkpoint_format(config: dict[str, Any]) -> str:
    method = str((config.get("quantization_config") or {}).get("quant_method"))
    return {"compressed-tensors": "compressed-tensors", "gptq": "gptq", "bitsandbytes": "bitsandbytes"}.get(method, "dense")


def inspect_checkpoint(folder: Path, *, sparsity: bool = True) -> CheckpointSummary:
    """Module table plus totals: parameters, bytes, bits per weight, ratio vs the original model.

    `sparsity` decodes every weight to count its zeros (reads the whole checkpoint); without it only the headers and
    the small shape / quant-state tensors are read.
    """
    config_path = folder / "config.json"
    files = sorted(folder.glob("*.safetensors"))
    if not config_path.is_file() or not files:
        raise UserError(f"{folder} is not a checkpoint folder (needs config.json and *.safetensors)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fmt = checkpoint_format(config)
    qconfig = config.get("quantization_config") or {}
    original_dtype, original_bytes = _original(folder, config)
    rows: list[ModuleRow] = []
    header_bytes = 0
    overhead: dict[str, int] = {}
    for path in files:
        size, header = read_header(path)
        header_bytes += size
        reader = _Reader(path, fmt, qconfig, sparsity)
        rows += reader.rows(header)
        for key, value in reader.overhead.items():
            overhead[key] = overhead.get(key, 0) + value
    overhead = {"safetensors_header": header_bytes, **overhead}
    disk = sum(p.stat().st_size for p in files)
    totals = checkpoint_totals(rows, disk, overhead, CONFIG_DTYPE_BITS.get(original_dtype, 16), original_bytes)
    return CheckpointSummary(str(folder), fmt, original_dtype, rows, totals, overhead,
                             scheme_text(qconfig.get("kv_cache_scheme")))


def checkpoint_totals(rows: list[ModuleRow], disk: int, overhead: dict[str, int], original_bits: int,
                      original_bytes: int | None = None) -> dict[str, Any]:
    """Parameters, bytes (on disk, and less the itemised overhead: what the run report counts), bits per weight
    overall and in the quantized modules, and the ratio to the original model: `original_bytes` (the run report's
    baseline, before pruning too) when known, else these parameters at `original_bits`."""
    counted = [row for row in rows if row.format != "dense I64"]  # weight_shape-like index tensors are no weights
    parameters = sum(row.parameters for row in counted)
    quantized = [row for row in counted if not row.format.startswith("dense")]
    quantized_parameters = sum(row.parameters for row in quantized)
    quantized_bytes = sum(row.bytes - row.overhead_bytes for row in quantized)
    payload = disk - sum(overhead.values())
    original = original_bytes if original_bytes is not None else parameters * original_bits // 8
    return {
        "parameters": parameters,
        "bytes_on_disk": disk,
        "overhead_bytes": sum(overhead.values()),
        "bytes": payload,
        "bits_per_weight": round(8 * payload / parameters, 4) if parameters else None,
        "quantized_parameters": quantized_parameters,
        "quantized_bits_per_weight": round(8 * quantized_bytes / quantized_parameters, 4) if quantized_parameters else None,
        "effective_bits_per_weight": round(8 * disk / parameters, 4) if parameters else None,
        "original_bytes": original,
        "compression_ratio": round(original / disk, 4) if disk else None,
    }


def _original(folder: Path, config: dict[str, Any]) -> tuple[str, int | None]:
    """The precision the model had before compression, and its bytes as loaded when the export carries the run
    report (`size.baseline_bytes`: before any pass, so a pruned model's ratio counts the pruning too)."""
    report = folder / "compress_report.json"
    size = (json.loads(report.read_text(encoding="utf-8")).get("size") or {}) if report.is_file() else {}
    dtype = size.get("reference_dtype") or config.get("dtype") or config.get("torch_dtype") or "float16"
    baseline = size.get("baseline_bytes")
    return str(dtype), int(baseline) if isinstance(baseline, int) else None
