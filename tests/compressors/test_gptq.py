"""GPTQ: the kernel against a naive per-column reference and closed-form steps, its edge cases, the pass on a
tiny Llama (bit plans, masks, act_order storage, fallbacks), recipes end to end, and demo-model quality gates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compress.engine.context import Handoff, RunContext, RunInputs
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.recipe.errors import RecipeError
from compress.engine.model_io import load_model
from compress.quant.modules import find_linears, weight_matrix
from compress.quant.primitives import (
    PerChannel,
    PerGroup,
    QuantSpec,
    compute_qparams,
    dequantize_codes,
    quantize_codes,
)
from compress.quant.records import quantize_rtn
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_recipe
from compress.compressors.gptq import (
    GPTQConfig,
    HessianAccumulator,
    HessianNotPositiveDefinite,
    gptq_quantize,
    quantize_module,
    run_gptq,
)
from tests.conftest import DEMO_DIR, DEMO_MODEL, requires_demo_model

DAMP = 0.01


def correlated_inputs(tokens=256, columns=32, seed=0):
    """Calibration inputs with strongly correlated feature pairs and uneven scales: where GPTQ beats RTN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, columns, generator=g)
    x[:, 1::2] = 0.8 * x[:, 0::2] + 0.2 * x[:, 1::2]
    return x * torch.linspace(0.2, 3.0, columns)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1], x.device)
    acc.add(x.unsqueeze(0))
    return acc.hessian


def random_weight(rows=16, columns=32, seed=1):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def naive_gptq(weight, hessian, spec, *, damp=DAMP, act_order=False, static_groups=False):
    """Slow reference: one column at a time in float64, full inverse Hessian downdated after each column
    (OBQ, Frantar & Alistarh 2022, eq. 3/4); no Cholesky, no blocks, no lazy updates."""
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else list(range(columns))
    size = spec.group_size or columns
    static = [compute_qparams(W[:, s : s + size], spec) for s in range(0, columns, size)]
    qparams = dict(enumerate(static))
    Q = torch.zeros_like(W)
    for position, j in enumerate(order):
        g = j // size
        if spec.group_size is not None and not static_groups and j % size == 0:
            qparams[g] = compute_qparams(W[:, j : j + size], spec)
        scale, zero = qparams[g]
        Q[:, j] = dequantize_codes(quantize_codes(W[:, j : j + 1], scale, zero, spec), scale, zero).flatten().double()
        rest = order[position + 1 :]
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, rest] -= torch.outer(err, Hinv[j, rest])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q.float()


def output_error(x, weight, dequantized):
    return (x @ weight.T - x @ dequantized.T).norm().item()


# ---------------------------------------------------------------------------------------------------
# The kernel


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_gptq_layer_output_error_not_worse_than_rtn(bits, symmetric, group_size):
    x, weight = correlated_inputs(), random_weight()
    spec = QuantSpec(bits, symmetric, PerChannel() if group_size is None else PerGroup(group_size))
    gptq = gptq_quantize(weight, hessian_of(x), spec, block_size=8).qweight.dequantize()
    rtn = quantize_rtn(weight, spec).dequantize()
    assert output_error(x, weight, gptq) <= 0.9 * output_error(x, weight, rtn)


def test_single_column_equals_rtn():
    """With one column there is nothing to compensate into: GPTQ is exactly round-to-nearest."""
    x = correlated_inputs(columns=2)[:, :1]
    weight = random_weight(columns=1)
    spec = QuantSpec(3, False)
    got = gptq_quantize(weight, hessian_of(x), spec)
    want = quantize_rtn(weight, spec)
    assert torch.equal(got.qweight.codes, want.codes)
    assert torch.equal(got.qweight.dequantize(), want.dequantize())


def test_two_columns_follow_the_closed_form_obq_step():
    x, weight = correlated_inputs(columns=2), random_weight(columns=2)
    H = hessian_of(x).double()
    spec = QuantSpec(4, True)
    scale, zero = compute_qparams(weight, spec)
    Hinv = torch.linalg.inv(H + DAMP * torch.diag(H).mean() * torch.eye(2, dtype=H.dtype))
    q0 = dequantize_codes(quantize_codes(weight[:, :1], scale, zero, spec), scale, zero).flatten()
    w1 = weight[:, 1].double() - (weight[:, 0] - q0).double() * Hinv[0, 1] / Hinv[0, 0]
    q1 = dequantize_codes(quantize_codes(w1.float().unsqueeze(1), scale, zero, spec), scale, zero).flatten()

    got = gptq_quantize(weight, hessian_of(x), spec, dampening_frac=DAMP).qweight.dequantize()
    assert torch.equal(got[:, 0], q0)
    assert torch.equal(got[:, 1], q1)
    assert not torch.equal(q1, quantize_rtn(weight, spec).dequantize()[:, 1])  # the update mattered


@pytest.mark.parametrize(
    "spec, act_order, static_groups",
    [
        (QuantSpec(4, True), False, False),
        (QuantSpec(3, False, PerGroup(12)), False, False),  # groups straddle the 8-column blocks
        (QuantSpec(4, True, PerGroup(12)), False, True),
        (QuantSpec(3, True), True, False),
        (QuantSpec(4, False, PerGroup(12)), True, True),
    ],
)
def test_blocked_kernel_matches_naive_reference(spec, act_order, static_groups):
    x, weight = correlated_inputs(), random_weight()
    H = hessian_of(x)
    want = naive_gptq(weight, H, spec, act_order=act_order, static_groups=static_groups)
    for block_size in (8, 32):
        got = gptq_quantize(weight, H, spec, block_size=block_size, act_order=act_order, static_groups=static_groups)
        torch.testing.assert_close(got.qweight.dequantize(), want, rtol=0, atol=1e-5)


def test_loss_is_independent_of_block_size():
    x, weight = correlated_inputs(), random_weight()
    spec = QuantSpec(3, True, PerGroup(12))
    losses = [gptq_quantize(weight, hessian_of(x), spec, block_size=b).loss for b in (1, 5, 32, 128)]
    assert max(losses) - min(losses) <= 1e-4 * losses[0]


def test_inputs_are_not_modified():
    x, weight = correlated_inputs(), random_weight()
    x[:, 3] = 0
    H = hessian_of(x)
    weight_before, H_before = weight.clone(), H.clone()
    gptq_quantize(weight, H, QuantSpec(4, True, PerGroup(8)), act_order=True, static_groups=True)
    assert torch.equal(weight, weight_before) and torch.equal(H, H_before)


def test_dead_column_is_zeroed_without_nan():
    x, weight = correlated_inputs(), random_weight()
    x[:, 5] = 0
    result = gptq_quantize(weight, hessian_of(x), QuantSpec(4, False, PerGroup(8)), block_size=8)
    dequantized = result.qweight.dequantize()
    assert result.dead_columns == 1
    assert torch.isfinite(dequantized).all() and math.isfinite(result.loss)
    assert torch.equal(dequantized[:, 5], torch.zeros(16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_size_not_dividing_width_gives_short_last_group(symmetric):
    x, weight = correlated_inputs(), random_weight()
    spec = QuantSpec(3, symmetric, PerGroup(12))  # 32 columns: groups of 12, 12 and 8
    qweight = gptq_quantize(weight, hessian_of(x), spec, block_size=8).qweight
    assert qweight.scale.shape == qweight.zero.shape == (16, 3)
    assert spec.qmin <= int(qweight.codes.min()) and int(qweight.codes.max()) <= spec.qmax
    assert qweight.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    rtn = quantize_rtn(weight, spec).dequantize()
    assert output_error(x, weight, qweight.dequantize()) < output_error(x, weight, rtn)


def test_bits_8_is_nearly_lossless():
    x, weight = correlated_inputs(), random_weight()
    dequantized = gptq_quantize(weight, hessian_of(x), QuantSpec(8, True, PerGroup(8))).qweight.dequantize()
    assert output_error(x, weight, dequantized) < 0.01 * (x @ weight.T).norm().item()


def test_mask_keeps_pruned_weights_at_exact_zero():
    x, weight = correlated_inputs(), random_weight()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    for spec in (QuantSpec(4, False, PerGroup(12)), QuantSpec(3, True)):
        dequantized = gptq_quantize(weight * mask, hessian_of(x), spec, block_size=8, mask=mask).qweight.dequantize()
        assert torch.equal(dequantized[~mask], torch.zeros(int((~mask).sum())))


def test_act_order_with_dynamic_groups_is_rejected():
    x, weight = correlated_inputs(), random_weight()
    with pytest.raises(ValueError, match="act_order with group quantization needs static_groups=true"):
        gptq_quantize(weight, hessian_of(x), QuantSpec(4, True, PerGroup(8)), act_order=True)


def test_unfactorizable_hessian_raises_after_retries():
    with pytest.raises(HessianNotPositiveDefinite, match="not positive definite"):
        gptq_quantize(random_weight(), -torch.eye(32), QuantSpec(4))


def test_hessian_accumulator_is_a_running_mean_over_samples():
    x = correlated_inputs(tokens=60).reshape(6, 10, 32)
    acc = HessianAccumulator(32, torch.device("cpu"))
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 32).double()
    torch.testing.assert_close(acc.hessian.double(), 2 / 6 * flat.T @ flat, rtol=1e-5, atol=1e-5)
    assert acc.samples == 6


def test_hessian_does_not_depend_on_batch_order_or_grouping():
    """What data-parallel calibration relies on: any order/split of the same batches gives the same bits."""
    batches = list(correlated_inputs(tokens=400).reshape(20, 20, 32).split(2))
    forward, backward = HessianAccumulator(32, torch.device("cpu")), HessianAccumulator(32, torch.device("cpu"))
    for b in batches:
        forward.add(b)
    for b in reversed(batches):
        backward.add(b)
    assert torch.equal(forward.hessian, backward.hessian)
    # the float32 sum is the memory-saving option: same Hessian to float32 rounding, not to the bit
    single = HessianAccumulator(32, torch.device("cpu"), torch.float32)
    for b in batches:
        single.add(b)
    torch.testing.assert_close(single.hessian, forward.hessian, rtol=1e-5, atol=1e-6)


def test_hessian_does_not_depend_on_how_windows_are_batched():
    """The out-of-memory retry halves the batches: the same windows in batches of 8 or of 1 give the same bits."""
    windows = correlated_inputs(tokens=8 * 64).reshape(8, 64, 32) * 3.7
    whole, singles = HessianAccumulator(32, torch.device("cpu")), HessianAccumulator(32, torch.device("cpu"))
    whole.add(windows)
    for window in windows.split(1):
        singles.add(window)
    assert whole.samples == singles.samples == 8
    assert torch.equal(whole.hessian, singles.hessian)


# ---------------------------------------------------------------------------------------------------
# Config and the pass on a tiny Llama


def test_config_rejects_act_order_with_dynamic_groups():
    with pytest.raises(ValueError, match="act_order with group_size needs static_groups: true"):
        GPTQConfig(act_order=True, group_size=128, static_groups=False)
    assert GPTQConfig(act_order=True).use_static_groups
    assert not GPTQConfig().use_static_groups
    assert not GPTQConfig(act_order=True, group_size=None, static_groups=False).use_static_groups


def test_recipe_errors_point_at_gptq_fields():
    text = "passes:\n  - gptq: {bits: 4, damp: 1.5, block_size: 0, act_order: true, static_groups: false}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, filename="r.yaml")
    message = str(info.value)
    assert "passes[0].gptq.damp" in message and "passes[0].gptq.block_size" in message


def calibration(samples=8, seq_len=32, seed=0):
    return torch.randint(2, 300, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def gptq_sweep(model_path, cfg, **handoff):
    handle = load_model(str(model_path))
    run = RunContext(RunInputs(device=handle.device, calibration=calibration(), calibration_batch_size=4), Handoff(**handoff))
    sweep = run_sweep(handle, [SweepStep("gptq", run_gptq, cfg, True)], run)
    return handle, run, sweep.modules["gptq"]


def test_pass_stores_weights_that_dequantize_to_the_module_weights(tiny_llama):
    """act_order + static groups: the exported codes must reproduce exactly what the model computes with."""
    cfg = GPTQConfig(bits=3, group_size=16, act_order=True)
    handle, run, modules = gptq_sweep(tiny_llama, cfg)
    linears = find_linears(handle.layers, handle.layers_prefix)
    assert set(modules) == set(linears) == set(run.results.records)
    for fqn, module in linears.items():
        assert torch.equal(run.results.records[fqn].dequantize(), weight_matrix(module))
        assert modules[fqn]["hessian_samples"] == 8 and modules[fqn]["gptq_loss"] > 0
    assert run.results.fallbacks == []


def test_pass_honours_bit_plan_and_mask(tiny_llama):
    q_proj, down_proj = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    original = load_model(str(tiny_llama))
    weight = weight_matrix(find_linears(original.layers, original.layers_prefix)[down_proj])
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    plan = {q_proj: QuantSpec(8, False, PerGroup(32))}
    handle, run, modules = gptq_sweep(tiny_llama, GPTQConfig(bits=3, group_size=16), bit_plan=plan,
                                      masks={down_proj: mask})
    assert run.results.records[q_proj].spec == plan[q_proj] and modules[q_proj]["bits"] == 8
    assert modules["model.layers.0.self_attn.k_proj"]["bits"] == 3
    assert modules[q_proj]["weight_rel_error"] < 0.02 < modules["model.layers.0.self_attn.k_proj"]["weight_rel_error"]
    pruned = weight_matrix(find_linears(handle.layers, handle.layers_prefix)[down_proj])
    assert torch.equal(pruned[~mask], torch.zeros(int((~mask).sum())))
    assert (pruned[mask] != 0).float().mean() > 0.5


def test_cholesky_failure_falls_back_to_rtn_and_is_recorded(tiny_llama):
    handle = load_model(str(tiny_llama))
    fqn, module = next(iter(find_linears(handle.layers, handle.layers_prefix).items()))
    expected = quantize_rtn(weight_matrix(module), QuantSpec(4, True, PerGroup(16))).dequantize()
    broken = HessianAccumulator(64, torch.device("cpu"))
    broken.hessian.sub_(torch.eye(64))
    run = RunContext(RunInputs(device=handle.device))
    result = quantize_module(fqn, module, broken, GPTQConfig(bits=4, group_size=16), run)
    assert result["fallback"] == "rtn"
    assert run.results.fallbacks == [{"pass": "gptq", "module": fqn, "fallback": "rtn", "reason": run.results.fallbacks[0]["reason"]}]
    assert "not positive definite" in run.results.fallbacks[0]["reason"]
    assert torch.equal(weight_matrix(module), expected)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_recipe_end_to_end(tiny_llama, text_file, tmp_path, true_sequential):
    text = f"""
model: {tiny_llama}
calibration: {{dataset: {text_file}, samples: 8, seq_len: 32, seed: 0, batch_size: 4}}
passes:
  - gptq: {{bits: 4, group_size: 32, true_sequential: {str(true_sequential).lower()}, activations: {{bits: 8}}}}
evaluate:
  perplexity: [{{dataset: {text_file}, seq_len: 64, max_windows: 8}}]
"""
    report = run_recipe(parse_recipe(text), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["status"] == "ok"
    modules = report["passes"][0]["modules"]
    assert len(modules) == 14 and all(m["hessian_samples"] == 8 for m in modules.values())
    assert report["passes"][0]["summary"]["mean_gptq_loss"] > 0
    parts = report["passes"][0]["seconds_by_part"]  # the Hessians' forwards, and the solves, inside the pass's time
    assert set(parts) == {"statistics", "solve"} and min(parts.values()) > 0
    assert sum(parts.values()) <= report["passes"][0]["seconds"]
    assert len(report["activation_quantization"]) == 14 and report["fallbacks"] == []
    ppl = report["metrics"]["perplexity"][text_file.stem]
    assert math.isfinite(ppl["compressed"]) and ppl["compressed"] < 1.5 * ppl["baseline"]


# ---------------------------------------------------------------------------------------------------
# The demo model: quality gates with a fixed calibration seed


# 32 windows of 512 tokens (16k tokens for 256-wide Hessians) give the same ranking as 128 at a quarter of the
# time. Perplexity is on the whole eval text: on a 32-window prefix act_order's small difference flips sign.
DEMO_CALIBRATION_SAMPLES = 32


@pytest.fixture(scope="module")
def demo():
    """Calibration windows, eval tokens and a perplexity function shared by the demo-model tests."""
    from compress.engine.data import sample_windows, tokenize_text
    from compress.evaluators.perplexity import perplexity_of

    handle = load_model(str(DEMO_MODEL))
    calib = sample_windows(tokenize_text(handle.tokenizer, (DEMO_DIR / "calib.txt").read_text()),
                           DEMO_CALIBRATION_SAMPLES, 512, 0)
    eval_ids = tokenize_text(handle.tokenizer, (DEMO_DIR / "eval.txt").read_text())

    def ppl(h):
        return perplexity_of(h.model, eval_ids, 512, 8, h.device)[0]

    return {"calib": calib, "ppl": ppl, "baseline": ppl(handle), "cache": {}}


def demo_ppl(demo, name, pass_fn, cfg, calibrated=True):
    """Perplexity on the whole eval text after one pass; each configuration runs once per module."""
    if name not in demo["cache"]:
        handle = load_model(str(DEMO_MODEL))
        run = RunContext(RunInputs(device=handle.device, calibration=demo["calib"], calibration_batch_size=8))
        run_sweep(handle, [SweepStep(name, pass_fn, cfg, calibrated)], run)
        demo["cache"][name] = demo["ppl"](handle)
        print(f"demo {name}: ppl {demo['cache'][name]:.4f} (baseline {demo['baseline']:.4f})")
    return demo["cache"][name]


@pytest.mark.slow
@requires_demo_model()
def test_demo_gptq_w3_beats_rtn_w3(demo):
    from compress.compressors.rtn import RTNConfig, run_rtn

    rtn = demo_ppl(demo, "rtn_w3", run_rtn, RTNConfig(bits=3, group_size=128), calibrated=False)
    gptq = demo_ppl(demo, "gptq_w3", run_gptq, GPTQConfig(bits=3, group_size=128))
    assert gptq < rtn


@pytest.mark.slow
@requires_demo_model()
def test_demo_gptq_w4_within_3_percent_of_baseline(demo):
    assert demo_ppl(demo, "gptq_w4", run_gptq, GPTQConfig(bits=4, group_size=128)) < 1.03 * demo["baseline"]


@pytest.mark.slow
@requires_demo_model()
def test_demo_act_order_not_worse(demo):
    plain = demo_ppl(demo, "gptq_w3", run_gptq, GPTQConfig(bits=3, group_size=128))
    ordered = demo_ppl(demo, "gptq_w3_act_order", run_gptq, GPTQConfig(bits=3, group_size=128, act_order=True))
    # On this 4-layer model act order is a wash, and which way it falls moves with the thread count (the Hessians'
    # float32 sums round differently): +0.52% with one torch thread (16.622 vs 16.536, the suite under xdist), within
    # 0.5% with two. The check is that it is not clearly worse.
    assert ordered < 1.01 * plain
