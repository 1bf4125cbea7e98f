"""What a bitsandbytes linear stores, by the names transformers' bitsandbytes serialization gives its tensors.

The run report reads these names from the quantized model's `state_dict()` in memory and `compress inspect` reads
the same names from the safetensors header, so both count the very same bytes. For a linear of n = out x in weights:

    4-bit (NF4 / FP4), blocks of 64 weights, double quantization in blocks of 256 block scales:
    weight                        uint8 (n/2, 1)        two 4-bit codes per byte                     codes
    weight.absmax                 uint8 (n/64,)         one scale per block, itself an 8-bit code    scales
                                  float32 (n/64,)       without double quantization
    weight.nested_absmax          float32 (n/64/256,)   the scales of those scale codes              scales
    weight.quant_map              float32 (16,)         the 16 NF4 / FP4 values                      codebooks
    weight.nested_quant_map       float32 (256,)        the 256 values of the scale codes            codebooks
    weight.quant_state.bitsandbytes__nf4  uint8         JSON: shape, blocksize, dtypes, nested offset   metadata
    LLM.int8():
    weight                        int8 (out, in)        codes
    SCB                           float32 (out,)        one scale per row (its absmax)               scales
    weight_format                 uint8 ()              layout tag                                   metadata

A bias (or any other tensor of the module) is not part of the quantized weight and counts as unquantized.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

PARTS = {
    "weight": "codes",
    "weight.absmax": "scales",
    "weight.nested_absmax": "scales",
    "SCB": "scales",
    "weight.quant_map": "codebooks",
    "weight.nested_quant_map": "codebooks",
    "weight_format": "metadata",
}
QUANT_STATE = "weight.quant_state."  # followed by "bitsandbytes__nf4" or "bitsandbytes__fp4"
# Present only on a module bitsandbytes quantized: a plain linear also has a `weight`.
MARKERS = ("weight.absmax", "SCB")


def part_of(local: str) -> str | None:
    """The stored part (codes, scales, codebooks, metadata) of a bitsandbytes module's tensor `local`; None when
    the tensor is not part of the quantized weight (a bias)."""
    return "metadata" if local.startswith(QUANT_STATE) else PARTS.get(local)


def split_name(name: str) -> tuple[str, str]:
    """("model.layers.0.mlp.up_proj", "weight.absmax") for "model.layers.0.mlp.up_proj.weight.absmax": the module
    and the tensor's name inside it, knowing that bitsandbytes names have dots of their own."""
    if f".{QUANT_STATE}" in name:
        module, _, rest = name.partition(f".{QUANT_STATE}")
        return module, QUANT_STATE + rest
    for local in PARTS:
        if local != "weight" and name.endswith(f".{local}"):
            return name[: -len(local) - 1], local
    module, _, local = name.rpartition(".")
    return module, local


def is_quantized(locals_: Iterable[str]) -> bool:
    """Whether a module holding tensors named `locals_` is a bitsandbytes-quantized linear."""
    return any(local in MARKERS for local in locals_)


def quant_state_json(data: bytes) -> dict[str, Any]:
    """The JSON bitsandbytes stores beside 4-bit codes (`weight.quant_state.*`): shape, blocksize, quant_type, ..."""
    return dict(json.loads(data.decode("utf-8")))
