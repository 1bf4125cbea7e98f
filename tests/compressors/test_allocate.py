"""The allocate and quantize_plan passes on a tiny Llama: exact budgets, plans the quantizer honours, reuse."""

import json

import pytest
import torch
import yaml

from compress.engine.context import RunContext, RunInputs
from compress.recipe.errors import RecipeError, UserError
from compress.engine.model_io import load_model
from compress.recipe.schema import parse_recipe
from compress.report.summary import model_size
from compress.app.runner import calibration_windows, run_passes, run_recipe
from tests.conftest import recipe_text

GROUP = 32  # the tiny model's widths (64, 160) give whole and partial groups


def run_chain(model, text_file, passes: str, samples: int = 4):
    """Apply the passes to a fresh tiny model without evaluating; returns (handle, run, report entries)."""
    recipe = parse_recipe(recipe_text(model, text_file, passes, text_file, samples=samples))
    handle = load_model(recipe.model, dtype="float32", device="cpu")
    run = RunContext(RunInputs(device=handle.device, calibration=calibration_windows(handle, recipe)))
    entries, _ = run_passes(handle, recipe.passes, run)
    return handle, run, entries


def allocated_bits(handle, run):
    """Storage bits of every quantized matrix, counted independently of the allocator."""
    return sum(q.storage_bits().total for q in run.results.records.values())


@pytest.mark.parametrize("sensitivity", ["hessian_trace", "fisher", "delta_loss", "io_similarity"])
def test_plan_fits_the_budget_and_the_quantizer_stores_exactly_that(tiny_llama, text_file, sensitivity):
    passes = (f"  - allocate: {{sensitivity: {sensitivity}, candidates: [2, 3, 4, 8], budget: {{avg_bits: 3.3}},"
              f" max_probes: 3, samples: 2, constraints: {{min_bits: {{'*down_proj': 4}}}}}}\n"
              f"  - rtn: {{bits: 8, group_size: {GROUP}}}")
    handle, run, _ = run_chain(tiny_llama, text_file, passes)
    section = run.results.report_sections["allocation"]
    params = section["parameters"]
    assert params == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3)  # q, o; k, v (2 kv heads); gate, up, down
    assert section["budget"]["bits"] == int(3.3 * params)
    stored = allocated_bits(handle, run)
    assert stored == section["used"]["bits"] <= section["budget"]["bits"]
    for name, quantized in run.results.records.items():
        assert quantized.spec.bits == section["plan"][name]
        assert quantized.spec.group_size == GROUP
        if name.endswith("down_proj"):
            assert quantized.spec.bits >= 4
    assert set(section["plan"].values()) <= {2, 3, 4, 8} and len(set(section["plan"].values())) > 1
    assert section["cost"] <= section["greedy_cost"] + 1e-12
    size = model_size(handle.model, run.results.records, handle.checkpoint_dtype)
    assert size["quantized_bits_per_weight"] == pytest.approx(stored / params, abs=1e-4)
    assert section["estimator"] == sensitivity and len(section["frontier"]) > 1


def test_layer_granularity_gives_a_layer_one_width(tiny_llama, text_file):
    passes = (f"  - allocate: {{granularity: layer, sensitivity: fisher, candidates: [2, 4], budget: {{avg_bits: 3.5}}}}\n"
              f"  - rtn: {{group_size: {GROUP}}}")
    handle, run, _ = run_chain(tiny_llama, text_file, passes)
    per_layer = {}
    for name, quantized in run.results.records.items():
        per_layer.setdefault(name.split(".")[2], set()).add(quantized.spec.bits)
    assert sorted(map(tuple, per_layer.values())) == [(2,), (4,)]  # 2.5 and 4.5 bits with scales: one of each
    assert allocated_bits(handle, run) <= run.results.report_sections["allocation"]["budget"]["bits"]


def test_bytes_and_ratio_budgets(tiny_llama, text_file):
    for budget, expected_bits in (("{bytes: 60000}", 480000), ("{ratio: 0.25}", None)):
        passes = (f"  - allocate: {{sensitivity: io_similarity, budget: {budget}}}\n"
                  f"  - rtn: {{group_size: {GROUP}}}")
        handle, run, _ = run_chain(tiny_llama, text_file, passes)
        section = run.results.report_sections["allocation"]
        # The tiny checkpoint is float32, so ratio 0.25 means 8 bits per weight.
        assert section["budget"]["bits"] == (expected_bits or section["parameters"] * 8)
        assert allocated_bits(handle, run) <= section["budget"]["bits"]


def test_budget_below_every_plan_is_a_user_error(tiny_llama, text_file):
    passes = f"  - allocate: {{sensitivity: io_similarity, budget: {{avg_bits: 2.0}}}}\n  - rtn: {{group_size: {GROUP}}}"
    with pytest.raises(UserError, match="below the smallest possible plan"):
        run_chain(tiny_llama, text_file, passes)  # 2 bits plus scales is more than 2.0


def test_run_directory_has_the_plan_and_the_report_the_allocation(tiny_llama, text_file, tmp_path):
    passes = f"  - allocate: {{sensitivity: fisher, budget: {{avg_bits: 3.5}}}}\n  - gptq: {{group_size: {GROUP}}}"
    report = run_recipe(parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file)), tmp_path / "out")
    plan = yaml.safe_load((tmp_path / "out" / "bit_plan.yaml").read_text())
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    allocation = saved["allocation"]
    assert plan == allocation["plan"] and len(plan) == 14
    assert {m["bits"] for m in saved["passes"][1]["modules"].values()} == set(plan.values())
    for key in ("budget", "used", "units", "module_scores", "frontier"):
        assert allocation[key]
    assert report["size"]["quantized_bits_per_weight"] == pytest.approx(allocation["used"]["avg_bits"], abs=1e-4)
    assert "Bit allocation" in (tmp_path / "out" / "report.md").read_text()


def test_hand_edited_plan_through_quantize_plan_and_gptq_plan(tiny_llama, text_file, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("model.layers.0.mlp.down_proj: 8\n'*q_proj': 2\nre:layers\\.1\\.mlp: 3\n")
    for passes in (f"  - quantize_plan: {{file: {plan_file}}}\n  - rtn: {{bits: 4, group_size: {GROUP}}}",
                   f"  - gptq: {{bits: 4, group_size: {GROUP}, plan: {plan_file}}}"):
        _, run, _ = run_chain(tiny_llama, text_file, passes)
        bits = {name: q.spec.bits for name, q in run.results.records.items()}
        assert bits["model.layers.0.mlp.down_proj"] == 8
        assert bits["model.layers.0.self_attn.q_proj"] == bits["model.layers.1.self_attn.q_proj"] == 2
        assert bits["model.layers.1.mlp.up_proj"] == bits["model.layers.1.mlp.down_proj"] == 3
        assert bits["model.layers.0.mlp.up_proj"] == 4  # not in the plan: the quantizer's own bits


def test_plan_typos_and_bad_widths_are_user_errors(tiny_llama, text_file, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("model.layers.0.mlp.down_prj: 4\n")
    with pytest.raises(UserError, match="names no quantizable module. Did you mean: model.layers.0.mlp.down_proj"):
        run_chain(tiny_llama, text_file, f"  - quantize_plan: {{file: {plan_file}}}\n  - rtn: {{group_size: {GROUP}}}")
    plan_file.write_text("model.layers.0.mlp.down_proj: 5.5\n")
    with pytest.raises(UserError, match="bits must be an integer from 2 to 8, got 5.5"):
        run_chain(tiny_llama, text_file, f"  - quantize_plan: {{file: {plan_file}}}\n  - rtn: {{group_size: {GROUP}}}")


def test_recipe_checks(tiny_llama, text_file, tmp_path):
    cases = {
        "  - allocate: {budget: {avg_bits: 3}}\n  - evaluate_nothing_here": "unknown pass",
        "  - allocate: {budget: {avg_bits: 3}}": "a quantization pass must follow it",
        "  - allocate: {budget: {avg_bits: 3, bytes: 10}}\n  - rtn": "give exactly one of avg_bits, bytes, ratio",
        "  - allocate: {budget: {avg_bits: 3}, candidates: [2, 16]}\n  - rtn": "candidate widths must be from 2 to 8",
        "  - allocate: {budget: {avg_bits: 3}, sensitivity_file: nope.json}\n  - rtn": "file not found",
        "  - quantize_plan: {file: missing.yaml}\n  - rtn": "file not found",
    }
    for passes, message in cases.items():
        with pytest.raises(RecipeError, match=message):
            parse_recipe(recipe_text(tiny_llama, text_file, passes, text_file), base_dir=tmp_path)


def test_sensitivity_command_saves_costs_that_allocate_reuses_across_budgets(tiny_llama, text_file, tmp_path):
    from typer.testing import CliRunner

    from compress.cli.main import app

    recipe = tmp_path / "recipe.yaml"
    passes = f"  - allocate: {{sensitivity: fisher, budget: {{avg_bits: 3.0}}}}\n  - rtn: {{group_size: {GROUP}}}"
    recipe.write_text(recipe_text(tiny_llama, text_file, passes, text_file))
    saved = tmp_path / "sens.json"
    result = CliRunner().invoke(app, ["sensitivity", str(recipe), "--output", str(saved), "--quiet"])
    assert result.exit_code == 0, result.output
    document = json.loads(saved.read_text())
    assert document["estimator"] == "fisher" and len(document["units"]) == 14
    assert all(unit["cost"]["2"] > unit["cost"]["8"] for unit in document["units"].values())

    plans = {}
    for budget in (3.0, 4.0):
        reuse = f"  - allocate: {{sensitivity_file: {saved}, budget: {{avg_bits: {budget}}}}}\n  - rtn: {{group_size: {GROUP}}}"
        _, run, _ = run_chain(tiny_llama, text_file, reuse)
        section = run.results.report_sections["allocation"]
        assert section["estimator"] == "fisher" and section["sensitivity_seconds"] == document["seconds"]
        assert section["used"]["bits"] <= section["budget"]["bits"]
        plans[budget] = section["plan"]
    assert sum(plans[4.0].values()) > sum(plans[3.0].values())

    other_group = f"  - allocate: {{sensitivity_file: {saved}, budget: {{avg_bits: 3.0}}}}\n  - rtn: {{group_size: 16}}"
    with pytest.raises(UserError, match="computed with group_size=32, but this run uses 16"):
        run_chain(tiny_llama, text_file, other_group)
