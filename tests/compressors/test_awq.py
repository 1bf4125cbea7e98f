"""AWQ: exact scale folding, the scale/clip searches against plain RTN, codes on the grid, masks, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.engine.context import RunContext, RunInputs
from compress.engine.data import sample_windows, tokenize_text
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.recipe.errors import UserError
from compress.engine.model_io import ModelHandle, load_model
from compress.quant.primitives import PerGroup, QuantSpec
from compress.quant.records import quantize_rtn
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_recipe
from compress.compressors.awq import AWQConfig, awq_search_clip, awq_search_scales, clamp_groups, run_awq
from compress.compressors.scaling import scale_groups
from tests.conftest import DEMO_DIR, requires_demo_model, recipe_text
from tests.tiny_models import save_tiny_model, synthetic_text

FAST = dict(grid=10, clip_grid=10, max_tokens=256)


def _calibrated(path: Path, samples: int = 4, seq_len: int = 32) -> tuple[ModelHandle, RunContext]:
    handle = load_model(str(path), device="cpu")
    windows = sample_windows(tokenize_text(handle.tokenizer, synthetic_text()), samples, seq_len, seed=0)
    return handle, RunContext(RunInputs(device=torch.device("cpu"), calibration=windows))


def _awq(handle: ModelHandle, run: RunContext, cfg: AWQConfig) -> dict:
    return run_sweep(handle, [SweepStep("awq", run_awq, cfg, True)], run).modules["awq"]


def _logits(handle: ModelHandle, run: RunContext) -> torch.Tensor:
    with torch.no_grad():
        return handle.model(run.inputs.calibration[:2]).logits


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_folding_scales_leaves_the_model_unchanged(tmp_path, family):
    handle, run = _calibrated(save_tiny_model(tmp_path, family))
    before = _logits(handle, run)
    results = _awq(handle, run, AWQConfig(bits=3, group_size=16, quantize=False, **FAST))
    after = _logits(handle, run)
    assert (after - before).norm() / before.norm() < 1e-4
    assert results and not run.results.records  # scales searched, nothing rounded
    assert all(r["awq_output_mse"] <= r["rtn_output_mse"] for r in results.values())


def test_llama_groups_skip_v_to_o_under_gqa(tiny_llama):
    handle = load_model(str(tiny_llama), device="cpu")  # 4 query heads, 2 kv heads: v_proj rows != o_proj columns
    groups = scale_groups(handle.layers[0], "model.layers.0")
    assert [g.previous.split(".", 3)[-1] for g in groups] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]


def _outlier_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=generator)
    x[:, [3, 17, 40]] *= 30  # a few salient input channels, as in LLM activations
    w = torch.randn(48, 64, generator=generator)
    return x, w


def test_scale_search_beats_plain_rtn_on_outlier_channels():
    x, w = _outlier_layer()
    spec = QuantSpec(3, True, PerGroup(32))
    search = awq_search_scales(x.T @ x / len(x), x.abs().mean(dim=0), [w], [spec], grid=20)
    rtn_error = (x @ (quantize_rtn(w, spec).dequantize() - w).T).pow(2).mean().item()
    assert search.rtn_error == pytest.approx(rtn_error, rel=1e-4)  # the Gram form is the token MSE
    assert search.alpha > 0
    assert search.error < 0.8 * rtn_error
    assert search.scales[[3, 17, 40]].min() > search.scales.median()  # the salient channels are scaled up


def test_scale_search_keeps_unquantized_linears_exact():
    x, w = _outlier_layer()
    search = awq_search_scales(x.T @ x / len(x), x.abs().mean(dim=0), [w], [None], grid=4)
    assert search.error == pytest.approx(0.0, abs=1e-6) and search.alpha == 0.0


def test_clip_search_only_shrinks_and_never_hurts_the_group_outputs():
    x, w = _outlier_layer(1)
    spec = QuantSpec(3, False, PerGroup(16))
    limits = awq_search_clip(x.T @ x / len(x), w, spec, grid=20)
    absmax = w.abs().reshape(48, 4, 16).amax(dim=2)
    assert limits.shape == (48, 4)
    assert torch.all(limits <= absmax + 1e-6) and torch.all(limits >= 0.5 * absmax)
    clipped = quantize_rtn(clamp_groups(w, limits, spec), spec).dequantize()
    plain = quantize_rtn(w, spec).dequantize()
    for start in range(0, 64, 16):  # the search minimises each group's partial output error separately
        columns = slice(start, start + 16)
        error = lambda q: (x[:, columns] @ (q - w)[:, columns].T).pow(2).mean()  # noqa: E731
        assert error(clipped) <= error(plain) * (1 + 1e-5)
    assert torch.any(limits < absmax - 1e-6)  # clipping is actually used at 3 bits


def test_quantized_weights_are_on_the_grid_and_masks_stay_zero(tiny_llama):
    handle, run = _calibrated(tiny_llama)
    down = "model.layers.1.mlp.down_proj"
    module = handle.model.get_submodule(down)
    mask = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    module.weight.data *= mask
    run.handoff.masks[down] = mask
    run.handoff.bit_plan["model.layers.0.self_attn.v_proj"] = QuantSpec(8, False, PerGroup(32))
    results = _awq(handle, run, AWQConfig(bits=3, group_size=16, **FAST))

    assert set(results) == set(run.results.records) and len(results) == 14  # 7 linears x 2 layers
    for fqn, qweight in run.results.records.items():
        spec = qweight.spec
        assert spec.qmin <= int(qweight.codes.min()) and int(qweight.codes.max()) <= spec.qmax, fqn
        torch.testing.assert_close(handle.model.get_submodule(fqn).weight.data, qweight.dequantize())
    assert run.results.records["model.layers.0.self_attn.v_proj"].spec.bits == 8  # the bit plan wins
    assert torch.all(module.weight.data[~mask] == 0)
    assert "clip_ratio_mean" not in results["model.layers.0.self_attn.q_proj"]  # q/k are never clipped
    assert "clip_ratio_mean" in results["model.layers.0.self_attn.o_proj"]


def test_ignored_linears_are_not_quantized(tiny_llama):
    handle, run = _calibrated(tiny_llama)
    results = _awq(handle, run, AWQConfig(bits=4, group_size=16, ignore=["lm_head", "k_proj"], **FAST))
    assert not any("k_proj" in fqn for fqn in results) and not any("k_proj" in fqn for fqn in run.results.records)


def test_unsupported_architecture_is_a_user_error():
    layer = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    with pytest.raises(UserError, match="no scale-folding layout for decoder layer Sequential; supported: "):
        scale_groups(layer, "model.layers.0")


def test_activations_without_quantize_is_rejected():
    with pytest.raises(ValueError, match="set quantize: true"):
        AWQConfig(quantize=False, activations={"bits": 8})


def test_recipe_end_to_end_writes_a_report(tiny_llama, text_file, tmp_path):
    passes = "  - awq: {bits: 4, group_size: 32, grid: 5, clip_grid: 10, max_tokens: 128}"
    report = run_recipe(parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file)), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["passes"][0]["name"] == "awq" and saved["passes"][0]["summary"]["modules"] == 14
    assert report["metrics"]["perplexity"]


def test_awq_scales_then_gptq_rounds(tiny_llama, text_file, tmp_path):
    passes = ("  - awq: {bits: 4, group_size: 32, grid: 5, max_tokens: 128, quantize: false}\n"
              "  - gptq: {bits: 4, group_size: 32}")
    report = run_recipe(parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file)), tmp_path / "out")
    assert [p["name"] for p in report["passes"]] == ["awq", "gptq"]
    assert report["passes"][1]["summary"]["modules"] == 14


# ---------------------------------------------------------------------------------------------------
# The shipped demo model: AWQ must beat RTN where RTN hurts (3 bits).

def _demo_ppl(passes: str, tmp_path: Path) -> dict:
    text = recipe_text(DEMO_DIR / "model", DEMO_DIR / "calib.txt", passes, DEMO_DIR / "eval.txt",
                       samples=32, seq_len=512, max_windows=40)
    report = run_recipe(parse_recipe(text), tmp_path)
    return report["metrics"]["perplexity"]["eval"]


@pytest.fixture(scope="module")
def demo_w3(tmp_path_factory) -> dict[str, dict]:
    return {
        "rtn": _demo_ppl("  - rtn: {bits: 3, group_size: 128}", tmp_path_factory.mktemp("rtn") / "out"),
        "awq": _demo_ppl("  - awq: {bits: 3, group_size: 128}", tmp_path_factory.mktemp("awq") / "out"),
    }


@pytest.mark.slow
@requires_demo_model()
def test_demo_awq_w3_beats_rtn_w3(demo_w3):
    assert demo_w3["awq"]["compressed"] < demo_w3["rtn"]["compressed"]
    assert demo_w3["awq"]["compressed"] < 1.5 * demo_w3["awq"]["baseline"]
