"""Faults during a sweep: accelerator out-of-memory falls back to smaller batches; NaN/Inf is caught where it starts."""

from __future__ import annotations

import pytest
import torch

from compress.engine.context import RunContext, RunInputs
from compress.engine.data import load_text, sample_windows, tokenize_text
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.recipe.errors import UserError
from compress.engine.faults import NonFiniteError
from compress.engine.model_io import load_model
from compress.compressors.gptq import GPTQConfig, run_gptq


@pytest.fixture
def setup(tiny_llama, text_file):
    handle = load_model(str(tiny_llama), device="cpu")
    windows = sample_windows(tokenize_text(handle.tokenizer, load_text(text_file)), 8, 32, 0)
    return handle, RunContext(RunInputs(device=handle.device, calibration=windows, calibration_batch_size=4))


def gptq_step(apply=run_gptq) -> SweepStep:
    return SweepStep("passes[0].gptq", apply, GPTQConfig(bits=4, group_size=32), needs_calibration=True)


def test_out_of_memory_retries_the_layer_with_half_batches(setup, tiny_llama, text_file):
    handle, run = setup
    seen_batches: list[int] = []
    failed: list[int] = []

    def flaky_gptq(ctx, cfg):
        seen_batches.append(len(ctx.inputs))
        if ctx.index == 1 and not failed:
            failed.append(1)
            run_gptq(ctx, cfg)  # fails after quantizing: the retry must start from the original weights
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run_gptq(ctx, cfg)

    result = run_sweep(handle, [gptq_step(flaky_gptq)], run)
    assert seen_batches == [2, 2, 4]  # layer 0: 2 batches of 4 windows; layer 1: failed, then 4 batches of 2
    assert [f["fallback"] for f in run.results.fallbacks] == ["smaller calibration batches"]
    assert "model.layers.1" in run.results.fallbacks[0]["module"] and "batches of 2" in run.results.fallbacks[0]["reason"]

    reference_handle = load_model(str(tiny_llama), device="cpu")
    reference_run = RunContext(RunInputs(device=reference_handle.device, calibration=run.inputs.calibration, calibration_batch_size=4))
    reference = run_sweep(reference_handle, [gptq_step()], reference_run)
    errors = {fqn: r["weight_rel_error"] for fqn, r in result.modules["passes[0].gptq"].items()}
    expected = {fqn: r["weight_rel_error"] for fqn, r in reference.modules["passes[0].gptq"].items()}
    assert errors.keys() == expected.keys()
    # Hessians are summed one window at a time, so halved batches give the very same statistics and codes
    assert errors == expected
    for (name, retried), (_, unfailed) in zip(handle.model.state_dict().items(), reference_handle.model.state_dict().items()):
        assert torch.equal(retried, unfailed), name


def test_out_of_memory_with_single_windows_gives_up_with_advice(setup):
    handle, run = setup

    def always_oom(ctx, cfg):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(UserError, match=r"out of memory .* at model\.layers\.0 even with calibration batches of 1"):
        run_sweep(handle, [gptq_step(always_oom)], run)
    assert len(run.results.fallbacks) == 2  # 4 -> 2 -> 1, each said out loud


def test_nan_weight_is_reported_with_its_module(setup):
    handle, run = setup
    with torch.no_grad():
        handle.model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 NaN/Inf values in model\.layers\.1\.mlp\.down_proj\.weight before"):
        run_sweep(handle, [gptq_step()], run)


def test_overflowing_activations_are_traced_to_the_first_module(setup):
    handle, run = setup
    with torch.no_grad():  # finite weights whose activations overflow float32 inside layer 0
        handle.model.model.layers[0].post_attention_layernorm.weight.fill_(3e38)
    observe_only = SweepStep("passes[0].observe", lambda ctx, cfg: {}, None, needs_calibration=True)
    with pytest.raises(NonFiniteError, match=r"activations of model\.layers\.0\.post_attention_layernorm \(decoder layer 0"):
        run_sweep(handle, [observe_only], run)


def test_unwritable_output_fails_before_the_model_loads(tmp_path, monkeypatch, tiny_llama, text_file):
    import compress.app.runner
    from compress.recipe.schema import parse_recipe
    from tests.conftest import recipe_text

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(compress.app.runner, "load_model", must_not_load)
    recipe = parse_recipe(recipe_text(tiny_llama, text_file, "  - rtn: {bits: 4}", text_file))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="cannot write --output .*a-file"):
        compress.app.runner.run_recipe(recipe, tmp_path / "a-file" / "run")
    monkeypatch.setattr(compress.app.runner, "_disk_needed", lambda model, checkpoints: 2**62)
    with pytest.raises(UserError, match="not enough disk space .* MiB free"):
        compress.app.runner.run_recipe(recipe, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing left behind
