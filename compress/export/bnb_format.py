"""`bitsandbytes` format: transformers' own bitsandbytes serialization of a model the `bnb` pass quantized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.export.state import CompressedModel


def write_bitsandbytes(compressed: CompressedModel, folder: Path, dtype_name: str) -> dict[str, Any]:
    compressed.model.save_pretrained(folder)  # writes quantization_config {quant_method: bitsandbytes, ...}
    if compressed.tokenizer is not None and hasattr(compressed.tokenizer, "save_pretrained"):
        compressed.tokenizer.save_pretrained(folder)
    config = compressed.model.config.quantization_config
    return {"quant_type": getattr(config, "bnb_4bit_quant_type", None) if getattr(config, "load_in_4bit", False) else "int8"}
