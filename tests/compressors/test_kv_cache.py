"""The FP8 KV cache: quantizes the post-RoPE keys and values attention reads, calibrated, resumed and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compress.engine.activations import DeviceStore, layer_inputs
from compress.engine.checkpoint import FAULT_ENV
from compress.engine.context import RunContext, RunInputs
from compress.engine.layer_sweep import LayerContext
from compress.quant.element_float import fake_quantize_fp8
from compress.quant.kv_cache import install_kv_cache
from compress.recipe.errors import UserError
from tests.conftest import recipe_text
from tests.tiny_models import FAMILIES, save_tiny_model


def tiny_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, model.model.layers[0].self_attn


def attend(model, attention, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos_sin = model.model.rotary_emb(hidden, positions[None])
    return attention(hidden, position_embeddings=cos_sin, attention_mask=None)[0]


def reference_attention(model, attention, hidden, positions, k_scale, v_scale) -> torch.Tensor:
    """The same attention written out: project, RoPE, fake-quantize k and v, then sdpa and o_proj."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    cos, sin = model.model.rotary_emb(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = fake_quantize_fp8(k, k_scale), fake_quantize_fp8(v, v_scale)  # after RoPE, as the cache stores them
    out, _ = sdpa_attention_forward(attention, q, k, v, None, dropout=0.0, scaling=attention.scaling)
    return attention.o_proj(out.reshape(*hidden.shape[:-1], -1))


@pytest.mark.parametrize("strategy", ["tensor", "head"])
def test_hook_quantizes_the_post_rope_states_by_exactly_the_fp8_error(strategy):
    model, attention = tiny_attention()
    hidden, positions = torch.randn(2, 8, 64), torch.arange(8)
    plain = attend(model, attention, hidden, positions)
    scales = [[0.002], [0.003]] if strategy == "tensor" else [[0.002, 0.004], [0.003, 0.001]]
    install_kv_cache("layers.0.self_attn", attention, {"strategy": strategy, "k_scale": scales[0], "v_scale": scales[1]}, {})
    hooked = attend(model, attention, hidden, positions)
    shape = (-1, 1, 1) if strategy == "head" else (1,)
    expected = reference_attention(model, attention, hidden, positions, torch.tensor(scales[0]).reshape(shape),
                                   torch.tensor(scales[1]).reshape(shape))
    torch.testing.assert_close(hooked, expected, rtol=0, atol=1e-6)
    change = (hooked - plain).abs().max().item()
    assert 1e-4 < change < 0.05 * plain.abs().max().item()  # FP8's few-percent rounding, not nothing and not noise


def test_hook_leaves_attention_unchanged_when_the_states_are_on_the_grid():
    model, attention = tiny_attention()
    scale = 0.01
    with torch.no_grad():  # projections whose columns are FP8 values x scale, read by one-hot tokens
        for proj in (attention.k_proj, attention.v_proj):
            proj.weight.copy_(fake_quantize_fp8(proj.weight, torch.tensor(scale)))
    hidden, positions = torch.eye(64)[:8][None], torch.zeros(8, dtype=torch.long)  # position 0 everywhere: RoPE is identity
    plain = attend(model, attention, hidden, positions)
    install_kv_cache("layers.0.self_attn", attention, {"strategy": "tensor", "k_scale": [scale], "v_scale": [scale]}, {})
    assert torch.equal(attend(model, attention, hidden, positions), plain)


class HandRolledAttention(nn.Module):
    """Attention that computes softmax itself, never calling transformers' attention interface."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(64, 192)

    def forward(self, hidden, **_):
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v


class HandRolledLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = HandRolledAttention(config)

    def forward(self, hidden, **kwargs):
        return hidden + self.self_attn(hidden, **kwargs)


def test_a_family_whose_attention_bypasses_the_interface_is_refused_by_name():
    from compress.compressors.kv_cache import KVCacheConfig, run_kv_cache

    model, _ = tiny_attention()
    layer = HandRolledLayer(model.config)
    store = DeviceStore(torch.device("cpu"))
    store.append(torch.randn(2, 8, 64))
    ctx = LayerContext(0, "model.layers.0", layer, layer_inputs(store, [{}]), RunContext(RunInputs(torch.device("cpu"))))
    with pytest.raises(UserError, match=r"the attention of llama \(HandRolledAttention\) never passes its key and value "
                                        "states to transformers' attention interface"):
        run_kv_cache(ctx, KVCacheConfig())


# SmoothQuant in front of FP8 W8A8 with a static (MSE) input scale, then a per-head KV cache (percentile).
PASSES = """  - smoothquant: {alpha: 0.5}
  - rtn: {format: fp8, activations: {format: fp8, per: tensor, static: true, observer: mse}}
  - kv_cache: {strategy: head, observer: percentile}"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_llama, text_file) -> Path:
    path = tmp_path_factory.mktemp("kv") / "recipe.yaml"
    path.write_text(recipe_text(tiny_llama, text_file, PASSES, text_file) + "export: {format: compressed-tensors}\n")
    return path


def test_static_and_kv_scales_survive_a_resume_and_reach_the_export(recipe, monkeypatch):
    from compressed_tensors.quantization import QuantizationConfig

    from compress.app.runner import run_recipe
    from compress.recipe.schema import load_recipe

    loaded = load_recipe(recipe)
    straight = run_recipe(loaded, recipe.parent / "straight")
    with monkeypatch.context() as patch:
        patch.setenv(FAULT_ENV, "0:INT")  # Ctrl-C right after decoder layer 0 is checkpointed
        with pytest.raises(KeyboardInterrupt):
            run_recipe(loaded, recipe.parent / "resumed")
    resumed = run_recipe(loaded, recipe.parent / "resumed", resume=True)
    assert resumed["activation_quantization"] == straight["activation_quantization"]
    assert resumed["kv_cache"] == straight["kv_cache"]
    assert resumed["metrics"] == straight["metrics"]  # layer 0's restored hooks really quantize
    static = straight["activation_quantization"]["model.layers.0.self_attn.o_proj"]
    assert static["observer"] == "mse" and static["input_scale"] > 0
    kv = straight["kv_cache"]["model.layers.1.self_attn"]
    assert len(kv["k_scale"]) == 2 and kv["observer"] == "percentile"  # one scale per KV head

    export = recipe.parent / "straight" / "export-compressed-tensors"
    quantization = json.loads((export / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(quantization)  # the library's own parsing
    assert parsed.kv_cache_scheme.strategy == "attn_head" and parsed.kv_cache_scheme.type == "float"
    inputs = parsed.config_groups["group_0"].input_activations
    assert (inputs.type, inputs.strategy, inputs.dynamic, inputs.num_bits) == ("float", "tensor", False, 8)
    from safetensors import safe_open

    with safe_open(str(export / "model.safetensors"), "pt") as stored:
        assert stored.get_tensor("model.layers.1.self_attn.k_scale").flatten().tolist() == pytest.approx(kv["k_scale"])
        assert stored.get_tensor("model.layers.1.self_attn.k_scale").shape == (2, 1, 1)
        assert stored.get_tensor("model.layers.0.self_attn.o_proj.input_scale").item() == pytest.approx(static["input_scale"])

    from compress.export.inspect import inspect_checkpoint

    shown = inspect_checkpoint(export, sparsity=False)  # what `compress inspect` prints
    assert shown.kv_cache == "fp8 static per attn_head"
    assert {row.activations for row in shown.modules if row.format.startswith("float-quantized")} == {"fp8 static per tensor"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_routes_its_cache_through_the_hook(tmp_path, family):
    from compress.app.runner import run_passes
    from compress.engine.model_io import load_model
    from compress.recipe.schema import parse_recipe

    handle = load_model(str(save_tiny_model(tmp_path / family, family)), dtype="float32", device="cpu")
    probe = torch.randint(5, 300, (1, 16))
    with torch.no_grad():
        before = handle.model(probe, use_cache=False).logits
    (tmp_path / "calib.txt").write_text("the windows come from RunInputs below")
    recipe = parse_recipe("calibration: {dataset: calib.txt, samples: 2, seq_len: 32}\npasses: [kv_cache]\n",
                          base_dir=tmp_path)
    run = RunContext(RunInputs(torch.device("cpu"), calibration=torch.randint(5, 300, (2, 32)), calibration_batch_size=2))
    run_passes(handle, recipe.passes, run)
    assert len(run.results.kv_cache) == 2  # both decoder layers
    with torch.no_grad():
        assert not torch.equal(handle.model(probe, use_cache=False).logits, before)


def test_bad_kv_cache_values_exit_2_naming_the_file_and_line(write_recipe, tiny_llama, text_file):
    from compress.cli.main import app

    path = write_recipe(recipe_text(tiny_llama, text_file, "  - rtn: {bits: 8}\n  - kv_cache: {format: fp8, strategy: row}",
                                    text_file))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:6 passes[1].kv_cache.strategy" in result.output and "'tensor' or 'head'" in result.output
    before = write_recipe(recipe_text(tiny_llama, text_file, "  - kv_cache: {}\n  - rtn: {bits: 8}", text_file), "order.yaml")
    result = CliRunner().invoke(app, ["validate", str(before)])
    assert result.exit_code == 2 and "'rtn' must come before 'kv_cache'" in result.output


def test_rtn_with_static_activation_scales_needs_calibration(tiny_llama):
    from compress.recipe.errors import RecipeError
    from compress.recipe.schema import parse_recipe

    text = f"model: {tiny_llama}\npasses:\n  - rtn: {{format: fp8, activations: {{format: fp8, per: tensor, static: true}}}}\n"
    with pytest.raises(RecipeError, match=r"<recipe>:3 passes\[0\].rtn: pass 'rtn' needs calibration data"):
        parse_recipe(text)
    assert not parse_recipe(text.replace(", per: tensor, static: true", "")).needs_calibration  # dynamic: data-free
