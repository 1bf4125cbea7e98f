"""layer_drop and width_prune: the pure kernels, and models that really shrink, save with `save_pretrained` and
reload with plain `AutoModelForCausalLM.from_pretrained` (no compress code involved in loading) with identical
logits and the smaller parameter count."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.engine.context import RunContext, RunInputs
from compress.recipe.errors import UserError
from compress.engine.model_io import load_model
from compress.compressors.layer_drop import LayerDropConfig, block_influence, layers_to_drop, run_layer_drop
from compress.compressors.width_prune import (
    ChannelStats,
    WidthPruneConfig,
    channel_importance,
    group_importance,
    kept_indices,
    run_width_prune,
)
from tests.tiny_models import save_tiny_model


def calibration(samples=8, seq_len=32, seed=0):
    return torch.randint(2, 300, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def run_model_pass(path, apply, cfg):
    handle = load_model(str(path))
    run = RunContext(RunInputs(device=handle.device, calibration=calibration(), calibration_batch_size=4))
    return handle, apply(handle, cfg, run)


@torch.no_grad()
def logits(model):
    return model(calibration(2, 16, seed=7), use_cache=False).logits


def reload(handle, folder):
    handle.model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_block_influence_is_zero_for_identity_and_one_for_orthogonal():
    x = torch.randn(2, 5, 8)
    assert block_influence(x, 3 * x)[0] == pytest.approx(0, abs=1e-5)
    a, b = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    a[..., 0], b[..., 1] = 1, 1
    assert block_influence(a, b) == (pytest.approx(1.0), 1)
    assert layers_to_drop([0.5, 0.1, 0.9, 0.2], 2) == [1, 3]


def test_width_kernels_rank_by_fluctuation_times_weight_norm():
    stats = ChannelStats.empty(4, torch.device("cpu"))
    x = torch.tensor([[1.0, 5.0, 0.0, 2.0], [1.0, -5.0, 0.0, -2.0]])  # channel 0 is constant, 1 varies most
    stats.add(x)
    weight = torch.ones(3, 4)
    fluct = channel_importance(stats, weight, "fluctuation")
    assert fluct.tolist() == pytest.approx([0.0, 75.0, 0.0, 12.0])
    assert channel_importance(stats, weight, "magnitude").tolist() == pytest.approx([3.0, 75.0, 0.0, 12.0])
    assert group_importance(torch.arange(8.0), head_dim=2, heads_per_group=2).tolist() == [6.0, 22.0]
    assert kept_indices(torch.tensor([3.0, 1.0, 4.0, 1.5]), 2).tolist() == [0, 2]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layer_drop_saves_a_smaller_model_that_transformers_loads(tmp_path, family):
    path = save_tiny_model(tmp_path / "src", family)
    handle, results = run_model_pass(path, run_layer_drop, LayerDropConfig(count=1))
    dropped = [name for name, r in results.items() if r.get("dropped")]
    assert len(dropped) == 1 and len(handle.layers) == 1 and handle.model.config.num_hidden_layers == 1
    summary = results["model.layers"]
    assert summary["parameters_after"] == handle.parameter_count() < summary["parameters_before"]
    assert summary["layers_before"] == 2 and summary["layers_after"] == 1
    kept_index = 1 - int(dropped[0].rsplit(".", 1)[1])
    influence = [results[f"model.layers.{i}"]["block_influence"] for i in range(2)]
    assert influence[kept_index] >= influence[1 - kept_index] > 0
    assert handle.layers[0].self_attn.layer_idx == 0
    reloaded = reload(handle, tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 1 and len(reloaded.model.layers) == 1
    assert sum(p.numel() for p in reloaded.parameters()) == summary["parameters_after"]
    torch.testing.assert_close(logits(reloaded), logits(handle.model))
    if family == "qwen2":
        assert reloaded.config.layer_types == ["full_attention"]


def test_layer_drop_needs_exactly_one_size_and_keeps_a_layer(tiny_llama):
    with pytest.raises(ValueError, match="exactly one of `count`"):
        LayerDropConfig(count=1, ratio=0.5)
    with pytest.raises(UserError, match="keep at least one"):
        run_model_pass(tiny_llama, run_layer_drop, LayerDropConfig(count=2))


@pytest.mark.parametrize("compensate", [False, True])
def test_width_prune_gqa_shrinks_tensors_and_config_and_reloads(tiny_llama, tmp_path, compensate):
    # tiny Llama: 4 query heads in 2 KV groups of head_dim 16, intermediate 160
    cfg = WidthPruneConfig(attention_ratio=0.5, mlp_ratio=0.25, compensate=compensate)
    handle, results = run_model_pass(tiny_llama, run_width_prune, cfg)
    config = handle.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.intermediate_size == 120
    attn, mlp = handle.layers[0].self_attn, handle.layers[0].mlp
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32) and mlp.down_proj.weight.shape == (64, 120)
    assert (attn.o_proj.bias is not None) == compensate and (mlp.down_proj.bias is not None) == compensate
    assert results["model.layers.1.self_attn"]["kv_groups_removed"] == 1
    assert results["model"]["parameters_after"] == handle.parameter_count() < results["model"]["parameters_before"]
    reloaded = reload(handle, tmp_path / "out")
    assert sum(p.numel() for p in reloaded.parameters()) == results["model"]["parameters_after"]
    torch.testing.assert_close(logits(reloaded), logits(handle.model))


def test_width_prune_compensation_reduces_the_output_error(tiny_llama):
    reference = logits(load_model(str(tiny_llama)).model)
    errors = {}
    for compensate in (False, True):
        cfg = WidthPruneConfig(mlp_ratio=0.5, compensate=compensate, metric="fluctuation")
        handle, _ = run_model_pass(tiny_llama, run_width_prune, cfg)
        errors[compensate] = float((logits(handle.model) - reference).norm())
    assert 0 < errors[True] < errors[False]


def test_width_prune_compensation_needs_a_bias_flag(tmp_path):
    path = save_tiny_model(tmp_path / "q", "qwen2")
    with pytest.raises(UserError, match="no mlp_bias flag"):
        run_model_pass(path, run_width_prune, WidthPruneConfig(mlp_ratio=0.25, compensate=True))


def test_recipe_with_pruning_and_structured_passes_reports_the_smaller_model(tiny_llama, text_file, tmp_path):
    import json

    from compress.recipe.schema import parse_recipe
    from compress.app.runner import run_recipe
    from tests.conftest import recipe_text

    # restructuring first (PASS_ORDER): masks recorded before a layer drop would name renumbered layers
    passes = '  - width_prune: {attention_ratio: 0.5, mlp_ratio: 0.5}\n  - layer_drop: {count: 1}\n  - wanda: {pattern: "2:4"}'
    report = run_recipe(parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file)), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["model"]["decoder_layers"] == 1
    width, drop, wanda = report["passes"]
    assert saved["model"]["parameters"] == drop["modules"]["model.layers"]["parameters_after"]
    assert drop["modules"]["model.layers"]["parameters_before"] == width["modules"]["model"]["parameters_after"]
    assert width["modules"]["model"]["parameters_after"] < width["modules"]["model"]["parameters_before"]
    assert wanda["summary"]["mean_sparsity"] == pytest.approx(0.5) and wanda["summary"]["modules"] == 7  # one layer left
    assert "| width_prune |" in (tmp_path / "out" / "report.md").read_text()


def test_kept_head_count_divides_hidden_size():
    from types import SimpleNamespace

    from compress.compressors.width_prune import plan_width

    demo_like = SimpleNamespace(num_attention_heads=4, num_key_value_heads=4, hidden_size=256, head_dim=64,
                                intermediate_size=768)
    plan = plan_width(demo_like, WidthPruneConfig(attention_ratio=0.25, mlp_ratio=0.25))
    assert plan.keep_groups == 2 and plan.keep_intermediate == 576  # 3 of 4 heads would not load: keep 2
    assert plan_width(demo_like, WidthPruneConfig(attention_ratio=0.0)).keep_groups == 4
    gqa = SimpleNamespace(num_attention_heads=12, num_key_value_heads=4, hidden_size=96, intermediate_size=64)
    assert plan_width(gqa, WidthPruneConfig(attention_ratio=0.25)).keep_groups == 2  # 3 groups = 9 heads ∤ 96
