"""Quality gates on the shipped demo model (slow): at 50%, SparseGPT beats or matches Wanda and both beat magnitude;
2:4 costs more than unstructured 50% for every method; layer_drop / width_prune outputs reload with plain
transformers, smaller, and still model the text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.engine.context import RunContext, RunInputs
from compress.engine.data import sample_windows, tokenize_text
from compress.engine.model_io import load_model
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_passes
from compress.evaluators.perplexity import perplexity_of
from tests.conftest import DEMO_DIR, DEMO_MODEL, requires_demo_model

# 16 windows of 512 tokens (8k tokens for 256- and 768-wide Hessians) and the first 48 eval windows keep the six
# runs cheap; the full-size numbers (128 windows, all 103 eval windows) are in bench/results/pruning.md.
CALIBRATION_SAMPLES, EVAL_WINDOWS = 16, 48

pytestmark = [pytest.mark.slow, requires_demo_model()]


@pytest.fixture(scope="module")
def demo():
    handle = load_model(str(DEMO_MODEL))
    calib = sample_windows(tokenize_text(handle.tokenizer, (DEMO_DIR / "calib.txt").read_text()), CALIBRATION_SAMPLES,
                           512, 0)
    eval_ids = tokenize_text(handle.tokenizer, (DEMO_DIR / "eval.txt").read_text())

    def ppl(model):
        return perplexity_of(model, eval_ids, 512, 8, torch.device("cpu"), EVAL_WINDOWS)[0]

    def compress(passes: str):
        recipe = parse_recipe(f"calibration: {{dataset: calib.txt}}\npasses: {passes}\n", base_dir=DEMO_DIR)
        pruned = load_model(str(DEMO_MODEL))
        run = RunContext(RunInputs(device=pruned.device, calibration=calib, calibration_batch_size=8))
        entries, _ = run_passes(pruned, recipe.passes, run)
        return pruned, entries

    return {"ppl": ppl, "compress": compress, "baseline": ppl(handle.model)}


@pytest.fixture(scope="module")
def unstructured(demo):
    results = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern in ("unstructured", "2:4"):
            handle, _ = demo["compress"](f"[{method}: {{sparsity: 0.5, pattern: '{pattern}'}}]")
            results[method, pattern] = demo["ppl"](handle.model)
    print({f"{m} {p}": round(v, 3) for (m, p), v in results.items()}, "baseline", round(demo["baseline"], 3))
    return results


def test_sparsegpt_matches_or_beats_wanda_and_both_beat_magnitude(unstructured, demo):
    sparse, wanda, magnitude = (unstructured[m, "unstructured"] for m in ("sparsegpt", "wanda", "magnitude"))
    assert demo["baseline"] < sparse <= 1.03 * wanda
    assert wanda < magnitude and sparse < 0.95 * magnitude


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_costs_more_than_unstructured_half(unstructured, method):
    assert unstructured[method, "2:4"] > unstructured[method, "unstructured"]


@pytest.mark.parametrize("passes", ["[layer_drop: {count: 1}]",
                                    "[width_prune: {attention_ratio: 0.5, mlp_ratio: 0.25, compensate: true}]"])
def test_structured_output_reloads_smaller_and_still_models_text(demo, tmp_path, passes):
    handle, entries = demo["compress"](passes)
    summary = next(v for v in entries[0]["modules"].values() if "parameters_after" in v)
    handle.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == summary["parameters_after"]
    assert summary["parameters_after"] < 0.9 * summary["parameters_before"]
    ppl = demo["ppl"](reloaded)
    assert demo["baseline"] < ppl < 4 * demo["baseline"]  # damaged, not destroyed (an add-one unigram model scores 782)
    assert ppl == pytest.approx(demo["ppl"](handle.model), rel=1e-5)
