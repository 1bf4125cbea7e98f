"""Low-rank corrections (`lorc`) as a PEFT LoRA adapter beside the quantized checkpoint.

A format that holds integer codes writes each `LowRankCorrected` record's base like any other record; its float16
factors go into `adapter/` in the layout PEFT saves and loads (`adapter_config.json`, `adapter_model.safetensors`
with `base_model.model.<module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank)). Every module's
`lora_alpha` equals its rank, so PEFT's scaling alpha / rank is 1 and base(x) + B (A x) is exactly what the run
evaluated. Loading needs no code from us:

    model = AutoModelForCausalLM.from_pretrained(export)
    model = PeftModel.from_pretrained(model, export / "adapter")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from compress.export.state import CompressedModel
from compress.quant.low_rank import LowRankCorrected

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def split_low_rank(compressed: CompressedModel) -> tuple[CompressedModel, dict[str, LowRankCorrected]]:
    """The model with each corrected record replaced by its base, and the corrected records by module."""
    corrected = {fqn: r for fqn, r in compressed.quantized.items() if isinstance(r, LowRankCorrected)}
    if not corrected:
        return compressed, {}
    bases = {fqn: r.base if isinstance(r, LowRankCorrected) else r for fqn, r in compressed.quantized.items()}
    return dataclasses.replace(compressed, quantized=bases), corrected


def write_peft_adapter(corrected: dict[str, LowRankCorrected], folder: Path, base_model: str) -> dict[str, Any]:
    """Write the factors of `corrected` as a PEFT LoRA adapter into `folder`; returns its summary."""
    folder.mkdir(parents=True)
    tensors = {}
    for fqn, record in corrected.items():
        tensors[f"base_model.model.{fqn}.lora_A.weight"] = record.lora_a.contiguous().cpu()
        tensors[f"base_model.model.{fqn}.lora_B.weight"] = record.lora_b.contiguous().cpu()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    ranks = {fqn: record.rank for fqn, record in corrected.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": sorted(ranks),
        "r": common,
        "lora_alpha": common,  # scaling = alpha / r = 1: base + B A, as evaluated
        "rank_pattern": {fqn: rank for fqn, rank in ranks.items() if rank != common},
        "alpha_pattern": {fqn: rank for fqn, rank in ranks.items() if rank != common},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {"path": ADAPTER_DIR, "modules": len(ranks), "ranks": sorted(set(ranks.values())),
            "bytes": sum(p.stat().st_size for p in folder.iterdir())}
