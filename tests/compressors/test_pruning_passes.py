"""The magnitude / wanda / sparsegpt passes on a tiny Llama: exact sparsity per module (counting zeros), N:M
validity, `ignore`d modules untouched, masks kept for later passes, sparsegpt then gptq keeping the mask, schedules,
and recipe-level errors."""

from __future__ import annotations

import pytest
import torch

from compress.engine.context import RunContext, RunInputs
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.recipe.errors import RecipeError, UserError
from compress.engine.model_io import load_model
from compress.quant.modules import find_linears, weight_matrix
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_passes
from compress.compressors.magnitude import MagnitudeConfig, run_magnitude
from compress.compressors.sparsegpt import SparseGPTConfig, run_sparsegpt
from compress.compressors.sparsity import NM, is_nm
from compress.compressors.wanda import WandaConfig, run_wanda

PASSES = {"magnitude": (run_magnitude, MagnitudeConfig, False), "wanda": (run_wanda, WandaConfig, True),
          "sparsegpt": (run_sparsegpt, SparseGPTConfig, True)}


def calibration(samples=8, seq_len=32, seed=0):
    return torch.randint(2, 300, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def prune(model_path, name, **params):
    apply, config, calibrated = PASSES[name]
    handle = load_model(str(model_path))
    run = RunContext(RunInputs(device=handle.device, calibration=calibration(), calibration_batch_size=4))
    sweep = run_sweep(handle, [SweepStep(name, apply, config(**params), calibrated)], run)
    return handle, run, sweep.modules[name]


def linears(handle):
    return find_linears(handle.layers, handle.layers_prefix)


@pytest.mark.parametrize("name,sparsity", [("magnitude", 0.5), ("wanda", 0.75), ("sparsegpt", 0.5)])
def test_exact_sparsity_per_module_and_ignore_untouched(tiny_llama, name, sparsity):
    original = {fqn: weight_matrix(m).clone() for fqn, m in linears(load_model(str(tiny_llama))).items()}
    handle, run, modules = prune(tiny_llama, name, sparsity=sparsity, ignore=["lm_head", "*.v_proj"])
    for fqn, module in linears(handle).items():
        weight = weight_matrix(module)
        if fqn.endswith("v_proj"):
            assert torch.equal(weight, original[fqn]) and fqn not in modules and fqn not in run.handoff.masks
            continue
        assert int((weight == 0).sum()) == round(sparsity * weight.numel()), fqn  # every tiny width divides
        assert torch.equal(run.handoff.masks[fqn], weight != 0)
        assert modules[fqn]["sparsity"] == pytest.approx(sparsity)
    assert len(modules) == 12 and run.results.fallbacks == []
    assert torch.equal(handle.model.lm_head.weight, load_model(str(tiny_llama)).model.lm_head.weight)


@pytest.mark.parametrize("name,pattern", [("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
                                          ("sparsegpt", "4:8")])
def test_nm_pattern_in_every_group_of_the_input_dimension(tiny_llama, name, pattern):
    nm = NM(*map(int, pattern.split(":")))
    handle, run, modules = prune(tiny_llama, name, pattern=pattern)
    for fqn, module in linears(handle).items():
        weight = weight_matrix(module)
        groups = (weight != 0).reshape(weight.shape[0], -1, nm.m).sum(dim=2)
        assert groups.max() <= nm.n and int((weight == 0).sum()) == weight.numel() // 2, fqn
        assert is_nm(run.handoff.masks[fqn], nm) and modules[fqn]["nm_valid"] is True


def test_wanda_and_sparsegpt_differ_from_magnitude(tiny_llama):
    masks = {name: prune(tiny_llama, name, sparsity=0.5)[1].handoff.masks for name in PASSES}
    fqn = "model.layers.1.mlp.down_proj"
    assert not torch.equal(masks["wanda"][fqn], masks["magnitude"][fqn])
    assert not torch.equal(masks["sparsegpt"][fqn], masks["wanda"][fqn])


def test_schedule_gives_each_layer_its_sparsity(tiny_llama):
    handle, _run, modules = prune(tiny_llama, "wanda", sparsity=[0.25, 0.75])
    for fqn, module in linears(handle).items():
        expected = 0.25 if ".layers.0." in fqn else 0.75
        assert float((weight_matrix(module) == 0).float().mean()) == pytest.approx(expected), fqn


def test_schedule_shorter_than_the_model_is_a_user_error(tiny_llama):
    with pytest.raises(UserError, match="schedule has 1 values"):
        prune(tiny_llama, "magnitude", sparsity=[0.5])


def test_sparsegpt_then_gptq_keeps_exactly_the_mask(tiny_llama, text_file):
    text = f"""
calibration: {{dataset: {text_file}, samples: 8, seq_len: 32}}
passes:
  - sparsegpt: {{pattern: "2:4"}}
  - gptq: {{bits: 4, group_size: 32}}
"""
    recipe = parse_recipe(text)
    handle = load_model(str(tiny_llama))
    run = RunContext(RunInputs(device=handle.device, calibration=calibration(), calibration_batch_size=4))
    entries, _ = run_passes(handle, recipe.passes, run)
    assert len(entries[1]["modules"]) == 14 and len(run.handoff.masks) == 14
    for fqn, module in linears(handle).items():
        weight, keep = weight_matrix(module), run.handoff.masks[fqn]
        assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum()))), fqn
        assert (weight[keep] != 0).float().mean() > 0.9  # the kept weights stay (nearly all) nonzero
        assert torch.equal(run.results.records[fqn].dequantize(), weight)
        assert is_nm(weight != 0, NM(2, 4))


def test_nm_needs_divisible_widths(tiny_llama):
    handle = load_model(str(tiny_llama))
    layer = handle.layers[0]
    layer.mlp.down_proj = torch.nn.Linear(158, 64, bias=False)  # an odd width; never run forward
    layer.mlp.gate_proj = layer.mlp.up_proj = torch.nn.Linear(64, 158, bias=False)
    run = RunContext(RunInputs(device=handle.device))
    with pytest.raises(UserError, match="158 input features, not a multiple of 4.*add it to `ignore`"):
        run_sweep(handle, [SweepStep("magnitude", run_magnitude, MagnitudeConfig(pattern="2:4"), False)], run)


def test_recipe_errors_point_at_pruning_fields():
    text = "passes:\n  - wanda: {sparsity: 0.6, pattern: '2:4'}\n  - magnitude: {pattern: '3:2'}\n  - wanda: {sparsity: 0.5}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, filename="r.yaml")
    message = str(info.value)
    assert "r.yaml:2 passes[0].wanda" in message and "prunes exactly 0.5" in message
    assert "passes[1].magnitude.pattern" in message and "0 < N < M" in message
    assert "needs calibration data" in message
    with pytest.raises(RecipeError, match='YAML reads an unquoted 2:4 as the number 124; write pattern: "2:4"'):
        parse_recipe("passes:\n  - magnitude: {pattern: 2:4}\n", filename="r.yaml")


def test_owl_plan_sets_each_layers_sparsity_with_the_mean_at_target(tiny_llama, text_file):
    text = f"""
calibration: {{dataset: {text_file}, samples: 8, seq_len: 32}}
passes:
  - owl: {{sparsity: 0.5, spread: 0.1, threshold: 3}}
  - wanda: {{sparsity: 0.5}}
"""
    handle = load_model(str(tiny_llama))
    run = RunContext(RunInputs(device=handle.device, calibration=calibration(), calibration_batch_size=4))
    entries, _ = run_passes(handle, parse_recipe(text).passes, run)
    plan = run.handoff.layer_sparsity
    assert set(plan) == {"model.layers.0", "model.layers.1"}
    assert sum(plan.values()) / 2 == pytest.approx(0.5) and max(plan.values()) - min(plan.values()) == pytest.approx(0.2)
    shares = {k: v["outlier_share"] for k, v in entries[0]["modules"].items()}
    assert min(plan, key=plan.__getitem__) == max(shares, key=shares.__getitem__)  # more outliers, fewer pruned
    for fqn, module in linears(handle).items():
        layer = ".".join(fqn.split(".")[:3])
        assert float((weight_matrix(module) == 0).float().mean()) == pytest.approx(plan[layer], abs=0.02), fqn


def test_owl_needs_a_pruning_pass_after_it():
    text = "calibration: {dataset: x.txt}\npasses:\n  - owl: {sparsity: 0.5}\n  - rtn: {bits: 4}\n"
    with pytest.raises(RecipeError, match="writes per-layer sparsities, so a pruning pass must follow it"):
        parse_recipe(text, filename="r.yaml")
