"""The words for what a compressed weight is stored as, shared by weight records, passes and export formats.

A weight record (compress/quant/records.py) says which of these parts it stores (`WeightRecord.stores`); a pass
may declare at registration what it leaves in the model (`register_pass(..., stores=...)`) so a recipe is
checked at load; each export format says which parts it can hold (`FORMAT_HOLDS`). Every part is a noun phrase,
so a refusal reads "compressed-tensors pack-quantized cannot hold a float zero point (model.layers.0.q_proj)".

This module sits in the bottom layer because the recipe check (load time, no torch) and the writers (export
time, with records) must use the very same table.
"""

from __future__ import annotations

from typing import Iterable

INTEGER_CODES = "integer codes"
SCALES = "scales"
INTEGER_ZERO_POINTS = "integer zero points"
FLOAT_ZERO_POINT = "a float zero point"
CODEBOOK = "a per-row lookup table"
ELEMENT_FLOATS = "element float codes (FP8/FP4)"
BLOCK_SCALES = "block scales"
SPARSE_OUTLIERS = "sparse outliers"
GGUF_BLOCKS = "GGUF blocks (llama.cpp Q4_0 ... Q6_K)"
LOW_RANK = "a low-rank correction (LoRA factors)"
BITSANDBYTES_MODULES = "bitsandbytes modules"  # not a record: the bnb pass replaces the modules themselves

# The integer layouts of compressed-tensors (pack-quantized, int-quantized) and GPTQ.
INTEGER_AFFINE = frozenset({INTEGER_CODES, SCALES, INTEGER_ZERO_POINTS})

# What each export format can hold; None: any record part. `dense` writes every record dequantized, so whatever a
# record stores (this vocabulary's words or a new record's own) it holds, but not bitsandbytes modules, which only
# transformers' bitsandbytes serialization saves.
# compressed-tensors also lays out element floats: float-quantized (FP8, per tensor / channel / 128x128 block) and
# nvfp4- / mxfp4-pack-quantized (FP4 codes with FP8 or E8M0 block scales); the GPTQ layout has integer codes only.
# A low-rank correction (lorc) goes beside the quantized base of either as a PEFT LoRA adapter (adapter/), which
# transformers + peft load as they are; dense folds it into the weights.
FORMAT_HOLDS: dict[str, frozenset[str] | None] = {
    "compressed-tensors": INTEGER_AFFINE | {ELEMENT_FLOATS, BLOCK_SCALES, LOW_RANK},
    "gptq": INTEGER_AFFINE | {LOW_RANK},
    "dense": None,
    "bitsandbytes": frozenset({BITSANDBYTES_MODULES}),
    # llama.cpp's block types only: an integer or float record is refused, never re-rounded onto a GGUF grid
    "gguf": frozenset({GGUF_BLOCKS}),
}


def unheld(stores: Iterable[str], fmt: str) -> list[str]:
    """The parts of `stores` that format `fmt` cannot hold, sorted; empty when it holds them all."""
    holds = FORMAT_HOLDS[fmt]
    if holds is None:
        return sorted(part for part in set(stores) if part == BITSANDBYTES_MODULES)
    return sorted(part for part in set(stores) if part not in holds)


def formats_holding(part: str) -> list[str]:
    """The formats that can hold `part`, in FORMAT_HOLDS order."""
    return [fmt for fmt in FORMAT_HOLDS if not unheld([part], fmt)]
