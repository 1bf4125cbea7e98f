"""`bitsandbytes` format: transformers' own bitsandbytes serialization of a model the `bnb` pass quantized.

The quantized linears are saved as bitsandbytes made them (compress/quant/bnb_layout.py); every other float tensor
(embeddings, norms, the head, biases) in the export dtype, as the other formats write them: `auto` is the source
checkpoint's precision, not the float32 the model may have been evaluated in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.export.common import export_dtype
from compress.export.state import CompressedModel
from compress.quant import bnb_layout


def recast_shard(path: Path, dtype: torch.dtype) -> int:
    """Rewrite one saved shard with every float tensor outside the bitsandbytes weights in `dtype`; returns the
    bytes its tensors now take. (save_pretrained ignores a `state_dict` argument for a quantized model, and the
    model itself must stay as it is, so the cast happens on the written file, one shard in memory at a time.)"""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    by_module: dict[str, set[str]] = {}
    for name in tensors:
        module, local = bnb_layout.split_name(name)
        by_module.setdefault(module, set()).add(local)
    quantized = {module for module, locals_ in by_module.items() if bnb_layout.is_quantized(locals_)}
    for name, tensor in tensors.items():
        module, local = bnb_layout.split_name(name)
        if tensor.is_floating_point() and not (module in quantized and bnb_layout.part_of(local) is not None):
            tensors[name] = tensor.to(dtype)
    save_file(tensors, str(path), metadata=metadata)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_bitsandbytes(compressed: CompressedModel, folder: Path, dtype_name: str) -> dict[str, Any]:
    dtype = export_dtype(dtype_name, compressed)
    # writes quantization_config {quant_method: bitsandbytes, ...}
    compressed.model.save_pretrained(folder)
    total = sum(recast_shard(path, dtype) for path in sorted(folder.glob("*.safetensors")))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        entries = json.loads(index.read_text(encoding="utf-8"))
        entries.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).replace("torch.", "")  # what the unquantized tensors are stored in
    config.pop("torch_dtype", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if compressed.tokenizer is not None and hasattr(compressed.tokenizer, "save_pretrained"):
        compressed.tokenizer.save_pretrained(folder)
    quantization = compressed.model.config.quantization_config
    return {"quant_type": getattr(quantization, "bnb_4bit_quant_type", None)
            if getattr(quantization, "load_in_4bit", False) else "int8"}
