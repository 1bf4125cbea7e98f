"""MoE: fused experts become per-expert linears with identical outputs; every expert is quantized; tokens per
expert are reported and rare experts flagged; route_all_experts calibrates all of them without changing outputs."""

from __future__ import annotations

import json

import pytest
import torch

from compress.engine.moe import LinearExperts, calibrating, unfuse_experts
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_recipe
from tests.tiny_models import save_tokenizer

FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3")


def moe_config(family: str):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                                 num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, **common)
    common["num_key_value_heads"] = 4  # multi-head latent attention: one kv head per query head
    return tf.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=1,
                               q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                               v_head_dim=8, **common)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe")
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(moe_config(family))
        folder = root / family
        model.save_pretrained(folder)
        save_tokenizer(folder)
        paths[family] = folder
    return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_compute_the_same(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(family)).eval()
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        assert unfuse_experts(model) == 2
        got = model(ids).logits
        experts = [m for m in model.modules() if isinstance(m, LinearExperts)]
        assert len(experts) == 2 and all(len(m) == 8 for m in experts)
        with calibrating(model, route_all=True, batches=1) as stats:
            routed_all = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_all, got, rtol=1e-5, atol=1e-5)  # routing all tokens changes no output
    counts = [c.routed for c in stats.counters.values()]
    assert all(int(c.sum()) == ids.numel() * 2 for c in counts)  # top-2 routing: two experts per token


def _run(model_dir, text_file, tmp_path, route_all: bool, samples: int = 2, seq_len: int = 16,
         true_sequential: bool = True):
    recipe = parse_recipe(f"""
model: {model_dir}
calibration: {{dataset: {text_file}, samples: {samples}, seq_len: {seq_len}, route_all_experts: {str(route_all).lower()},
              min_expert_tokens: 8}}
passes:
  - gptq: {{bits: 4, group_size: 8, true_sequential: {str(true_sequential).lower()}}}
""")
    return run_recipe(recipe, tmp_path / f"out-{route_all}")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # qwen2_moe's experts: the forward test above
def test_every_expert_is_quantized_and_counted(moe_models, text_file, tmp_path, family):
    # one family through true_sequential (a stage per expert group), the others with one Hessian forward per layer
    report = _run(moe_models[family], text_file, tmp_path, route_all=False, true_sequential=family == "mixtral")
    modules = report["passes"][0]["modules"]
    expert_linears = [n for n in modules if ".experts." in n]
    assert len(expert_linears) == 2 * 8 * 3  # layers x experts x (gate, up, down): none skipped
    section = report["experts"]
    assert len(section["layers"]) == 2
    for name, layer in section["layers"].items():
        assert sum(layer["routed_tokens"]) == 2 * 16 * 2  # every calibration token, top-2
        assert layer["calibration_tokens"] == layer["routed_tokens"]
        flagged = {f["module"] for f in report["fallbacks"] if f["fallback"] == "few_tokens"}
        assert {f"{name}.{e}" for e in layer["under_threshold"]} <= flagged
        assert layer["under_threshold"] == [e for e, n in enumerate(layer["routed_tokens"]) if n < 8]
    # 32 tokens x 2 over 8 experts: some expert gets under 8 tokens in this tiny setup, and it is flagged
    assert any(layer["under_threshold"] for layer in section["layers"].values())
    # experts no token reached still get quantized (RTN, recorded), never silently left in full precision
    for fqn in expert_linears:
        if modules[fqn]["hessian_samples"] == 0:
            assert modules[fqn]["fallback"] == "rtn"
    assert json.loads((tmp_path / "out-False" / "report.json").read_text())["experts"] == section


def test_route_all_experts_calibrates_all(moe_models, text_file, tmp_path):
    report = _run(moe_models["mixtral"], text_file, tmp_path, route_all=True, true_sequential=False)
    modules = report["passes"][0]["modules"]
    assert all(r["hessian_samples"] > 0 and "fallback" not in r for n, r in modules.items() if ".experts." in n)
    for layer in report["experts"]["layers"].values():
        assert layer["calibration_tokens"] == [32] * 8 and layer["under_threshold"] == []
    assert not [f for f in report["fallbacks"] if f["fallback"] == "few_tokens"]
