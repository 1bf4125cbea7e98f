"""Must-show round trip on the demo model for element-float weights: NVFP4 (RTN, data-free), exported as
compressed-tensors and reloaded with plain transformers on the CPU, keeps the in-memory perplexity to 0.1%.

NVFP4 is the case that can drift: transformers decompresses it into bfloat16 weights and computes in bfloat16.
FP8 reloads in float32 with exactly our weights: tests/export/test_float_formats.py compares its logits bit for bit
(per tensor, channel and block), and bench/serving_weights.py its perplexity on every demo window."""

from __future__ import annotations

import pytest
import torch

from compress.compressors.rtn import RTNConfig, run_rtn
from compress.engine.context import RunContext, RunInputs
from compress.engine.data import load_text, tokenize_text
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.engine.model_io import load_model
from compress.export import CompressedModel, export_checkpoint
from compress.export.inspect import inspect_checkpoint
from compress.report.summary import model_size
from tests.conftest import DEMO_DIR, DEMO_MODEL, requires_demo_model
from tests.export.test_demo_round_trip import TOLERANCE, perplexity

pytestmark = [pytest.mark.slow, requires_demo_model()]


def test_nvfp4_export_reloads_with_the_in_memory_perplexity(tmp_path):
    from transformers import AutoModelForCausalLM

    config, reload_dtype = RTNConfig(format="nvfp4"), torch.bfloat16
    handle = load_model(str(DEMO_MODEL), device="cpu")
    run = RunContext(RunInputs(device=torch.device("cpu")))
    run_sweep(handle, [SweepStep("rtn", run_rtn, config, False)], run)
    eval_ids = tokenize_text(handle.tokenizer, load_text(str(DEMO_DIR / "eval.txt")))
    in_memory = perplexity(handle.model, eval_ids)
    compressed = CompressedModel(handle.model, handle.tokenizer, handle.checkpoint_dtype, run.results.records)
    export_checkpoint(compressed, "compressed-tensors", tmp_path / "ct")
    reloaded = perplexity(AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=reload_dtype), eval_ids)
    print(f"\n{config.float_label}: in-memory {in_memory:.4f}, reloaded ({reload_dtype}) {reloaded:.4f}, "
          f"change {(reloaded / in_memory - 1) * 100:+.4f}%")
    assert abs(reloaded / in_memory - 1) < TOLERANCE  # measured: +0.065% (8 windows)
    size = model_size(handle.model, run.results.records, handle.checkpoint_dtype)
    assert inspect_checkpoint(tmp_path / "ct").totals["bytes"] == size["bytes"]
