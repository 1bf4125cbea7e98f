"""Mixed-precision bit allocation: pick a bit width per module (or per decoder layer) under an exact size budget,
then let the next quantization pass honour the plan.

`allocate` estimates each unit's cost at each candidate width (compressors/sensitivity.py), solves for the
cheapest plan within the budget (compressors/bit_allocation.py), and writes `run.handoff.bit_plan`, `bit_plan.yaml` and
the report's "allocation" section (plan, costs, budget vs. used, Pareto frontier). `quantize_plan` reads a
hand-edited plan file instead.

Size accounting is `planned_bits` (compress/quant/float_records.py), the bits the report's `size` counts for the
records the quantizer will store: codes plus 16-bit scales (and zero points when asymmetric) per group for integer
widths; for element-float candidates (fp8, fp8-block, nvfp4, mxfp4) their codes plus their scales at the width
they are stored at (8-bit FP8 / E8M0 block scales, 32-bit float scales). The budget covers the weights the
following quantizer stores; the rest of the model (embeddings, norms, lm_head) is unchanged and counted in `size`
as before. Bit operations (`max_bops`) count a candidate's element width: 8 for FP8, 4 for NVFP4 / MXFP4.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compress.quant.bit_plan import bits_for, check_plan_names, dump_plan, read_plan
from compress.engine.context import RunContext
from compress.engine.layer_sweep import model_on_device
from compress.recipe.errors import UserError
from compress.engine.model_io import ModelHandle
from compress.engine.threads import thread_independent_sum
from compress.quant.config import label_bits
from compress.quant.float_records import FloatSpec, WeightFormat, planned_bits
from compress.quant.gguf_records import GGUFSpec
from compress.quant.modules import find_linears, matches, select, weight_matrix
from compress.recipe.registry import StrictConfig
from compress.compressors import sensitivity as sens
from compress.compressors.base import WeightQuantConfig
from compress.compressors.bit_allocation import (
    Allocation,
    Candidate,
    FrontierPoint,
    InfeasibleBudget,
    Problem,
    UnitOptions,
    pareto_frontier,
    solve_greedy,
    solve_ilp,
    solve_pareto,
)
from compress.compressors.configs import (  # noqa: F401  (re-exported; defined without torch)
    Estimator,
    BudgetConfig,
    ConstraintsConfig,
    AllocateConfig,
    AWQConfig,
    GPTQConfig,
    QuantizePlanConfig,
    RTNConfig,
)

SENSITIVITY_FORMAT = "compress.sensitivity"
SENSITIVITY_VERSION = 1
REPORT_FRONTIER_POINTS = 200  # the frontier in report.json is thinned to this many points (enough to plot)

# ---------------------------------------------------------------------------------------------------
# Units: what gets one width


def quantizable_modules(handle: ModelHandle, ignore: list[str]) -> list[dict[str, nn.Module]]:
    """Per decoder layer, the linears the quantizer will touch (the same selection as `LayerContext.linears`)."""
    layers = []
    for index, layer in enumerate(handle.layers):
        found = find_linears(layer, f"{handle.layers_prefix}.{index}")
        layers.append({name: found[name] for name in select(found, ignore)})
    return layers


def group_units(layer_modules: list[dict[str, nn.Module]], granularity: str, prefix: str) -> dict[str, list[str]]:
    if granularity == "module":
        return {name: [name] for modules in layer_modules for name in modules}
    return {f"{prefix}.{i}": list(modules) for i, modules in enumerate(layer_modules) if modules}


def following_quantizer(next_quantizer: StrictConfig | None,
                        candidates: list[Candidate] | tuple[Candidate, ...] = ()) -> WeightQuantConfig:
    """The weight quantizer a bit plan must fit: the model pass's `next_quantizer` (see PassDef); element-float
    `candidates` need one that rounds onto their grids (rtn or gptq)."""
    quantizer = next_quantizer
    if not isinstance(quantizer, WeightQuantConfig):
        raise UserError("a bit plan needs a following weight quantizer (rtn, gptq or awq) to take group size and "
                        "symmetry from")
    tables = [c for c in candidates if isinstance(c, str) and c.startswith("lut:")]
    if tables and not isinstance(quantizer, (RTNConfig, GPTQConfig)):
        raise UserError(f"allocate: candidates {tables} are per-row lookup tables, which only rtn and gptq fill in "
                        "(gptq weights their k-means by its Hessian's diagonal); follow the allocation with one of them")
    floats = [c for c in candidates if isinstance(c, str)]
    if floats and isinstance(quantizer, AWQConfig):
        raise UserError(f"allocate: candidates {floats} are element-float formats, which awq cannot round to; "
                        "follow the allocation with rtn or gptq")
    if floats and quantizer.activations is not None and quantizer.activations.format == "int":
        raise UserError(f"allocate: candidates {floats} are element-float formats, weight-only here; the following "
                        "quantizer's `activations` pairs with integer widths only")
    return quantizer


def candidate_bits(candidate: Candidate) -> int:
    """Bits per element code: the integer width, or 8 / 4 for the FP8 / FP4 formats (floors and bit operations)."""
    return label_bits(candidate) if isinstance(candidate, str) else candidate


def check_float_shapes(shapes: dict[str, tuple[int, int]], specs: dict[Candidate, WeightFormat]) -> None:
    """NVFP4 / MXFP4 candidates need every allocated module's in_features to split into their groups."""
    for candidate, spec in specs.items():
        if isinstance(spec, GGUFSpec):
            bad = [name for name, (_, columns) in shapes.items() if columns % spec.group_size]
            if bad:
                raise UserError(f"allocate: candidate {candidate} stores blocks of {spec.group_size} input columns, "
                                f"which {bad[0]} ({shapes[bad[0]][1]} columns) does not split into: no GGUF type "
                                "of that block holds it; drop the candidate or add such modules to `ignore`")
            continue
        if not isinstance(spec, FloatSpec) or not spec.group_size:
            continue
        bad = [name for name, (_, columns) in shapes.items() if columns % spec.group_size]
        if bad:
            raise UserError(f"allocate: candidate {candidate} scales groups of {spec.group_size} input columns, which "
                            f"{bad[0]} ({shapes[bad[0]][1]} columns) does not split into; drop the candidate or add "
                            "such modules to the quantizer's `ignore`")


# ---------------------------------------------------------------------------------------------------
# Sensitivities


def compute_sensitivities(handle: ModelHandle, cfg: AllocateConfig, quantizer: WeightQuantConfig,
                          run: RunContext) -> dict[str, Any]:
    """Cost of every unit at every candidate width, as the JSON document `compress sensitivity` saves."""
    if run.inputs.calibration is None:
        raise UserError("allocate needs calibration data (a `calibration:` section) to estimate sensitivities")
    layer_modules = quantizable_modules(handle, quantizer.ignore)
    modules = {name: m for layer in layer_modules for name, m in layer.items()}
    units = group_units(layer_modules, cfg.granularity, handle.layers_prefix)
    specs = {bits: quantizer.spec(bits) for bits in cfg.candidates}
    check_float_shapes({name: (weight_matrix(m).shape[0], weight_matrix(m).shape[1]) for name, m in modules.items()},
                       specs)
    windows = run.inputs.calibration[: cfg.samples] if cfg.samples else run.inputs.calibration
    started = time.perf_counter()
    with model_on_device(handle, run.inputs.device):
        batches = list(windows.to(run.inputs.device).split(run.inputs.calibration_batch_size))
        scores, module_costs, details = _estimate(handle, cfg, layer_modules, specs, batches, units)
    if module_costs is not None:
        unit_costs = {u: {b: sum(module_costs[m][b] for m in names) for b in specs} for u, names in units.items()}
    else:
        unit_costs = details.pop("unit_costs")
    return {
        "format": SENSITIVITY_FORMAT,
        "version": SENSITIVITY_VERSION,
        "estimator": cfg.sensitivity,
        "granularity": cfg.granularity,
        "group_size": quantizer.group_size,
        "symmetric": quantizer.symmetric,
        "calibration_windows": int(windows.shape[0]),
        "seconds": round(time.perf_counter() - started, 3),
        "units": {
            u: {"modules": names, "parameters": sum(weight_matrix(modules[m]).numel() for m in names),
                "cost": {str(b): float(c) for b, c in unit_costs[u].items()}}
            for u, names in units.items()
        },
        "module_scores": {name: float(score) for name, score in scores.items()},
        "details": details,
    }


def _estimate(
    handle: ModelHandle,
    cfg: AllocateConfig,
    layer_modules: list[dict[str, nn.Module]],
    specs: dict[Candidate, WeightFormat],
    batches: list[torch.Tensor],
    units: dict[str, list[str]],
) -> tuple[dict[str, float], dict[str, dict[Candidate, float]] | None, dict[str, Any]]:
    """(per-module score, per-module cost per width or None when costs are per unit, details)."""
    model = handle.model
    modules = {name: m for layer in layer_modules for name, m in layer.items()}
    if cfg.sensitivity == "delta_loss":
        by_unit = {u: [(name, modules[name]) for name in names] for u, names in units.items()}
        increases = sens.loss_increases(model, by_unit, list(specs.values()), batches, cfg.logit_chunk_mb)
        unit_costs = {u: dict(zip(specs, row)) for u, row in increases.items()}
        scores = {u: row[0] for u, row in increases.items()}  # at the narrowest width
        return scores, None, {"unit_costs": unit_costs, "assumption": "additive (Hubara et al. 2021)"}
    if cfg.sensitivity == "hessian_trace":
        traces = sens.hessian_traces(model, layer_modules, batches, tol=cfg.tol, max_probes=cfg.max_probes,
                                     seed=cfg.seed, logit_chunk_mb=cfg.logit_chunk_mb)
        # Away from a minimum (an untrained model) a trace can come out negative; a quadratic model with negative
        # curvature would reward rounding error, so such a module counts as insensitive instead (and is listed).
        scores = {name: max(traces[name].traces[0], 0.0) / weight_matrix(m).numel() for name, m in modules.items()}
        costs = error_costs(modules, specs,
                            lambda name, error: scores[name] * thread_independent_sum(error.pow(2)))
        probes = {name: {"trace": t.traces[0], "probes": t.probes, "converged": t.converged} for name, t in traces.items()}
        negative = [name for name, t in traces.items() if t.traces[0] < 0]
        return scores, costs, {"hutchinson": probes, "tol": cfg.tol, "max_probes": cfg.max_probes,
                               "negative_traces_clamped": negative}
    if cfg.sensitivity == "fisher":
        windows = torch.cat(batches)
        fisher = sens.fisher_diagonals(model, modules, windows, logit_chunk_mb=cfg.logit_chunk_mb)
        scores = {name: thread_independent_sum(f) / f.numel() for name, f in fisher.items()}
        costs = error_costs(modules, specs,
                            lambda name, error: 0.5 * thread_independent_sum(fisher[name] * error.pow(2)))
        return scores, costs, {"fisher": "empirical, per-window squared gradients"}
    dissimilarity = sens.io_dissimilarity(model, list(handle.layers), batches)
    scores = {name: dissimilarity[i] for i, layer in enumerate(layer_modules) for name in layer}
    costs = error_costs(modules, specs, lambda name, error: scores[name] * thread_independent_sum(error.pow(2)))
    return scores, costs, {"layer_dissimilarity": dissimilarity}


def error_costs(modules: dict[str, nn.Module], specs: dict[Candidate, WeightFormat],
                cost_of: Callable[[str, torch.Tensor], float]) -> dict[str, dict[Candidate, float]]:
    """cost_of(module name, Q_b(W) - W) for every module and width, one float32 error matrix alive at a time
    (all of them at once would be len(candidates) float32 copies of the quantized weights)."""
    return {name: {bits: cost_of(name, sens.quantization_error(module, spec)) for bits, spec in specs.items()}
            for name, module in modules.items()}


def load_sensitivities(path: str, cfg: AllocateConfig, quantizer: WeightQuantConfig,
                       units: dict[str, list[str]]) -> dict[str, Any]:
    """A file saved by `compress sensitivity`, checked against this model, granularity and quantizer."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read sensitivity file {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != SENSITIVITY_FORMAT:
        raise UserError(f"{path} is not a sensitivity file written by `compress sensitivity`")
    for key, expected in (("granularity", cfg.granularity), ("group_size", quantizer.group_size),
                          ("symmetric", quantizer.symmetric)):
        if data.get(key) != expected:
            raise UserError(f"{path} was computed with {key}={data.get(key)!r}, but this run uses {expected!r}; "
                            "recompute it with `compress sensitivity`")
    if sorted(data["units"]) != sorted(units):
        raise UserError(f"{path} covers other modules than this model's quantizable ones; recompute it")
    missing = [b for b in cfg.candidates if any(str(b) not in u["cost"] for u in data["units"].values())]
    if missing:
        raise UserError(f"{path} has no costs for widths {missing}; recompute it with these candidates")
    return data


# ---------------------------------------------------------------------------------------------------
# The problem and the plan


def build_problem(sensitivities: dict[str, Any], cfg: AllocateConfig, quantizer: WeightQuantConfig,
                  shapes: dict[str, tuple[int, int]], budget_bits: int) -> Problem:
    units = []
    for name, unit in sensitivities["units"].items():
        floor = max([bits for pattern, bits in cfg.constraints.min_bits.items()
                     if any(matches(m, pattern) for m in unit["modules"])],
                    default=0)
        allowed = [b for b in cfg.candidates if candidate_bits(b) >= floor]
        if not allowed:
            raise UserError(f"allocate: {name} has a floor of {floor} bits, above every candidate {cfg.candidates}")
        sizes = tuple(sum(planned_bits(*shapes[m], quantizer.spec(b)).total for m in unit["modules"]) for b in allowed)
        bops = tuple(sum(shapes[m][0] * shapes[m][1] * candidate_bits(b) * cfg.constraints.activation_bits
                         for m in unit["modules"]) for b in allowed)
        units.append(UnitOptions(name, tuple(allowed), tuple(unit["cost"][str(b)] for b in allowed), sizes, bops))
    return Problem(tuple(units), budget_bits, cfg.constraints.max_bops)


def solve(problem: Problem, solver: str) -> tuple[Allocation, list[FrontierPoint], bool]:
    """The chosen plan, plus the Pareto frontier for the report (whatever the solver)."""
    try:
        if solver == "pareto":
            allocation, frontier = solve_pareto(problem)
            return allocation, frontier, bool(allocation.notes.get("exact_frontier", True))
        allocation = solve_ilp(problem) if solver == "ilp" else solve_greedy(problem)
    except InfeasibleBudget as exc:
        raise UserError(f"allocate: {exc}") from None
    frontier, exact = pareto_frontier(problem)
    return allocation, frontier, exact


def run_allocate(handle: ModelHandle, cfg: AllocateConfig, run: RunContext,
                 next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """Pick per-module bit widths from second-order sensitivities under an exact size budget (HAWQ-V2 / ILP)."""
    quantizer = following_quantizer(next_quantizer, cfg.candidates)
    layer_modules = quantizable_modules(handle, quantizer.ignore)
    modules = {name: m for layer in layer_modules for name, m in layer.items()}
    units = group_units(layer_modules, cfg.granularity, handle.layers_prefix)
    if cfg.sensitivity_file is not None:
        sensitivities = load_sensitivities(cfg.sensitivity_file, cfg, quantizer, units)
    else:
        sensitivities = compute_sensitivities(handle, cfg, quantizer, run)
    shapes = {name: (weight_matrix(m).shape[0], weight_matrix(m).shape[1]) for name, m in modules.items()}
    parameters = sum(r * c for r, c in shapes.values())
    budget_bits = cfg.budget.limit_bits(parameters, torch.finfo(handle.checkpoint_dtype).bits)
    problem = build_problem(sensitivities, cfg, quantizer, shapes, budget_bits)
    allocation, frontier, exact = solve(problem, cfg.solver)
    unit_bits = allocation.bits(problem)
    plan = {m: unit_bits[u] for u, names in units.items() for m in names}
    for name, bits in plan.items():
        run.handoff.bit_plan[name] = quantizer.spec(bits)

    section = allocation_section(cfg, quantizer, sensitivities, problem, allocation, frontier, exact, parameters)
    section["greedy_cost"] = solve_greedy(problem).cost  # the ILP is never worse; shown so a reader can check
    run.results.report_sections["allocation"] = section
    used = section["used"]
    run.results.run_files["bit_plan.yaml"] = dump_plan(plan, [
        f"bit plan written by `allocate` ({cfg.sensitivity} + {cfg.solver}); group_size {quantizer.group_size}, "
        f"symmetric {quantizer.symmetric} from the following quantizer",
        f"budget {section['budget']['bits']} bits ({section['budget']['avg_bits']:.4f} bits/weight), used "
        f"{used['bits']} bits ({used['avg_bits']:.4f} bits/weight), codes + scales + zero points",
    ])
    costs = {u: dict(zip(units_of(problem, u).bits, units_of(problem, u).costs)) for u in units}
    return {m: {"bits": plan[m], "cost": round(costs[u][unit_bits[u]], 8),
                "sensitivity": sensitivities["module_scores"].get(m)}
            for u, names in units.items() for m in names}


def units_of(problem: Problem, name: str) -> UnitOptions:
    return next(u for u in problem.units if u.name == name)


def allocation_section(cfg: AllocateConfig, quantizer: WeightQuantConfig, sensitivities: dict[str, Any],
                       problem: Problem, allocation: Allocation, frontier: list[FrontierPoint], exact: bool,
                       parameters: int) -> dict[str, Any]:
    """report.json's "allocation": budget vs. used, the plan, every unit's costs, and the Pareto frontier."""
    kind, value = cfg.budget.describe()
    chosen = allocation.bits(problem)
    step = max(1, len(frontier) // REPORT_FRONTIER_POINTS)
    return {
        "estimator": sensitivities["estimator"],
        "solver": cfg.solver,
        "granularity": cfg.granularity,
        "candidates": cfg.candidates,
        "group_size": quantizer.group_size,
        "symmetric": quantizer.symmetric,
        "parameters": parameters,
        "budget": {kind: value, "bits": problem.budget_bits, "bytes": problem.budget_bits // 8,
                   "avg_bits": problem.budget_bits / parameters, "max_bops": problem.extra_limit},
        "used": {"bits": allocation.size_bits, "bytes": math.ceil(allocation.size_bits / 8),
                 "avg_bits": allocation.size_bits / parameters, "bops": allocation.extra},
        "cost": allocation.cost,
        "solver_notes": allocation.notes,
        "plan": chosen if cfg.granularity == "module" else
        {m: chosen[u] for u, unit in sensitivities["units"].items() for m in unit["modules"]},
        "units": {u.name: {"modules": sensitivities["units"][u.name]["modules"],
                           "parameters": sensitivities["units"][u.name]["parameters"],
                           "bits": chosen[u.name],
                           "cost": dict(zip(map(str, u.bits), u.costs)),
                           "size_bits": dict(zip(map(str, u.bits), u.sizes))} for u in problem.units},
        "module_scores": sensitivities["module_scores"],
        "sensitivity_details": sensitivities.get("details", {}),
        "sensitivity_seconds": sensitivities.get("seconds"),
        "frontier_exact": exact,
        "frontier": [{"bits": p.size_bits, "avg_bits": p.size_bits / parameters, "cost": p.cost}
                     for p in frontier[::step]],
    }


# ---------------------------------------------------------------------------------------------------
# A hand-edited plan


def run_quantize_plan(handle: ModelHandle, cfg: QuantizePlanConfig, run: RunContext,
                      next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """Take per-module bit widths from a plan file (module name or pattern -> bits) for the next quantizer."""
    quantizer = following_quantizer(next_quantizer)
    plan = read_plan(cfg.file)
    modules = [name for layer in quantizable_modules(handle, quantizer.ignore) for name in layer]
    check_plan_names(plan, modules, cfg.file)
    results = {}
    for name in modules:
        bits = bits_for(name, plan)
        if bits is not None:
            run.handoff.bit_plan[name] = quantizer.spec(bits)
            results[name] = {"bits": bits}
    return results
