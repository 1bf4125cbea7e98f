"""The shipped FP8 W8A8 dynamic recipe on the demo model: perplexity within 0.5% of fp32 (issue 18's bar)."""

from __future__ import annotations

import torch

from compress.app.runner import run_passes
from compress.engine.context import RunContext, RunInputs
from compress.engine.data import load_text, tokenize_text
from compress.engine.model_io import load_model
from compress.evaluators.perplexity import perplexity_of
from compress.recipe.schema import load_recipe
from tests.conftest import DEMO_DIR, REPO, requires_demo_model

WINDOWS = 4  # of eval.txt's 103; BENCHMARKS.md "Serving formats" has all of them


@requires_demo_model()
def test_fp8_dynamic_recipe_is_within_half_a_percent_of_fp32():
    recipe = load_recipe(REPO / "recipes" / "fp8-dynamic.yaml")
    handle = load_model(str(DEMO_DIR / "model"), dtype="float32", device="cpu")
    eval_ids = tokenize_text(handle.tokenizer, load_text(str(DEMO_DIR / "eval.txt")))
    baseline, _ = perplexity_of(handle.model, eval_ids, 512, 4, torch.device("cpu"), WINDOWS)
    run = RunContext(RunInputs(device=handle.device))
    run_passes(handle, recipe.passes, run)
    fp8, _ = perplexity_of(handle.model, eval_ids, 512, 4, torch.device("cpu"), WINDOWS)
    assert len(run.results.activation_quant) == 28  # every decoder linear quantizes its input in the forward
    assert baseline < fp8 < baseline * 1.005, (baseline, fp8)
