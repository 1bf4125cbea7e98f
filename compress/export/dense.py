"""`dense` format: dequantized (pruned or fake-quantized) weights in plain safetensors, for any runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.export.common import export_dtype, plain_tensors, write_config, write_weights
from compress.export.state import CompressedModel
from compress.recipe.storage import FORMAT_HOLDS, unheld


def write_dense(compressed: CompressedModel, folder: Path, dtype_name: str) -> dict[str, Any]:
    """Every tensor as a float of the export dtype; quantization survives only as the values themselves."""
    dtype = export_dtype(dtype_name, compressed)
    write_weights(plain_tensors(compressed, dtype, skip_weights_of=set()), folder)
    write_config(compressed, folder, dtype, {})
    dropped = sorted(compressed.activation_quant)
    notes = [f"activation quantization of {len(dropped)} modules is a runtime setting and is not stored"] if dropped else []
    unpacked = {fqn: parts for fqn, record in compressed.quantized.items()
                if (parts := {part for part in record.stores
                              if all(unheld([part], fmt) for fmt in FORMAT_HOLDS if fmt != "dense")})}
    if unpacked:
        names = sorted(set().union(*unpacked.values()))
        notes.append(f"{' and '.join(names)} (from {len(unpacked)} modules) are in no runtime format we write, so "
                     "this checkpoint holds them dequantized: dense floats, not their bytes")
    if compressed.kv_cache:
        notes.append(f"the KV-cache quantization of {len(compressed.kv_cache)} attention modules is a runtime setting "
                     "and is not stored")
    return {"notes": notes}
