"""The compressed model as a run leaves it, saved in the run folder so `compress export` can write any format later.

Layout of `RUN_DIR/state/` (written by `save_state`, read back by `load_state`):

    config.json, generation_config.json, tokenizer files   the model's own, with its (possibly pruned) shapes
    tensors.safetensors   every parameter and persistent buffer that is not a quantized weight, in the compute
                          dtype (lossless); for each quantized linear its record's tensors as `<fqn>.<part>`
                          (a uniform-affine record: `<fqn>.codes` int8/uint8, `<fqn>.scale`, `<fqn>.zero`
                          (rows, groups)); for each pruning mask `<fqn>.mask` (uint8, out x in)
    safetensors metadata  `records` (fqn -> {kind, tensors, metadata}: what rebuilds each record, see
                          compress/quant/records.py), `activation_quant` (with calibrated scales), `kv_cache`, `tied` (names that share a tensor with an
                          earlier one), `checkpoint_dtype`. States written before records had kinds have `specs`
                          (fqn -> bits/symmetric/group_size) instead; they load as uniform-affine records.

A model quantized by the `bnb` pass holds bitsandbytes modules instead; its state is transformers' own
bitsandbytes serialization (`save_pretrained`) plus `state.json` saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.recipe.errors import UserError
from compress.engine.model_io import DTYPES
from compress.engine.moe import unfuse_experts
from compress.quant.records import WeightRecord, restore_record, saved_form

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"


@dataclass
class CompressedModel:
    """What every export format is written from: the model with dequantized weights plus the weight records."""

    model: Any  # a transformers PreTrainedModel (save_pretrained, config)
    tokenizer: Any
    checkpoint_dtype: torch.dtype
    quantized: dict[str, WeightRecord] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    activation_quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv_cache: dict[str, dict[str, Any]] = field(default_factory=dict)  # attention fqn -> KV-cache settings and scales
    bitsandbytes: bool = False  # the model holds bitsandbytes modules (the `bnb` pass ran)


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors with each shared (tied) tensor once, and `{dropped name: kept name}` for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in owner and tensor.numel() > 0:
            tied[name] = owner[key]
            continue
        owner[key] = name
        tensors[name] = tensor
    return tensors, tied


def save_state(compressed: CompressedModel, folder: Path) -> None:
    """Write `compressed` into `folder` (see the module docstring for the layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    if compressed.bitsandbytes:
        compressed.model.save_pretrained(folder)
        _save_tokenizer(compressed.tokenizer, folder)
        (folder / STATE_FILE).write_text(json.dumps({"bitsandbytes": True}) + "\n", encoding="utf-8")
        return
    compressed.model.config.save_pretrained(folder)
    generation = getattr(compressed.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    _save_tokenizer(compressed.tokenizer, folder)
    tensors, tied = unique_state_dict(compressed.model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.removesuffix(".weight") not in compressed.quantized or not name.endswith(".weight"):
            out[name] = tensor.detach().cpu().contiguous()
    records: dict[str, dict[str, Any]] = {}  # fqn -> the entry that rebuilds its record from `<fqn>.<part>`
    for fqn, record in compressed.quantized.items():
        parts, records[fqn] = saved_form(record)
        out.update({f"{fqn}.{part}": tensor.contiguous() for part, tensor in parts.items()})
    for fqn, mask in compressed.masks.items():
        out[f"{fqn}.mask"] = mask.to(torch.uint8).cpu().contiguous()
    metadata = {
        "records": json.dumps(records),
        "activation_quant": json.dumps(compressed.activation_quant),
        "kv_cache": json.dumps(compressed.kv_cache),
        "tied": json.dumps(tied),
        "checkpoint_dtype": str(compressed.checkpoint_dtype).replace("torch.", ""),
    }
    save_file(out, str(folder / TENSORS_FILE), metadata=metadata)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def load_state(folder: Path) -> CompressedModel:
    """Rebuild the compressed model saved by `save_state`: weights of quantized linears are dequantized codes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / TENSORS_FILE).is_file() and not (folder / STATE_FILE).is_file():
        raise UserError(f"{folder} holds no saved compression state ({TENSORS_FILE}); was it written by `compress run`?")
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    if (folder / STATE_FILE).is_file() and json.loads((folder / STATE_FILE).read_text()).get("bitsandbytes"):
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        return CompressedModel(model, tokenizer, torch.float32, bitsandbytes=True)
    with safe_open(str(folder / TENSORS_FILE), framework="pt") as handle:
        metadata = handle.metadata() or {}
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    entries = json.loads(metadata.get("records") or metadata.get("specs", "{}"))  # `specs`: saved before record kinds
    quantized = {fqn: restore_record(entry, lambda part: stored.pop(f"{fqn}.{part}"))
                 for fqn, entry in entries.items()}
    masks = {name.removesuffix(".mask"): stored.pop(name).bool() for name in [n for n in stored if n.endswith(".mask")]}
    dtype = next((t.dtype for t in stored.values() if t.is_floating_point()), torch.float32)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model)  # the state holds MoE experts as the per-expert linears the run quantized
    for fqn, record in quantized.items():
        stored[f"{fqn}.weight"] = _module_layout(model.get_submodule(fqn), record.dequantize().to(dtype))
    for dropped, kept in json.loads(metadata.get("tied", "{}")).items():
        stored[dropped] = stored[kept]
    model.load_state_dict(stored, strict=True)
    model.eval()
    checkpoint_dtype = DTYPES.get(metadata.get("checkpoint_dtype", ""), dtype)
    return CompressedModel(model, tokenizer, checkpoint_dtype, quantized, masks,
                           json.loads(metadata.get("activation_quant", "{}")), json.loads(metadata.get("kv_cache", "{}")))


def _module_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """(out, in) -> the module's own weight layout (GPT-2's Conv1D stores (in, out); a linear, or an embedding table
    rounded by quantize_embeddings, is stored as it is)."""
    from compress.quant.modules import Conv1D

    return matrix.t().contiguous() if isinstance(module, Conv1D) else matrix
