"""The bnb pass: bitsandbytes through transformers, evaluated like any pass and saved in its serialization."""

from __future__ import annotations

import json

import pytest
import torch

from compress.errors import UserError
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from tests.conftest import recipe_text

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'compress[bnb]')")


def test_bnb_int8_runs_evaluates_and_exports_a_checkpoint_transformers_loads(tiny_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    text = recipe_text(tiny_llama, text_file, "  - bnb: {mode: int8}", text_file) + "export: {format: bitsandbytes}\n"
    report = run_recipe(parse_recipe(text), tmp_path / "run")
    quantized = report["passes"][0]["modules"]
    assert len(quantized) == 14 and all(entry["bits"] == 8 for entry in quantized.values())  # 2 layers x 7 linears
    values = report["metrics"]["perplexity"]["text"]
    assert values["compressed"] != values["baseline"] and abs(values["compressed"] / values["baseline"] - 1) < 0.05
    export = tmp_path / "run" / "export-bitsandbytes"
    config = json.loads((export / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_8bit"] is True
    loaded = AutoModelForCausalLM.from_pretrained(export, device_map="cpu")
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert "lm_head" not in {n for n, m in loaded.named_modules() if type(m).__name__ == "Linear8bitLt"}


def test_bnb_4bit_on_widths_it_cannot_block_is_a_clear_user_error(tiny_llama, text_file, tmp_path):
    text = recipe_text(tiny_llama, text_file, "  - bnb: {mode: nf4}", text_file)
    with pytest.raises(UserError, match="bitsandbytes nf4 does not run on cpu here .* multiple of the 64-value block"):
        run_recipe(parse_recipe(text), tmp_path / "run")
    assert not (tmp_path / "run").exists()
