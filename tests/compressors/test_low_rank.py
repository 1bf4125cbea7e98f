"""Low-rank compensation (lorc): the kernel is the best rank-r fit in the activations' norm, the record stores and
counts its factors, a run that resumes gives the same numbers, the export reloads with transformers + peft to the
in-memory perplexity, and recipes that could not give what they evaluate are refused at their line."""

from __future__ import annotations

import json

import pytest
import torch

from compress.compressors.low_rank import low_rank_correction, weighted_error
from compress.engine.checkpoint import FAULT_ENV
from compress.quant.low_rank import LowRankCorrected
from compress.quant.primitives import PerGroup, QuantSpec
from compress.quant.records import quantize_rtn, restore_record, saved_form
from compress.recipe.errors import RecipeError
from compress.recipe.schema import load_recipe, parse_recipe
from tests.conftest import DEMO_DIR, DEMO_MODEL, recipe_text, requires_demo_model


def correlated_inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose few directions carry most of the energy, as activations do."""
    g = torch.Generator().manual_seed(seed)
    energy = torch.logspace(0, -3, columns)
    return (torch.randn(tokens, columns, generator=g) * energy) @ torch.linalg.qr(torch.randn(columns, columns, generator=g))[0]


def test_the_fit_is_the_best_rank_r_in_the_output_norm_and_beats_the_plain_svd():
    g = torch.Generator().manual_seed(1)
    error = torch.randn(48, 64, generator=g)
    x = correlated_inputs(512, 64)
    hessian = x.T @ x
    damp = 1e-6
    b, a = low_rank_correction(error, hessian, 8, damp)
    assert b.shape == (48, 8) and a.shape == (8, 64)
    # Eckart-Young in the whitened space: the residual is the discarded singular values of E H^(1/2)
    eigenvalues, vectors = torch.linalg.eigh(hessian.double())
    eigenvalues = eigenvalues.clamp_min(0) + damp * eigenvalues.clamp_min(0).mean()
    singular = torch.linalg.svdvals(error.double() @ vectors * eigenvalues.sqrt())
    residual = weighted_error(error - b @ a, vectors @ torch.diag(eigenvalues) @ vectors.T)
    assert residual == pytest.approx(float((singular[8:] ** 2).sum()), rel=1e-4)
    # the weight-space SVD of the same rank leaves much more output error
    u, s, vh = torch.linalg.svd(error)
    plain = weighted_error(error - (u[:, :8] * s[:8]) @ vh[:8], hessian)
    assert weighted_error(error - b @ a, hessian) < 0.8 * plain
    full_b, full_a = low_rank_correction(error, hessian, 48, damp)
    assert weighted_error(error - full_b @ full_a, hessian) < 1e-6 * weighted_error(error, hessian)


def test_the_record_counts_and_round_trips_its_float16_factors():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 96, generator=g)
    base = quantize_rtn(weight, QuantSpec(3, False, PerGroup(32)))
    record = LowRankCorrected(base, torch.randn(4, 96, generator=g), torch.randn(32, 4, generator=g))
    assert record.lora_a.dtype == torch.float16 and record.rank == 4
    assert record.storage_bits().low_rank == 4 * (32 + 96) * 16
    assert record.storage_bits().total == base.storage_bits().total + 4 * (32 + 96) * 16
    assert torch.equal(record.dequantize(), base.dequantize() + record.lora_b.float() @ record.lora_a.float())
    assert "a low-rank correction (LoRA factors)" in record.stores and "integer codes" in record.stores
    tensors, entry = saved_form(record)
    restored = restore_record(json.loads(json.dumps(entry)), lambda part: tensors[part])
    assert isinstance(restored, LowRankCorrected) and torch.equal(restored.dequantize(), record.dequantize())
    assert restored.describe() == {**base.describe(), "low_rank": 4}
    with pytest.raises(ValueError, match="do not make"):
        LowRankCorrected(base, torch.zeros(4, 95), torch.zeros(32, 4))


LORC = """  - gptq: {bits: 2, group_size: 16}
  - lorc: {rank: 4}"""


@pytest.fixture(scope="module")
def lorc_recipe(tmp_path_factory, tiny_llama, text_file):
    path = tmp_path_factory.mktemp("lorc") / "recipe.yaml"
    path.write_text(recipe_text(tiny_llama, text_file, LORC, text_file) + "export: {format: compressed-tensors}\n")
    return path


def test_a_run_corrects_every_quantized_linear_and_a_resume_gives_the_same(lorc_recipe, monkeypatch):
    from compress.app.runner import run_recipe

    loaded = load_recipe(lorc_recipe)
    straight = run_recipe(loaded, lorc_recipe.parent / "straight")
    modules = straight["passes"][1]["modules"]
    assert len(modules) == 14 and all(entry["low_rank"] == 4 for entry in modules.values())
    assert all(0 < entry["output_error_kept"] < 1 for entry in modules.values())
    print(straight["size"])
    with monkeypatch.context() as patch:
        patch.setenv(FAULT_ENV, "0:INT")  # Ctrl-C right after decoder layer 0 is checkpointed
        with pytest.raises(KeyboardInterrupt):
            run_recipe(loaded, lorc_recipe.parent / "resumed")
    resumed = run_recipe(loaded, lorc_recipe.parent / "resumed", resume=True)
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["size"] == straight["size"]
    adapter = lorc_recipe.parent / "straight" / "export-compressed-tensors" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4 and len(config["target_modules"]) == 14


def test_a_recipe_that_could_not_export_what_it_evaluates_is_refused_at_its_line(tiny_llama, text_file):
    def problems(passes: str, extra: str = "") -> str:
        with pytest.raises(RecipeError) as caught:
            parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file) + extra)
        return str(caught.value)

    assert "put it directly after one" in problems("  - lorc: {rank: 4}")
    assert "'rtn' must come before 'lorc'" in problems("  - lorc: {rank: 4}\n  - rtn: {bits: 4}")
    assert "undo the sparsity" in problems("  - magnitude: {sparsity: 0.5}\n  - rtn: {bits: 4}\n  - lorc: {rank: 4}")
    assert "exactly one of rank" in problems("  - rtn: {bits: 4}\n  - lorc: {rank: 4, bits_per_weight: 0.1}")
    assert "lazy" in problems("  - rtn: {bits: 4}\n  - lorc: {rank: 4}", "lazy: true\n")


@pytest.mark.slow
@requires_demo_model()
def test_on_the_demo_model_the_correction_lowers_perplexity_and_reloads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from compress.compressors.gptq import GPTQConfig, run_gptq
    from compress.compressors.low_rank import LowRankConfig, run_lorc
    from compress.engine.context import RunContext, RunInputs
    from compress.engine.data import load_text, sample_windows, tokenize_text
    from compress.engine.layer_sweep import SweepStep, run_sweep
    from compress.engine.model_io import load_model
    from compress.evaluators.perplexity import perplexity_of
    from compress.export import CompressedModel, export_checkpoint
    from compress.recipe.errors import UserError

    def perplexity(model) -> float:
        return perplexity_of(model, eval_ids, 512, 8, torch.device("cpu"), max_windows=8)[0]

    def compressed(lorc: bool):
        handle = load_model(str(DEMO_MODEL))
        run = RunContext(RunInputs(device=torch.device("cpu"), calibration=calib, calibration_batch_size=8))
        steps = [SweepStep("gptq", run_gptq, GPTQConfig(bits=2, group_size=128), True)]
        steps += [SweepStep("lorc", run_lorc, LowRankConfig(bits_per_weight=0.25), True)] if lorc else []
        run_sweep(handle, steps, run)
        return handle, run

    tokenizer = load_model(str(DEMO_MODEL)).tokenizer
    calib = sample_windows(tokenize_text(tokenizer, load_text(str(DEMO_DIR / "calib.txt"))), 32, 512, 0)
    plain_handle, _ = compressed(False)
    handle, run = compressed(True)
    eval_ids = tokenize_text(handle.tokenizer, load_text(str(DEMO_DIR / "eval.txt")))
    plain, corrected = perplexity(plain_handle.model), perplexity(handle.model)
    print(f"\nGPTQ W2 g128 {plain:.4f}, + lorc 0.25 bits/weight {corrected:.4f}")
    assert corrected < plain * 0.98
    export = tmp_path / "ct"
    model = CompressedModel(handle.model, handle.tokenizer, handle.checkpoint_dtype, run.results.records, run.handoff.masks)
    summary = export_checkpoint(model, "compressed-tensors", export)
    assert summary["adapter"]["modules"] == 28
    base = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    base_only = perplexity(base)
    reloaded = perplexity(PeftModel.from_pretrained(base, export / "adapter"))  # no code of ours
    print(f"reloaded: base {base_only:.4f}, base + adapter {reloaded:.4f}")
    assert abs(reloaded / corrected - 1) < 1e-3
    assert base_only > corrected * 1.002  # the adapter is what makes the difference
    assert "PeftModel.from_pretrained" in (export / "README.md").read_text()
    with pytest.raises(UserError, match="low-rank correction"):
        export_checkpoint(model, "gguf", tmp_path / "gguf")
    dense = tmp_path / "dense"
    export_checkpoint(model, "dense", dense)
    assert abs(perplexity(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)) / corrected - 1) < 1e-3
    assert not (dense / "adapter").exists()
