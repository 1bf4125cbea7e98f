"""What every format writer shares: the export dtype, the unquantized tensors, config and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from compress.export.state import CompressedModel, unique_state_dict
from compress.engine.model_io import DTYPES

WEIGHTS_FILE = "model.safetensors"


def export_dtype(requested: str, compressed: CompressedModel) -> torch.dtype:
    """`auto` writes the source checkpoint's precision, not the float32 we may have computed in."""
    return compressed.checkpoint_dtype if requested == "auto" else DTYPES[requested]


def plain_tensors(compressed: CompressedModel, dtype: torch.dtype, skip_weights_of: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor except the weights of `skip_weights_of` modules, floats cast to `dtype`, tied ones once."""
    tensors, _ = unique_state_dict(compressed.model)
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and name.removesuffix(".weight") in skip_weights_of:
            continue
        tensor = tensor.detach().cpu()
        out[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    return out


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", **(metadata or {})})


def write_config(compressed: CompressedModel, folder: Path, dtype: torch.dtype, extra: dict[str, Any]) -> None:
    """config.json (with `extra` keys such as quantization_config), generation config and tokenizer."""
    model = compressed.model
    model.config.save_pretrained(folder)
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["dtype"] = str(dtype).replace("torch.", "")
    data.pop("torch_dtype", None)
    data["use_cache"] = True  # we turn the cache off while compressing; a runtime wants it on
    data.update(extra)
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if compressed.tokenizer is not None and hasattr(compressed.tokenizer, "save_pretrained"):
        compressed.tokenizer.save_pretrained(folder)
