"""Calibration activations offloaded to host memory or disk (`calibration.offload`): bit-identical results, at
most two batches in memory with `disk`, scratch files gone however the run ends, and `auto`'s choice."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

import compress.engine.activations
import compress.report
from compress.engine.activations import SCRATCH_PREFIX, OffloadSettings, choose_placement
from compress.engine.checkpoint import Checkpointer, recipe_fingerprint
from compress.engine.context import RunContext, RunInputs
from compress.engine.data import load_text, sample_windows, tokenize_text
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.engine.faults import NonFiniteError
from compress.engine.model_io import ModelHandle, load_model
from compress.compressors.awq import AWQConfig, run_awq
from compress.compressors.gptq import GPTQConfig, run_gptq
from compress.compressors.sparsegpt import SparseGPTConfig, run_sparsegpt

BATCH, SEQ_LEN, BATCHES = 2, 32, 8
PASSES = {
    "gptq": SweepStep("gptq", run_gptq, GPTQConfig(bits=4, group_size=32), True),
    "sparsegpt": SweepStep("sparsegpt", run_sparsegpt, SparseGPTConfig(sparsity=0.5), True),
    "awq": SweepStep("awq", run_awq, AWQConfig(bits=3, group_size=16, grid=10, clip_grid=10, max_tokens=256), True),
}


def calibrated(model: Path, text: Path, mode: str = "device", folder: Path | None = None) -> tuple[ModelHandle, RunContext]:
    handle = load_model(str(model), device="cpu")
    windows = sample_windows(tokenize_text(handle.tokenizer, load_text(text)), BATCH * BATCHES, SEQ_LEN, 0)
    run = RunContext(RunInputs(device=handle.device, calibration=windows, calibration_batch_size=BATCH,
                     offload=OffloadSettings(mode, folder)))  # type: ignore[arg-type]
    return handle, run


def batch_bytes(handle: ModelHandle) -> int:
    return BATCH * SEQ_LEN * handle.model.config.hidden_size * 4  # float32 hidden states


def offload_entry(run: RunContext) -> dict:
    [entry] = run.results.report_sections["calibration"]["offload"]
    return entry


def scratch_left(folder: Path) -> list[Path]:
    return list(folder.glob(f"{SCRATCH_PREFIX}*"))


@pytest.fixture(scope="module")
def device_results(tiny_llama, text_file):
    """Each pass run with the activations on the device (today's behaviour): weights and the offload entry."""
    results = {}
    for name, step in PASSES.items():
        handle, run = calibrated(tiny_llama, text_file)
        run_sweep(handle, [step], run)
        results[name] = (handle.model.state_dict(), offload_entry(run))
    return results


@pytest.mark.parametrize("mode", ["cpu", "disk"])
@pytest.mark.parametrize("name", list(PASSES))
def test_offloaded_activations_give_bit_identical_weights(device_results, tiny_llama, text_file, tmp_path, name, mode):
    handle, run = calibrated(tiny_llama, text_file, mode, tmp_path)
    run_sweep(handle, [PASSES[name]], run)
    expected, _ = device_results[name]
    got = handle.model.state_dict()
    assert got.keys() == expected.keys()
    differing = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert differing == []
    assert offload_entry(run)["placement"] == mode
    assert scratch_left(tmp_path) == []


def test_disk_keeps_at_most_two_batches_in_memory(device_results, tiny_llama, text_file, tmp_path):
    handle, run = calibrated(tiny_llama, text_file, "disk", tmp_path)
    run_sweep(handle, [PASSES["gptq"]], run)
    one = batch_bytes(handle)
    disk = offload_entry(run)
    _, device = device_results["gptq"]
    assert disk["activation_bytes"] == 2 * BATCHES * one  # inputs + outputs of 8 batches
    assert one <= disk["peak_resident_bytes"] <= 2 * one
    # On the device, all 8 input batches and all 8 output batches are held at the end of each propagation.
    assert device["peak_resident_bytes"] == 2 * BATCHES * one


def test_scratch_folder_exists_while_running_and_is_removed_after_a_failure(tiny_llama, text_file, tmp_path):
    handle, run = calibrated(tiny_llama, text_file, "disk", tmp_path)
    seen: list[int] = []

    def fails_on_layer_1(ctx, cfg):
        [scratch] = scratch_left(tmp_path)
        seen.append(len(list(scratch.iterdir())))
        if ctx.index == 1:
            raise RuntimeError("a pass fails half-way")
        return run_gptq(ctx, cfg)

    with pytest.raises(RuntimeError, match="half-way"):
        run_sweep(handle, [SweepStep("gptq", fails_on_layer_1, GPTQConfig(bits=4, group_size=32), True)], run)
    assert seen == [BATCHES, BATCHES]  # one file per batch of the current inputs, none left of earlier layers
    assert scratch_left(tmp_path) == []


def test_ctrl_c_removes_the_scratch_folder(tiny_llama, text_file, tmp_path):
    handle, run = calibrated(tiny_llama, text_file, "disk", tmp_path)

    def interrupted(ctx, cfg):
        assert len(scratch_left(tmp_path)) == 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(handle, [SweepStep("gptq", interrupted, None, True)], run)
    assert scratch_left(tmp_path) == []


def test_scratch_of_a_killed_run_is_removed_by_the_next(tiny_llama, text_file, tmp_path):
    dead = tmp_path / f"{SCRATCH_PREFIX}999999999-abc"  # no such process
    dead.mkdir()
    (dead / "store-00000-00000.bin").write_bytes(b"x" * 16)
    handle, run = calibrated(tiny_llama, text_file, "disk", tmp_path)
    run_sweep(handle, [PASSES["gptq"]], run)
    assert scratch_left(tmp_path) == []


def test_out_of_memory_fallback_on_disk_matches_the_device(tiny_llama, text_file, tmp_path):
    """Splitting batches re-writes them to disk; the result equals the same fallback with activations on the device."""
    def flaky(failed: list[int]):
        def apply(ctx, cfg):
            if ctx.index == 1 and not failed:
                failed.append(1)
                raise torch.OutOfMemoryError("CUDA out of memory")
            return run_gptq(ctx, cfg)
        return apply

    weights = {}
    for mode in ("device", "disk"):
        handle, run = calibrated(tiny_llama, text_file, mode, tmp_path)
        run_sweep(handle, [SweepStep("gptq", flaky([]), GPTQConfig(bits=4, group_size=32), True)], run)
        assert [f["fallback"] for f in run.results.fallbacks] == ["smaller calibration batches"]
        weights[mode] = handle.model.state_dict()
    assert all(torch.equal(weights["disk"][k], weights["device"][k]) for k in weights["device"])
    assert scratch_left(tmp_path) == []


def test_nan_activations_are_caught_on_disk_too(tiny_llama, text_file, tmp_path):
    handle, run = calibrated(tiny_llama, text_file, "disk", tmp_path)
    with torch.no_grad():
        handle.model.model.layers[0].post_attention_layernorm.weight.fill_(3e38)
    observe_only = SweepStep("observe", lambda ctx, cfg: {}, None, needs_calibration=True)
    with pytest.raises(NonFiniteError, match=r"activations of model\.layers\.0\.post_attention_layernorm"):
        run_sweep(handle, [observe_only], run)
    assert scratch_left(tmp_path) == []


def test_resume_from_a_checkpoint_with_disk_offload(device_results, tiny_llama, text_file, tmp_path):
    """Layer 0's checkpoint holds layer 1's inputs, written from and read back into disk stores."""
    checkpoints = tmp_path / "checkpoints"
    handle, run = calibrated(tiny_llama, text_file, "disk", tmp_path)
    run.inputs.checkpoint = Checkpointer(checkpoints, "fingerprint", resume=False)

    def stops_at_layer_1(ctx, cfg):
        if ctx.index == 1:
            raise KeyboardInterrupt
        return run_gptq(ctx, cfg)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(handle, [SweepStep("gptq", stops_at_layer_1, GPTQConfig(bits=4, group_size=32), True)], run)
    assert len(list((checkpoints / "sweep-0" / "layer-0000" / "inputs").iterdir())) == BATCHES

    handle, run = calibrated(tiny_llama, text_file, "disk", tmp_path)
    run.inputs.checkpoint = Checkpointer(checkpoints, "fingerprint", resume=True)
    run_sweep(handle, [PASSES["gptq"]], run)
    expected, _ = device_results["gptq"]
    got = handle.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert scratch_left(tmp_path) == []


def test_auto_picks_disk_when_memory_is_tiny(monkeypatch, tiny_llama, text_file, tmp_path):
    monkeypatch.setattr(compress.engine.activations, "free_memory_bytes", lambda device: 4096)
    monkeypatch.setattr(compress.engine.activations, "host_available_bytes", lambda: 4096)
    handle, run = calibrated(tiny_llama, text_file, "auto", tmp_path)
    run_sweep(handle, [PASSES["gptq"]], run)
    entry = offload_entry(run)
    assert (entry["requested"], entry["placement"]) == ("auto", "disk")
    assert entry["free_host_bytes"] == 4096
    assert "fit in neither cpu" in entry["reason"]


def test_auto_prefers_the_device_then_host_memory(monkeypatch):
    gib = 2**30
    cuda = torch.device("cuda")  # only its type is read: free memory comes from the patched probes
    monkeypatch.setattr(compress.engine.activations, "host_available_bytes", lambda: 64 * gib)
    monkeypatch.setattr(compress.engine.activations, "free_memory_bytes", lambda device: 40 * gib)
    assert choose_placement("auto", 20 * gib, cuda).placement == "device"  # exactly half of what is free
    assert choose_placement("auto", 21 * gib, cuda).placement == "cpu"
    assert choose_placement("auto", 33 * gib, cuda).placement == "disk"
    assert choose_placement("disk", 1, cuda).placement == "disk"  # an explicit choice is never second-guessed
    # On the CPU the device is host memory: past half of it, straight to disk.
    monkeypatch.setattr(compress.engine.activations, "free_memory_bytes", lambda device: 64 * gib)
    assert choose_placement("auto", 33 * gib, torch.device("cpu")).placement == "disk"


def test_run_with_disk_offload_reports_it_and_matches_device(tiny_llama, text_file, tmp_path):
    from compress.recipe.schema import parse_recipe
    from compress.app.runner import run_recipe
    from tests.conftest import recipe_text

    passes = "  - gptq: {bits: 4, group_size: 32}"
    reports = {}
    for mode in ("device", "disk"):
        text = recipe_text(tiny_llama, text_file, passes, text_file, samples=8).replace(
            "seed: 0}", f"seed: 0, batch_size: 2, offload: {mode}}}")
        run_recipe(parse_recipe(text), tmp_path / mode)
        reports[mode] = json.loads((tmp_path / mode / "report.json").read_text())
    assert reports["disk"]["weights_sha256"] == reports["device"]["weights_sha256"]
    schema = json.loads((Path(compress.report.__file__).parent / "report.schema.json").read_text())
    jsonschema.validate(reports["disk"], schema)
    [entry] = reports["disk"]["calibration"]["offload"]
    assert (entry["requested"], entry["placement"]) == ("disk", "disk")
    assert entry["peak_resident_bytes"] <= 2 * 2 * 32 * 64 * 4  # two batches of 2 windows x 32 tokens x 64 floats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device", "disk"]  # no staging or scratch left
    assert not any(p.name.startswith(SCRATCH_PREFIX) for p in (tmp_path / "disk").rglob("*"))


def test_offload_does_not_change_the_resume_fingerprint():
    recipe = {"model": "m", "calibration": {"dataset": "d", "samples": 8, "offload": "auto", "offload_dir": None}}
    moved = {**recipe, "calibration": {**recipe["calibration"], "offload": "disk", "offload_dir": "/scratch"}}
    changed = {**recipe, "calibration": {**recipe["calibration"], "samples": 16}}
    assert recipe_fingerprint(moved) == recipe_fingerprint(recipe)
    assert recipe_fingerprint(changed) != recipe_fingerprint(recipe)
