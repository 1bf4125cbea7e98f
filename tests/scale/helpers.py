"""Checkpoints for the scale tests: tiny sharded bf16 models written from a config, random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from tests.tiny_models import save_tokenizer, tiny_config


def save_sharded_bf16(folder: Path, family: str = "llama", *, layers: int = 3, seed: int = 0,
                      max_shard_size: str = "120KB") -> Path:
    """A tiny random model saved in bfloat16 across several safetensors shards with an index, like a hub checkpoint."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = tiny_config(family, vocab_size=320)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return folder


def run_lazy_and_eager(tmp_path: Path, recipe_text: Callable[[bool], str]) -> dict[bool, tuple[Path, dict[str, Any]]]:
    """`compress run` of the same recipe with `lazy: true` and `lazy: false`: {lazy: (run folder, report.json)}."""
    from typer.testing import CliRunner

    from compress.cli.main import app

    runs = {}
    for lazy in (True, False):
        recipe = tmp_path / f"{'lazy' if lazy else 'eager'}.yaml"
        recipe.write_text(recipe_text(lazy), encoding="utf-8")
        out = tmp_path / ("lazy" if lazy else "eager")
        result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        runs[lazy] = (out, json.loads((out / "report.json").read_text()))
    return runs
