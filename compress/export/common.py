"""What every format writer shares: the records it can hold, the export dtype, the unquantized tensors, config and
tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors.torch import save_file

from compress.export.state import CompressedModel, unique_state_dict
from compress.engine.model_io import DTYPES
from compress.quant.records import WeightRecord
from compress.recipe.errors import UserError
from compress.recipe.storage import unheld

WEIGHTS_FILE = "model.safetensors"


Held = TypeVar("Held", bound=WeightRecord)


Layouts = type[WeightRecord] | tuple[type[WeightRecord], ...]


def unheld_reason(record: WeightRecord, fmt: str, writes: Layouts) -> str | None:
    """Why the `fmt` writer, which lays out `writes` records, cannot hold `record`; None when it can.

    The parts the record stores decide first (compress/recipe/storage.py), so the refusal names what would be lost
    ("a float zero point"); a record storing only held parts but of a class the writer has no layout for is refused
    by its kind.
    """
    parts = unheld(record.stores, fmt)
    if parts:
        return " and ".join(parts)
    return None if isinstance(record, writes) else f"a {record.kind!r} record"


def writable_records(records: dict[str, WeightRecord], fmt: str, writes: type[Held] | tuple[type[Held], ...],
                     layout: Callable[[str, WeightRecord], str]) -> dict[str, Held]:
    """`records`, every one checked to be a `writes` the format holds; raises UserError naming the first module
    refused and why, before the writer has written anything. `layout(fqn, record)` names the format's layout."""
    refused = {fqn: why for fqn, record in records.items() if (why := unheld_reason(record, fmt, writes)) is not None}
    if refused:
        fqn, why = next(iter(refused.items()))
        others = f", and {len(refused) - 1} more modules" if len(refused) > 1 else ""
        raise UserError(f"{layout(fqn, records[fqn])} cannot hold {why} ({fqn}{others}); export with format dense, "
                        "which writes every record dequantized")
    return {fqn: record for fqn, record in records.items() if isinstance(record, writes)}


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
