"""SmoothQuant: an exact transform that flattens per-channel activation maxima, and W8A8 after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.engine.context import RunContext, RunInputs
from compress.engine.data import sample_windows, tokenize_text
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.engine.model_io import ModelHandle, load_model
from compress.quant.primitives import QuantSpec, fake_quantize_per_token
from compress.quant.records import quantize_rtn
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_recipe
from compress.compressors.rtn import RTNConfig, run_rtn
from compress.compressors.smoothquant import SmoothQuantConfig, max_min_ratio, run_smoothquant, smoothing_scales
from tests.conftest import DEMO_DIR, recipe_text, requires_demo_model
from tests.tiny_models import save_tiny_model, synthetic_text


def _calibrated(path: Path) -> tuple[ModelHandle, RunContext]:
    handle = load_model(str(path), device="cpu")
    windows = sample_windows(tokenize_text(handle.tokenizer, synthetic_text()), 4, 32, seed=0)
    return handle, RunContext(RunInputs(device=torch.device("cpu"), calibration=windows))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_smoothing_leaves_the_model_unchanged(tmp_path, family):
    handle, run = _calibrated(save_tiny_model(tmp_path, family))
    with torch.no_grad():
        before = handle.model(run.inputs.calibration[:2]).logits
        results = run_sweep(handle, [SweepStep("sq", run_smoothquant, SmoothQuantConfig(), True)], run).modules["sq"]
        after = handle.model(run.inputs.calibration[:2]).logits
    assert (after - before).norm() / before.norm() < 1e-4
    assert results and all(r["act_max_ratio_after"] < r["act_max_ratio_before"] for r in results.values())
    assert not run.results.records  # a transform, not a quantizer


def test_only_norm_fed_groups_are_smoothed(tiny_llama):
    handle, run = _calibrated(tiny_llama)
    results = run_sweep(handle, [SweepStep("sq", run_smoothquant, SmoothQuantConfig(), True)], run).modules["sq"]
    assert sorted(fqn.split(".", 3)[-1] for fqn in results if ".0." in fqn) == [
        "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]


def test_already_quantized_modules_are_not_rescaled_and_the_skip_is_recorded(tiny_llama):
    handle, run = _calibrated(tiny_llama)
    steps = [SweepStep("rtn", run_rtn, RTNConfig(bits=8), False), SweepStep("sq", run_smoothquant, SmoothQuantConfig(), True)]
    results = run_sweep(handle, steps, run).modules["sq"]
    assert results == {}
    assert len(run.results.fallbacks) == 4 and run.results.fallbacks[0]["pass"] == "smoothquant"  # 2 groups x 2 layers
    for fqn, qweight in run.results.records.items():
        torch.testing.assert_close(handle.model.get_submodule(fqn).weight.data, qweight.dequantize())


def test_scales_flatten_outlier_channels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    x[:, [5, 33]] *= 50  # the systematic outlier channels SmoothQuant targets
    w = torch.randn(96, 64, generator=generator) * 0.05
    before = x.abs().amax(dim=0)
    scales = smoothing_scales(before, [w[:48], w[48:]], alpha=0.5)
    after = (x / scales).abs().amax(dim=0)
    assert max_min_ratio(after) < max_min_ratio(before) / 5
    # α = 0.5 balances the two: each channel's activation max equals its (scaled) weight max.
    torch.testing.assert_close(after, (w * scales).abs().amax(dim=0), rtol=1e-4, atol=1e-6)


def test_smoothing_lowers_w8a8_error_when_activations_have_outliers():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=generator)
    x[:, [5, 33]] *= 50
    w = torch.randn(96, 64, generator=generator) * 0.05
    exact = x @ w.T
    w8 = lambda m: quantize_rtn(m, QuantSpec(8)).dequantize()  # noqa: E731  (per-channel weights)

    def w8a8_error(scales: torch.Tensor) -> float:
        return ((fake_quantize_per_token(x / scales, 8) @ w8(w * scales).T - exact).pow(2).mean()).item()

    plain = w8a8_error(torch.ones(64))
    smoothed = w8a8_error(smoothing_scales(x.abs().amax(dim=0), [w], alpha=0.5))
    assert smoothed < plain / 4


def test_alpha_zero_only_normalises_weights():
    x_max = torch.tensor([1.0, 100.0])
    w = torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(smoothing_scales(x_max, [w], alpha=0.0), torch.tensor([2.0, 0.5]))


W8A8 = "  - rtn: {bits: 8, group_size: null, activations: {bits: 8, per: token}}"
SMOOTH_W8A8 = "  - smoothquant: {alpha: 0.5}\n" + W8A8


def test_w8a8_after_smoothing_runs_on_a_tiny_model(tiny_llama, text_file, tmp_path):
    text = recipe_text(tiny_llama, text_file, SMOOTH_W8A8, text_file)
    report = run_recipe(parse_recipe(text), tmp_path / "out")
    assert [p["name"] for p in report["passes"]] == ["smoothquant", "rtn"]
    assert len(report["activation_quantization"]) == 14
    ppl = report["metrics"]["perplexity"]
    (values,) = ppl.values()
    assert values["compressed"] == pytest.approx(values["baseline"], rel=0.05)


@pytest.mark.parametrize("quantizer", [W8A8, W8A8.replace("rtn:", "gptq:")])
def test_smoothing_then_quantizer_writes_codes_and_activation_hooks(tiny_llama, text_file, tmp_path, quantizer):
    text = recipe_text(tiny_llama, text_file, "  - smoothquant: {alpha: 0.5}\n" + quantizer, text_file)
    report = run_recipe(parse_recipe(text), tmp_path / "out")
    quantizer_report = report["passes"][1]
    assert quantizer_report["summary"]["modules"] == 14 and quantizer_report["summary"]["mean_bits"] == 8
    assert not report["fallbacks"]
    (values,) = report["metrics"]["perplexity"].values()
    assert values["compressed"] == pytest.approx(values["baseline"], rel=0.05)


# ---------------------------------------------------------------------------------------------------
# The shipped demo model.

@pytest.fixture(scope="module")
def demo_w8a8(tmp_path_factory) -> dict[str, dict]:
    runs = {}
    for name, passes in [("w8a8", W8A8), ("smooth_w8a8", SMOOTH_W8A8)]:
        text = recipe_text(DEMO_DIR / "model", DEMO_DIR / "calib.txt", passes, DEMO_DIR / "eval.txt",
                           samples=32, seq_len=512, max_windows=40)
        runs[name] = run_recipe(parse_recipe(text), tmp_path_factory.mktemp(name) / "out")["metrics"]["perplexity"]["eval"]
    return runs


@pytest.mark.slow
@requires_demo_model()
def test_demo_smoothquant_w8a8_stays_within_two_percent(demo_w8a8):
    smooth = demo_w8a8["smooth_w8a8"]
    assert smooth["compressed"] < 1.02 * smooth["baseline"]


@pytest.mark.slow
@requires_demo_model()
def test_demo_smoothquant_is_no_worse_than_plain_w8a8(demo_w8a8):
    # The demo model has no activation outliers (per-channel max |x| spreads only ~1.5-2.2x across channels,
    # vs. 100x in large LLMs), so per-token A8 is already nearly lossless and smoothing has nothing to fix.
    # Measured (40 windows): baseline 10.2952, W8A8 10.3103, SmoothQuant + W8A8 10.3080. The 0.02% gap
    # is noise-sized, so only "not worse" is asserted; the outlier case is covered by
    # test_smoothing_lowers_w8a8_error_when_activations_have_outliers.
    assert demo_w8a8["smooth_w8a8"]["compressed"] <= 1.001 * demo_w8a8["w8a8"]["compressed"]
