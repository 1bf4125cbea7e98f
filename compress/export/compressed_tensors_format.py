"""`compressed-tensors` format: what vLLM and transformers read for llm-compressor models.

Weight-only int2..8 groups are `pack-quantized` (codes packed into int32 by compressed-tensors' own
`pack_to_int32`, one scale per group, packed zero points when asymmetric); W8A8 modules (8-bit weights with
dynamic per-token activations) are `int-quantized` (int8 codes, per-channel scale). One config group per
distinct scheme, so a mixed-precision plan gets one group per bit width. Pruning masks become a
`sparsity_config` (format dense, `sparsity_structure: "2:4"` when every masked matrix is 2:4) so runtimes
can pick sparse kernels.

Element-float records (compress/quant/float_records.py) are laid out by compressed-tensors' own compressors:
FP8 as `float-quantized` (float8_e4m3fn weights, float32 scales per tensor, channel or 128x128 block), NVFP4 as
`nvfp4-pack-quantized` (two E2M1 codes per byte, FP8 scales per 16, FP32 global scale) and MXFP4 as
`mxfp4-pack-quantized` (E8M0 scale bytes per 32). The compressor quantizes our dequantized weights with our scales;
the codes it writes are checked against the record's before they are kept, so a disagreement is our bug, not a
silently different checkpoint. Mixed formats give one config group each, and the config says `mixed-precision`.

It holds uniform-affine and element-float records only; any other record is refused before anything is written,
naming the module and the part it cannot hold (`holdable`), never rounded into shape.

Conventions: compressed-tensors stores signed codes; our asymmetric codes are unsigned [0, 2^b - 1], so
codes and zero points shift down by 2^(b-1) together, which leaves (code - zero) * scale unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.recipe.errors import UserError
from compress.export.common import export_dtype, plain_tensors, writable_records, write_config, write_weights
from compress.export.state import CompressedModel
from compress.quant.float_records import FP8_BLOCK, ElementFloat, grid_values
from compress.quant.modules import is_linear
from compress.quant.records import UniformAffine, WeightRecord

PACKED = "pack-quantized"
INT8 = "int-quantized"
FLOAT_LAYOUTS = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
Held = UniformAffine | ElementFloat


def _signed_offset(record: UniformAffine) -> int:
    return 0 if record.spec.symmetric else 1 << (record.spec.bits - 1)


def pack_weight(record: UniformAffine, scale_dtype: torch.dtype, fmt: str = PACKED) -> dict[str, torch.Tensor]:
    """The module-local tensors compressed-tensors stores for one quantized matrix (out, in)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, offset = record.spec.bits, _signed_offset(record)
    codes = (record.codes.to(torch.int16) - offset).to(torch.int8)  # (out, in), signed
    zero = (record.zero.round().to(torch.int16) - offset).to(torch.int8)  # (out, groups)
    out: dict[str, torch.Tensor] = {"weight_scale": record.scale.to(scale_dtype).contiguous()}
    if fmt == INT8:
        out["weight"] = codes.contiguous()
        if not record.spec.symmetric:
            out["weight_zero_point"] = zero.contiguous()
        return out
    out["weight_packed"] = pack_to_int32(codes, bits)
    out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    if not record.spec.symmetric:
        out["weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0).contiguous()
    return out


def pack_float_weight(fqn: str, record: ElementFloat) -> dict[str, torch.Tensor]:
    """The module-local tensors of an element-float record, written by compressed-tensors' own compressor for its
    layout from our dequantized weights and scales; the codes it wrote are checked against the record's."""
    from compressed_tensors.compressors import BaseCompressor

    fmt = FLOAT_LAYOUTS[record.spec.format]
    # FP8 per tensor: the library's scale is (1,), not our broadcastable (1, 1)
    scale = record.scale.reshape(1) if record.spec.strategy == "tensor" else record.scale
    state = {"weight": record.dequantize(), "weight_scale": scale}
    if record.global_scale is not None:
        state["weight_global_scale"] = record.global_scale
    compressor: Any = BaseCompressor.get_value_from_registry(fmt)
    packed = {name: tensor.detach().contiguous() for name, tensor in
              compressor.compress(state, build_scheme(record, None, [fqn])).items()}
    _check_written_codes(fqn, record, packed, fmt)
    return packed


def written_grid_values(packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The element values (before scaling, float32) a float-quantized / fp4-pack-quantized module stores."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    if "weight_packed" in packed:
        return unpack_fp4_from_uint8(packed["weight_packed"], *shape, dtype=torch.float32)
    return packed["weight"].float()


def _check_written_codes(fqn: str, record: ElementFloat, packed: dict[str, torch.Tensor], fmt: str) -> None:
    # compared as values, so +0 and -0 (which the packer may sign differently) count as the same code
    differ = int((written_grid_values(packed, record.shape) != grid_values(record.spec, record.codes)).sum())
    if differ:
        raise RuntimeError(f"compressed-tensors' {fmt} compressor wrote {differ} codes of {fqn} other than its "
                           "record holds: a bug in compress, please report it")


def _scheme_key(record: Held, activations: dict[str, Any] | None) -> tuple[Any, ...]:
    act = activation_scheme_key(activations)
    if isinstance(record, ElementFloat):
        return "float", record.spec.format, record.spec.strategy, act
    return record.spec.bits, record.spec.symmetric, record.spec.group_size, act


def _module_format(record: WeightRecord, activations: dict[str, Any] | None) -> str:
    if isinstance(record, ElementFloat):
        return FLOAT_LAYOUTS[record.spec.format]
    return INT8 if activations and isinstance(record, UniformAffine) and record.spec.bits == 8 else PACKED


def holdable(records: dict[str, WeightRecord], activation_quant: dict[str, Any]) -> dict[str, Held]:
    """`records` as this format lays them out; raises UserError for any it cannot hold (before anything is written)."""
    return writable_records(records, "compressed-tensors", (UniformAffine, ElementFloat),
                            lambda fqn, record: f"compressed-tensors {_module_format(record, activation_quant.get(fqn))}")


def weight_args(record: Held) -> Any:
    """compressed-tensors' QuantizationArgs for the record's weights (the library's presets for NVFP4 / MXFP4)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if isinstance(record, ElementFloat):
        if record.spec.format != "fp8":
            return preset_name_to_scheme(f"{record.spec.format.upper()}A16", ["Linear"]).weights
        block = [FP8_BLOCK, FP8_BLOCK] if record.spec.strategy == "block" else None
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=record.spec.strategy,
                                block_structure=block)
    spec = record.spec
    return QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric,
        strategy="group" if spec.group_size else "channel", group_size=spec.group_size,
    )


def build_scheme(record: Held, activations: dict[str, Any] | None, targets: list[str]) -> Any:
    from compressed_tensors.quantization import QuantizationScheme

    weights = weight_args(record)
    inputs = input_activations_args(activations)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs,
                              format=_module_format(record, activations))


def quantization_config(compressed: CompressedModel, sparsity: dict[str, Any] | None = None) -> dict[str, Any]:
    """`quantization_config` for config.json, built with compressed-tensors' own QuantizationConfig.

    Needs only the records' specs, not their codes; `sparsity` replaces the config computed from the masks.
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    records = holdable(compressed.quantized, compressed.activation_quant)
    groups: dict[tuple[Any, ...], list[str]] = {}
    for fqn, record in records.items():
        groups.setdefault(_scheme_key(record, compressed.activation_quant.get(fqn)), []).append(fqn)
    schemes = {}
    for index, targets in enumerate(groups.values()):
        first = targets[0]
        schemes[f"group_{index}"] = build_scheme(records[first], compressed.activation_quant.get(first), targets)
    formats = {scheme.format for scheme in schemes.values()}
    linears = [name for name, module in compressed.model.named_modules() if is_linear(module)]
    config = QuantizationConfig(
        config_groups=schemes,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=[name for name in linears if name not in compressed.quantized],
        kv_cache_scheme=kv_cache_scheme(compressed.kv_cache),
    )
    return {
        "version": compressed_tensors.__version__,  # the usual reason a runtime refuses a checkpoint is version skew
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity_config(compressed.masks) if sparsity is None else sparsity,
        "transform_config": {},
        **config.model_dump(exclude={"quant_method"}, mode="json"),
    }


def is_n_m(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every run of `m` consecutive input columns keeps at most `n` weights."""
    rows, columns = mask.shape
    if columns % m:
        return False
    return bool((mask.reshape(rows, columns // m, m).sum(dim=-1) <= n).all())


def mask_summary(mask: torch.Tensor) -> tuple[int, int, bool]:
    """What the sparsity config needs from one mask: weights kept, weights in all, and whether it is 2:4."""
    return int(mask.sum()), mask.numel(), is_n_m(mask)


def sparsity_config(masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    return sparsity_config_of({fqn: mask_summary(mask) for fqn, mask in masks.items()})


def sparsity_config_of(summaries: dict[str, tuple[int, int, bool]]) -> dict[str, Any]:
    """The `sparsity_config` from per-module `mask_summary`s (a lazy export keeps only those, not the masks)."""
    if not summaries:
        return {}
    kept = sum(s[0] for s in summaries.values())
    total = sum(s[1] for s in summaries.values())
    structure = "2:4" if all(s[2] for s in summaries.values()) else "unstructured"
    return {
        "format": "dense",  # weights stay in the quantized layout; the metadata tells kernels what they may skip
        "sparsity_structure": structure,
        "global_sparsity": round(1 - kept / total, 6),
        "targets": sorted(summaries),
        "ignore": [],
        "registry_requires_subclass": False,
    }


def module_tensors(fqn: str, module: nn.Module, record: Held, dtype: torch.dtype,
                   activations: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The stored tensors that replace `fqn.weight`, by full name."""
    if not isinstance(module, nn.Linear):
        raise UserError(f"{fqn} is not an nn.Linear (GPT-2's Conv1D?); compressed-tensors packs Linear weights "
                        "only: export with --format dense")
    if isinstance(record, ElementFloat):
        packed = pack_float_weight(fqn, record)
    else:
        packed = pack_weight(record, dtype, _module_format(record, activations))
    return {f"{fqn}.{name}": tensor for name, tensor in packed.items()} | activation_tensors(fqn, activations)


def write_compressed_tensors(compressed: CompressedModel, folder: Path, dtype_name: str) -> dict[str, Any]:
    records = holdable(compressed.quantized, compressed.activation_quant)
    dtype = export_dtype(dtype_name, compressed)
    tensors = plain_tensors(compressed, dtype, skip_weights_of=set(records))
    for fqn, record in records.items():
        tensors.update(module_tensors(fqn, compressed.model.get_submodule(fqn), record, dtype,
                                      compressed.activation_quant.get(fqn)))
    tensors.update(kv_cache_tensors(compressed.kv_cache))
    config = quantization_config(compressed)
    write_weights(tensors, folder)
    write_config(compressed, folder, dtype, {"quantization_config": config})
    return config_details(config)


def config_details(config: dict[str, Any]) -> dict[str, Any]:
    """The export summary the report and model card show."""
    return {"compressed_tensors_version": config["version"], "format": config["format"],
            "config_groups": len(config["config_groups"]),
            "sparsity_structure": config["sparsity_config"].get("sparsity_structure")}


# -- activations and the KV cache (input_activations, kv_cache_scheme and their calibrated scales)

def activation_scheme_key(activations: dict[str, Any] | None) -> tuple[Any, ...]:
    """What makes two modules' activation quantization one scheme (their calibrated scales may differ)."""
    if not activations:
        return ()
    return (activations.get("format", "int"), activations.get("bits"), activations.get("per"), activations.get("static"))


def input_activations_args(activations: dict[str, Any] | None) -> Any:
    """compressed-tensors' `input_activations` for a module's activation settings (compress/quant/activation.py):
    int or float, dynamic or static (`input_scale` stored), per token, tensor or group (nvfp4: `tensor_group` with
    dynamic "local" scales under the stored `input_global_scale`, as compressed-tensors' NVFP4 preset)."""
    if not activations:
        return None
    import torch
    from compressed_tensors.quantization import QuantizationArgs

    fmt, per = activations.get("format", "int"), activations.get("per")
    if fmt == "nvfp4":
        return QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                                dynamic="local", scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)
    if fmt == "mxfp4":
        return QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True,
                                dynamic=True, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    return QuantizationArgs(num_bits=8 if fmt == "fp8" else int(activations.get("bits") or 8),
                            type="float" if fmt == "fp8" else "int", symmetric=True,
                            dynamic=not activations.get("static", False), strategy=per or "token",
                            group_size=128 if per == "group" else None)  # FP8_BLOCK's per-token groups


def activation_tensors(fqn: str, activations: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The calibrated activation scales stored beside a module's weight (float32, shape (1,), as the library makes them)."""
    return {f"{fqn}.{key}": torch.tensor([float(value)], dtype=torch.float32)
            for key, value in (activations or {}).items() if key in ("input_scale", "input_global_scale")}


def kv_cache_scheme(kv_cache: dict[str, dict[str, Any]]) -> Any:
    """`kv_cache_scheme`: static FP8 per tensor or per KV head (`attn_head`); one scheme for the whole model."""
    if not kv_cache:
        return None
    from compressed_tensors.quantization import QuantizationArgs

    strategies = {settings["strategy"] for settings in kv_cache.values()}
    if len(strategies) != 1:
        raise UserError(f"compressed-tensors holds one kv_cache_scheme per model; this one mixes {sorted(strategies)}")
    strategy = "attn_head" if strategies.pop() == "head" else "tensor"
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, dynamic=False, symmetric=True)


def kv_cache_tensors(kv_cache: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`<attention>.k_scale` / `v_scale` (float32; (1,) per tensor, (kv_heads, 1, 1) per head): the names vLLM reads."""
    tensors: dict[str, torch.Tensor] = {}
    for fqn, settings in kv_cache.items():
        for key in ("k_scale", "v_scale"):
            scale = torch.tensor(settings[key], dtype=torch.float32)
            tensors[f"{fqn}.{key}"] = scale.reshape(-1, 1, 1) if settings["strategy"] == "head" else scale.reshape(1)
    return tensors
