"""The sequential engine on every supported family: captured inputs match a full forward pass, and
sequential RTN equals quantizing the whole model at once."""

import math

import pytest
import torch

from compress.engine.activations import layer_inputs
from compress.engine.context import RunContext, RunInputs
from compress.engine.layer_sweep import LayerContext, SweepStep, capture_layer_inputs, input_groups, run_sweep
from compress.engine.model_io import load_model
from compress.quant.modules import find_linears, set_weight_matrix, weight_matrix
from compress.quant.primitives import PerGroup, QuantSpec
from compress.quant.records import quantize_rtn
from compress.compressors.rtn import RTNConfig, run_rtn
from compress.evaluators.perplexity import perplexity_of
from tests.tiny_models import FAMILIES, save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_model(root / family, family) for family in FAMILIES}


def _calibration(seed=0, samples=4, seq_len=24):
    return torch.randint(2, 300, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_inputs_match_full_forward(models, family):
    """Propagating layer by layer reproduces the hidden states of a normal forward pass."""
    handle = load_model(str(models[family]))
    run = RunContext(RunInputs(device=handle.device, calibration=_calibration(), calibration_batch_size=2))
    inputs = capture_layer_inputs(handle, run)
    with torch.no_grad():
        full = handle.model(torch.cat([b for b in run.inputs.calibration.split(2)]), output_hidden_states=True).hidden_states
    for index, layer in enumerate(handle.layers):
        got = torch.cat([item.hidden for item in inputs])
        torch.testing.assert_close(got, full[index], rtol=1e-4, atol=1e-5)
        ctx = LayerContext(index, f"{handle.layers_prefix}.{index}", layer, inputs, run)
        inputs = layer_inputs(ctx.forward(), [item.kwargs for item in inputs])


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_rtn_equals_whole_model_rtn(models, family, text_file):
    """RTN does not depend on inputs, so the layer-by-layer engine must give exactly the one-shot result."""
    from compress.engine.data import tokenize_text

    spec = QuantSpec(3, True, PerGroup(32))
    sequential = load_model(str(models[family]))
    run = RunContext(RunInputs(device=sequential.device))
    run_sweep(sequential, [SweepStep("rtn", run_rtn, RTNConfig(bits=3, group_size=32), False)], run)

    whole = load_model(str(models[family]))
    for name, module in find_linears(whole.layers, whole.layers_prefix).items():
        set_weight_matrix(module, quantize_rtn(weight_matrix(module), spec).dequantize())

    ids = tokenize_text(whole.tokenizer, text_file.read_text())
    ppl_sequential, _ = perplexity_of(sequential.model, ids, 64, 8, torch.device("cpu"))
    ppl_whole, _ = perplexity_of(whole.model, ids, 64, 8, torch.device("cpu"))
    assert math.isfinite(ppl_sequential)
    assert ppl_sequential == pytest.approx(ppl_whole, rel=1e-6)
    assert len(run.results.records) == len(find_linears(whole.layers, whole.layers_prefix))
    assert not any("lm_head" in name for name in run.results.records)


def test_input_groups_follow_execution_order(models):
    handle = load_model(str(models["llama"]))
    run = RunContext(RunInputs(device=handle.device, calibration=_calibration(), calibration_batch_size=2))
    ctx = LayerContext(0, "model.layers.0", handle.layers[0].to("cpu"), capture_layer_inputs(handle, run), run)
    groups = [[name.rsplit(".", 1)[1] for name in group] for group in input_groups(ctx, ctx.linears())]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_observe_sees_every_calibration_token(models):
    handle = load_model(str(models["llama"]))
    run = RunContext(RunInputs(device=handle.device, calibration=_calibration(samples=5), calibration_batch_size=2))
    ctx = LayerContext(0, "model.layers.0", handle.layers[0], capture_layer_inputs(handle, run), run)
    seen = {}
    ctx.observe(ctx.linears(), lambda name, x: seen.__setitem__(name, seen.get(name, 0) + x.shape[0] * x.shape[1]))
    assert set(seen.values()) == {5 * 24}
    assert len(seen) == 7
