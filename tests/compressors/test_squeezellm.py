"""SqueezeLLM: weighted k-means lowers the weighted error below a uniform grid of as many levels, the important
weights are kept exactly as outliers, sizes count every part, the records round-trip, and the only format that
can hold the tables (dense) is the one a recipe may ask for."""

from __future__ import annotations

import json

import pytest
import torch

from compress.compressors.squeezellm import SqueezeLLMConfig, split_outliers, squeeze_weight
from compress.quant.lookup_records import weighted_kmeans_rows
from compress.quant.lookup_records import LookupTable, WithOutliers
from compress.quant.primitives import PerChannel, QuantSpec
from compress.quant.records import quantize_rtn, restore_record, saved_form
from compress.recipe.errors import RecipeError
from compress.recipe.schema import load_recipe, parse_recipe
from tests.conftest import recipe_text


def heavy_tailed(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, columns)) * 0.02  # LLM weights' heavy tails


def weighted_sq(error: torch.Tensor, energy: torch.Tensor) -> float:
    return float((error.pow(2) * energy).sum())


def test_weighted_kmeans_beats_a_uniform_grid_and_follows_the_importance():
    w = heavy_tailed(16, 512)
    energy = torch.rand(512) ** 4  # a few input columns carry most of the energy
    codes, table = weighted_kmeans_rows(w, energy, bits=3)
    assert codes.shape == w.shape and table.shape == (16, 8) and int(codes.max()) < 8
    kmeans = torch.gather(table, 1, codes)
    uniform = quantize_rtn(w, QuantSpec(3, False, PerChannel())).dequantize()  # 8 evenly spaced levels per row
    assert weighted_sq(w - kmeans, energy) < 0.5 * weighted_sq(w - uniform, energy)
    _, unweighted_table = weighted_kmeans_rows(w, torch.ones(512), bits=3)
    unweighted = torch.gather(unweighted_table, 1, weighted_kmeans_rows(w, torch.ones(512), bits=3)[0])
    assert weighted_sq(w - kmeans, energy) < weighted_sq(w - unweighted, energy)  # the weighting is what it optimises
    assert table.dtype == torch.float32 and torch.equal(table, table.half().float())  # stored as float16, exactly


def test_outliers_are_the_most_important_weights_and_stay_exact():
    w = heavy_tailed(8, 256, seed=1)
    energy = torch.rand(256)
    index = split_outliers(w, energy, 0.01)
    assert index.numel() == 21  # ceil(1% of 2048)
    score = (w.abs() * energy.sqrt()).reshape(-1)
    assert float(score[index].min()) >= float(score.topk(21).values.min())
    record = squeeze_weight(w, energy, SqueezeLLMConfig(bits=2, outliers=0.01))
    assert isinstance(record, WithOutliers) and isinstance(record.inner, LookupTable)
    dense = record.dequantize().reshape(-1)
    assert torch.equal(dense[index], w.reshape(-1)[index].half().float())
    bits = record.storage_bits()
    assert bits.codes == 2048 * 2 and bits.codebooks == 8 * 4 * 16 and bits.outliers == 21 * 48
    tensors, entry = saved_form(record)
    restored = restore_record(json.loads(json.dumps(entry)), lambda part: tensors[part])
    assert torch.equal(restored.dequantize(), record.dequantize())
    assert restored.describe()["outliers"] == 21
    mask = torch.ones(8, 256, dtype=torch.bool)
    mask.reshape(-1)[index[:5]] = False
    with pytest.raises(Exception, match="lookup table"):
        record.keep_zeros(mask)  # the table need not hold 0: refused, not silently non-zero


def test_a_run_writes_tables_and_only_dense_export_is_allowed(tmp_path, tiny_llama, text_file):
    from compress.app.runner import run_recipe

    passes = "  - squeezellm: {bits: 2, outliers: 0.01, iters: 5}"
    with pytest.raises(RecipeError, match="dense"):
        parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file) + "export: {format: compressed-tensors}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_llama, text_file, passes, text_file) + "export: {format: dense}\n")
    report = run_recipe(load_recipe(path), tmp_path / "out")
    modules = report["passes"][0]["modules"]
    assert len(modules) == 14 and all(m["grid"] == "per-row lookup table" and m["outliers"] > 0 for m in modules.values())
    size = report["size"]
    parts = size["stored_bits"]
    assert size["quantized_bits_per_weight"] == pytest.approx(
        (parts["codes"] + parts["codebooks"] + parts["outliers"]) / size["quantized_parameters"], abs=1e-4)
    assert "lookup table" in " ".join(report["export"]["notes"])  # said: the file is dense
    from transformers import AutoModelForCausalLM

    from compress.engine.data import load_text, tokenize_text
    from compress.engine.model_io import load_model
    from compress.evaluators.perplexity import perplexity_of

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "export-dense", dtype=torch.float32)
    ids = tokenize_text(load_model(str(tiny_llama)).tokenizer, load_text(str(text_file)))
    value = perplexity_of(reloaded, ids, 32, 8, torch.device("cpu"), max_windows=4)[0]
    assert value == pytest.approx(report["metrics"]["perplexity"]["text"]["compressed"], rel=1e-3)


def test_the_allocator_chooses_tables_or_integer_grids_per_module_within_the_budget(tmp_path, tiny_llama, text_file):
    """`lut:b` candidates beside integer widths: the plan mixes methods, gptq fills the tables by Hessian-weighted
    k-means, every byte counts against the budget, and a resumed run restores the tables."""
    from compress.app.runner import run_recipe
    from compress.engine.checkpoint import FAULT_ENV

    passes = """  - allocate: {candidates: [2, 3, "lut:2", "lut:3"], samples: 2, max_probes: 4, budget: {avg_bits: 3.2}}
  - gptq: {bits: 2, group_size: 32}"""
    with pytest.raises(RecipeError, match="per-row lookup table"):
        parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file) + "export: {format: compressed-tensors}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_llama, text_file, passes, text_file) + "export: {format: dense}\n")
    report = run_recipe(load_recipe(path), tmp_path / "out")
    modules = report["passes"][1]["modules"]
    tables = [name for name, entry in modules.items() if entry.get("method") == "lookup table"]
    grids = [name for name, entry in modules.items() if "gptq_loss" in entry]
    assert tables and len(tables) + len(grids) == 14, modules
    allocation = report["allocation"]
    assert allocation["used"]["avg_bits"] <= 3.2 + 1e-9
    assert report["size"]["quantized_bits_per_weight"] == pytest.approx(allocation["used"]["avg_bits"], abs=1e-3)
    import os

    os.environ[FAULT_ENV] = "0:INT"  # Ctrl-C right after decoder layer 0 is checkpointed
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe(load_recipe(path), tmp_path / "resumed")
    finally:
        del os.environ[FAULT_ENV]
    resumed = run_recipe(load_recipe(path), tmp_path / "resumed", resume=True)
    assert resumed["metrics"] == report["metrics"] and resumed["size"] == report["size"]
