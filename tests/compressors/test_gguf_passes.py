"""Passes onto GGUF grids: quantize_embeddings (the embedding table and the head, evaluated as exported) and the
calibrated quantizers awq and signround with `format: "gguf:..."`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compress.app.runner import run_recipe  # noqa: E402
from compress.quant.gguf_records import GGUFSpec, quantize_gguf_rtn  # noqa: E402
from compress.recipe.errors import RecipeError  # noqa: E402
from compress.recipe.schema import parse_recipe  # noqa: E402
from tests.conftest import DEMO_DIR, DEMO_MODEL, recipe_text, requires_demo_model  # noqa: E402


def _demo_recipe(passes: str, export: str = "gguf") -> str:
    return (f"model: {DEMO_MODEL}\npasses:\n{passes}\nevaluate:\n  perplexity: [{{dataset: {DEMO_DIR / 'eval.txt'}, "
            f"seq_len: 128, max_windows: 4}}]\nexport: {{format: {export}}}\n")


@requires_demo_model()
def test_a_tied_table_is_stored_in_the_heads_type_and_scored_as_exported(tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).model.embed_tokens.weight.detach()
    plain = run_recipe(parse_recipe(_demo_recipe('  - rtn: {format: "gguf:q4_k"}')), tmp_path / "plain")
    both = run_recipe(parse_recipe(_demo_recipe('  - rtn: {format: "gguf:q4_k"}\n'
                                                '  - quantize_embeddings: {embeddings: "gguf:q4_k", head: "gguf:q6_k"}')),
                      tmp_path / "both")
    reader = gguf.GGUFReader(tmp_path / "both" / "export-gguf" / "model.gguf")
    table = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert table.tensor_type == gguf.GGMLQuantizationType.Q6_K  # tied: the head's type, as llama.cpp chooses
    expected = quantize_gguf_rtn(original, GGUFSpec("q6_k")).dequantize().numpy()
    assert np.array_equal(gguf.quants.dequantize(table.data, table.tensor_type), expected)
    assert not any(t.name == "output.weight" for t in reader.tensors)  # llama.cpp reuses token_embd
    # the size counts the table at Q6_K's 6.5625 bits; the evaluation saw it (the rounded head scores differently)
    assert both["size"]["stored_bits_by_part"]["embeddings + tied head"] == {"codes": 4096 * 256 * 6,
                                                                             "scales": 4096 * 256 * 9 // 16}
    assert both["size"]["bytes"] < plain["size"]["bytes"] - 1_000_000
    ppl = [r["metrics"]["perplexity"]["eval"]["compressed"] for r in (plain, both)]
    assert ppl[0] != ppl[1] and abs(ppl[1] / ppl[0] - 1) < 0.02
    # `compress export RUN_DIR --format gguf` later writes the same tensors from the run's saved state
    from compress.export import export_run

    export_run(tmp_path / "both", "gguf", tmp_path / "again")
    again = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "again" / "model.gguf").tensors}
    assert again.keys() == {t.name for t in reader.tensors}
    assert all(np.array_equal(again[t.name], np.array(t.data)) for t in reader.tensors)
    entry = json.loads((tmp_path / "both" / "report.json").read_text())["passes"][1]
    assert list(entry["modules"]) == ["model.embed_tokens"] and entry["modules"]["model.embed_tokens"]["rows"] == 4096


def test_an_untied_head_and_embeddings_take_their_own_types(tiny_llama, text_file, tmp_path):
    passes = '  - rtn: {format: "gguf:q8_0"}\n  - quantize_embeddings: {embeddings: "gguf:q4_0", head: "gguf:q8_0"}'
    report = run_recipe(parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file)
                                     + "export: {format: gguf}\n"), tmp_path / "run")
    modules = report["passes"][1]["modules"]
    assert {name: m["format"] for name, m in modules.items()} == {"model.embed_tokens": "gguf:q4_0",
                                                                   "lm_head": "gguf:q8_0"}
    reader = gguf.GGUFReader(tmp_path / "run" / "export-gguf" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"


@pytest.mark.parametrize("body, message", [
    ("  - quantize_embeddings: {}", "give `embeddings`, `head` or both"),
    ('  - quantize_embeddings: {head: "gguf:q7_k"}', "unknown GGUF type 'gguf:q7_k'"),
    ('  - quantize_embeddings: {head: "gguf:q6_k"}\n  - quantize_embeddings: {embeddings: "gguf:q6_k"}',
     "second quantizer"),
    ('  - quantize_embeddings: {head: "gguf:q6_k"}\n  - magnitude: {sparsity: 0.5}', "must come before"),
    # integer codes the GGUF writer would refuse only after the whole run
    ("  - gptq: {bits: 4}", "'gptq' rounds to int codes"),
    ('  - allocate: {candidates: ["gguf:q4_k", 5], budget: {avg_bits: 5}}\n  - gptq: {format: "gguf:q4_k"}',
     "'allocate' may give modules 5"),
])
def test_bad_settings_and_orders_are_refused_at_load(body, message, tiny_llama, text_file):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_text(tiny_llama, text_file, body, text_file) + "export: {format: gguf}\n")


def test_only_the_gguf_format_holds_the_rounded_tables(tiny_llama, text_file):
    body = '  - rtn: {bits: 4, group_size: 32}\n  - quantize_embeddings: {head: "gguf:q8_0"}'
    with pytest.raises(RecipeError, match="quantize_embeddings pass produces"):
        parse_recipe(recipe_text(tiny_llama, text_file, body, text_file) + "export: {format: compressed-tensors}\n")


def test_a_hidden_size_no_block_divides_is_refused_with_the_table_name(tiny_llama, text_file, tmp_path):
    body = '  - quantize_embeddings: {head: "gguf:q6_k"}'  # the tiny model's hidden size is not a multiple of 256
    from compress.recipe.errors import UserError

    with pytest.raises(UserError, match="lm_head|embed_tokens"):
        run_recipe(parse_recipe(recipe_text(tiny_llama, text_file, body, text_file) + "export: {format: gguf}\n"),
                   tmp_path / "run")
    assert not (tmp_path / "run").exists()


@requires_demo_model()
@pytest.mark.parametrize("passes", ['  - awq: {format: "gguf:q3_k"}', '  - signround: {format: "gguf:q3_k", iters: 20}'],
                         ids=["awq", "signround"])
def test_calibrated_rounding_onto_a_gguf_grid_is_exported_exactly_and_beats_rtn(passes, tmp_path):
    """awq and signround on Q3_K's grid: the file's blocks dequantize (gguf-py) to the weights the run scored, and
    the calibrated rounding scores better than RTN on the same grid."""
    from safetensors.torch import load_file

    def run(body: str, name: str) -> dict:
        text = (f"model: {DEMO_MODEL}\ncalibration: {{dataset: {DEMO_DIR / 'calib.txt'}, samples: 16, seq_len: 256, "
                f"seed: 0}}\npasses:\n{body}\nevaluate:\n  perplexity: [{{dataset: {DEMO_DIR / 'eval.txt'}, "
                "seq_len: 256, max_windows: 64}]\nexport: {format: gguf}\n")
        return run_recipe(parse_recipe(text), tmp_path / name)

    rtn, calibrated = run('  - rtn: {format: "gguf:q3_k"}', "rtn"), run(passes, "calibrated")
    ppl = [r["metrics"]["perplexity"]["eval"]["compressed"] for r in (rtn, calibrated)]
    assert ppl[1] < ppl[0]
    reader = gguf.GGUFReader(tmp_path / "calibrated" / "export-gguf" / "model.gguf")
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert down.tensor_type == gguf.GGMLQuantizationType.Q3_K
    dense = run_recipe(parse_recipe(
        f"model: {DEMO_MODEL}\ncalibration: {{dataset: {DEMO_DIR / 'calib.txt'}, samples: 16, seq_len: 256, seed: 0}}\n"
        f"passes:\n{passes}\nexport: {{format: dense, dtype: float32}}\n"), tmp_path / "dense")
    assert dense["size"]["bytes"] == calibrated["size"]["bytes"]
    weights = load_file(tmp_path / "dense" / "export-dense" / "model.safetensors")
    assert np.array_equal(gguf.quants.dequantize(down.data, down.tensor_type),
                          weights["model.layers.1.mlp.down_proj.weight"].numpy())
