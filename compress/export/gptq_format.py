"""`gptq` format: the Hugging Face GPTQ layout (AutoGPTQ / GPTQModel "gptq" v1 checkpoint format).

Per quantized linear with in_features I, out_features O, G groups and b bits (32 % b == 0):

    qweight  int32 (I * b / 32, O)   unsigned codes, 32 / b consecutive input rows per word, low bits first
    qzeros   int32 (G, O * b / 32)   unsigned zero point minus one (the v1 convention), packed along O
    scales   float16 (G, O)
    g_idx    int32 (I,)              group of each input column (column // group_size; desc_act is false)

and `quantization_config: {quant_method: gptq, bits, group_size, desc_act: false, sym, checkpoint_format: gptq}`.
Symmetric codes are stored offset by 2^(b-1) with that as their zero point, as GPTQ does. It holds uniform-affine
records only; any other is refused before anything is written, naming the module and the part it cannot hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.recipe.errors import UserError
from compress.export.common import export_dtype, plain_tensors, writable_records, write_config, write_weights
from compress.recipe.export_config import GPTQ_BITS
from compress.export.state import CompressedModel
from compress.quant.primitives import QuantSpec
from compress.quant.records import UniformAffine


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-wide integers along `dim` (0 or 1), 32 // bits per int32, element k at bits k*b."""
    per_word = 32 // bits
    values = values.to(torch.int64)
    if dim == 1:
        values = values.t()
    rows, columns = values.shape  # pack along rows
    grouped = values.reshape(rows // per_word, per_word, columns)
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).reshape(1, per_word, 1)
    words = (grouped << shifts).sum(dim=1)  # (rows / per_word, columns), each < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed int32
    return words.t().contiguous() if dim == 1 else words.contiguous()


def check_gptq_spec(fqn: str, record: UniformAffine) -> None:
    out_features, in_features = record.codes.shape
    spec = record.spec
    if spec.bits not in GPTQ_BITS:
        raise UserError(f"{fqn}: the GPTQ layout is written for {GPTQ_BITS} bits, got {spec.bits}; use compressed-tensors")
    per_word = 32 // spec.bits
    if in_features % per_word or out_features % per_word:
        raise UserError(f"{fqn}: {in_features}x{out_features} does not pack into int32 words of {per_word} codes")
    if spec.group_size and in_features % spec.group_size:
        raise UserError(f"{fqn}: group size {spec.group_size} does not divide {in_features} input columns, which "
                        "the GPTQ layout requires; use compressed-tensors")


def pack_gptq(record: UniformAffine) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales / g_idx of one quantized matrix (out, in)."""
    spec = record.spec
    offset = 1 << (spec.bits - 1) if spec.symmetric else 0
    codes = (record.codes.to(torch.int64) + offset).t()  # (in, out), unsigned
    zeros = (record.zero.round().to(torch.int64) + offset).t()  # (groups, out)
    in_features = codes.shape[0]
    group_size = spec.group_size or in_features
    return {
        "qweight": pack_int32(codes, spec.bits, dim=0),
        "qzeros": pack_int32((zeros - 1) & ((1 << spec.bits) - 1), spec.bits, dim=1),  # v1: zero - 1, wrapped
        "scales": record.scale.t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(in_features) // group_size).to(torch.int32),
    }


def _uniform_spec(records: dict[str, UniformAffine]) -> QuantSpec:
    specs = {record.spec for record in records.values()}
    if len(specs) != 1:
        raise UserError(f"the GPTQ layout holds one scheme per model, this one has {len(specs)} "
                        f"({', '.join(sorted(str(s.describe()) for s in specs))}); use compressed-tensors")
    return specs.pop()


def write_gptq(compressed: CompressedModel, folder: Path, dtype_name: str) -> dict[str, Any]:
    if not compressed.quantized:
        raise UserError("nothing was quantized, so there is nothing to write in the GPTQ layout; use --format dense")
    if compressed.activation_quant or compressed.kv_cache:
        raise UserError("the GPTQ layout holds weight-only quantization; this model also quantizes activations"
                        f"{' or its KV cache' if compressed.kv_cache else ''}: use compressed-tensors")
    records = writable_records(compressed.quantized, "gptq", UniformAffine, lambda fqn, record: "the GPTQ layout")
    spec = _uniform_spec(records)
    dtype = export_dtype(dtype_name, compressed)
    tensors = plain_tensors(compressed, dtype, skip_weights_of=set(records))
    for fqn, record in records.items():
        if not isinstance(compressed.model.get_submodule(fqn), nn.Linear):
            raise UserError(f"{fqn} is not an nn.Linear; the GPTQ layout packs Linear weights only: use --format dense")
        check_gptq_spec(fqn, record)
        for name, tensor in pack_gptq(record).items():
            tensors[f"{fqn}.{name}"] = tensor
    block_modules = sorted({fqn.split(".", 3)[-1] for fqn in records})  # "self_attn.q_proj", ...
    config = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size or -1,
        "desc_act": False,
        "sym": spec.symmetric,
        "checkpoint_format": "gptq",
        "true_sequential": True,
        "modules_in_block_to_quantize": [block_modules],
    }
    write_weights(tensors, folder)
    write_config(compressed, folder, dtype, {"quantization_config": config})
    return {"bits": spec.bits, "group_size": spec.group_size or -1, "sym": spec.symmetric}
