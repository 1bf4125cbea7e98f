"""Mixed-precision bit allocation: pick a bit width per module (or per decoder layer) under an exact size budget,
then let the next quantization pass honour the plan.

`allocate` estimates each unit's cost at each candidate width (compressors/sensitivity.py), solves for the
cheapest plan within the budget (compressors/bit_allocation.py), and writes `run.handoff.bit_plan`, `bit_plan.yaml` and
the report's "allocation" section (plan, costs, budget vs. used, Pareto frontier). `quantize_plan` reads a
hand-edited plan file instead.

Size accounting is `UniformAffine.planned_bits` (compress/quant/records.py), the bits the report's `size` counts
for the records the quantizer will store: codes plus 16-bit scales (and zero points when asymmetric) per group. The budget covers the weights the following quantizer stores; the
rest of the model (embeddings, norms, lm_head) is unchanged and counted in `size` as before.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.quant.bit_plan import bits_for, check_plan_names, dump_plan, read_plan
from compress.engine.context import RunContext
from compress.engine.layer_sweep import model_on_device
from compress.recipe.errors import UserError
from compress.engine.model_io import ModelHandle
from compress.engine.threads import thread_independent_sum
from compress.engine.vocab_head import DEFAULT_LOGIT_CHUNK_MB, MAX_LOGIT_CHUNK_MB
from compress.quant.modules import find_linears, matches, select, weight_matrix
from compress.quant.primitives import QuantSpec
from compress.quant.records import UniformAffine
from compress.recipe.registry import StrictConfig, module_pattern_problem, register_pass
from compress.compressors import sensitivity as sens
from compress.compressors.base import WeightQuantConfig
from compress.compressors.bit_allocation import (
    Allocation,
    FrontierPoint,
    InfeasibleBudget,
    Problem,
    UnitOptions,
    pareto_frontier,
    solve_greedy,
    solve_ilp,
    solve_pareto,
)

SENSITIVITY_FORMAT = "compress.sensitivity"
SENSITIVITY_VERSION = 1
REPORT_FRONTIER_POINTS = 200  # the frontier in report.json is thinned to this many points (enough to plot)

Estimator = Literal["hessian_trace", "delta_loss", "fisher", "io_similarity"]


class BudgetConfig(StrictConfig):
    """Exactly one of:
    avg_bits: storage bits per allocated weight, scales and zero points included (uniform W3 g128 is 3.125);
    bytes: storage of the allocated weights; ratio: of their size at the checkpoint's own precision.
    """

    avg_bits: float | None = Field(None, gt=0, le=32)
    bytes: int | None = Field(None, gt=0, le=10**15)
    ratio: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetConfig":
        given = [k for k in ("avg_bits", "bytes", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of avg_bits, bytes, ratio (got {', '.join(given) or 'none'})")
        return self

    def describe(self) -> tuple[str, float]:
        kind = next(k for k in ("avg_bits", "bytes", "ratio") if getattr(self, k) is not None)
        return kind, float(getattr(self, kind))

    def limit_bits(self, parameters: int, reference_bits: int) -> int:
        if self.avg_bits is not None:
            return math.floor(self.avg_bits * parameters)
        if self.bytes is not None:
            return self.bytes * 8
        assert self.ratio is not None
        return math.floor(self.ratio * parameters * reference_bits)


class ConstraintsConfig(StrictConfig):
    """min_bits: per-pattern floors, e.g. {"*down_proj": 3} (globs or re:, as in `ignore`; the highest matching
    floor wins). max_bops: a second limit on bit operations per token, sum of rows*cols*weight_bits*activation_bits.
    """

    min_bits: dict[str, int] = Field(default_factory=dict)
    max_bops: int | None = Field(None, gt=0, le=10**21)
    activation_bits: int = Field(16, ge=2, le=32)

    @field_validator("min_bits")
    @classmethod
    def _floors_in_range(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, bits in value.items():
            problem = module_pattern_problem(pattern)
            if problem:
                raise ValueError(f"min_bits: {problem}")
            if not 2 <= bits <= 8:
                raise ValueError(f"min_bits[{pattern!r}] must be from 2 to 8, got {bits}")
        return value


class AllocateConfig(StrictConfig):
    """Mixed-precision bit allocation under an exact budget.

    samples: calibration windows the estimator uses (default: all); tol / max_probes: Hutchinson's stopping rule
    (hessian_trace). sensitivity_file: reuse costs saved by `compress sensitivity` instead of computing them.
    logit_chunk_mb: how many MiB of float32 logits (positions x vocabulary x 4 bytes) the loss holds at once; at a
    128k vocabulary hessian_trace then differentiates a batch a few hundred positions at a time (more forwards,
    same numbers) instead of holding every position's softmax for the second derivative.

    Recipe example:

        passes:
          - allocate:
              granularity: module          # module (each linear) | layer (each decoder layer)
              candidates: [2, 3, 4, 8]     # group size and symmetry come from the quantizer below
              sensitivity: hessian_trace   # hessian_trace | delta_loss | fisher | io_similarity
              solver: ilp                  # ilp | pareto | greedy
              budget: {avg_bits: 3.0}      # or {bytes: N} or {ratio: 0.25}; counts scales and zero points
              constraints: {min_bits: {"*down_proj": 3}}
          - gptq: {bits: 4, group_size: 128}
    """

    path_fields: ClassVar[tuple[str, ...]] = ("sensitivity_file",)

    granularity: Literal["module", "layer"] = "module"
    candidates: list[int] = Field(default_factory=lambda: [2, 3, 4, 8], min_length=1)
    sensitivity: Estimator = "hessian_trace"
    solver: Literal["ilp", "pareto", "greedy"] = "ilp"
    budget: BudgetConfig
    constraints: ConstraintsConfig = Field(default_factory=ConstraintsConfig)
    sensitivity_file: str | None = None
    samples: int | None = Field(None, ge=1, le=100_000)
    tol: float = Field(1e-2, gt=0, lt=1)
    max_probes: int = Field(32, ge=1, le=10_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    logit_chunk_mb: int = Field(DEFAULT_LOGIT_CHUNK_MB, ge=1, le=MAX_LOGIT_CHUNK_MB,
                                description="MiB of float32 vocabulary-wide logits the estimators hold at once")

    @field_validator("candidates")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        bad = [b for b in value if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"candidate widths must be from 2 to 8, got {bad}")
        return sorted(set(value))


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


def following_quantizer(next_quantizer: StrictConfig | None) -> WeightQuantConfig:
    """The weight quantizer a bit plan must fit: the model pass's `next_quantizer` (see PassDef)."""
    quantizer = next_quantizer
    if not isinstance(quantizer, WeightQuantConfig):
        raise UserError("a bit plan needs a following weight quantizer (rtn, gptq or awq) to take group size and "
                        "symmetry from")
    return quantizer


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
    specs: dict[int, QuantSpec],
    batches: list[torch.Tensor],
    units: dict[str, list[str]],
) -> tuple[dict[str, float], dict[str, dict[int, float]] | None, dict[str, Any]]:
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


def error_costs(modules: dict[str, nn.Module], specs: dict[int, QuantSpec],
                cost_of: Callable[[str, torch.Tensor], float]) -> dict[str, dict[int, float]]:
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
        allowed = [b for b in cfg.candidates if b >= floor]
        if not allowed:
            raise UserError(f"allocate: {name} has a floor of {floor} bits, above every candidate {cfg.candidates}")
        sizes = tuple(sum(UniformAffine.planned_bits(*shapes[m], quantizer.spec(b)).total for m in unit["modules"])
                      for b in allowed)
        bops = tuple(sum(shapes[m][0] * shapes[m][1] * b * cfg.constraints.activation_bits for m in unit["modules"])
                     for b in allowed)
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


@register_pass("allocate", AllocateConfig, scope="model", kind="allocate", needs_calibration=True)
def run_allocate(handle: ModelHandle, cfg: AllocateConfig, run: RunContext,
                 next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """Pick per-module bit widths from second-order sensitivities under an exact size budget (HAWQ-V2 / ILP)."""
    quantizer = following_quantizer(next_quantizer)
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


class QuantizePlanConfig(StrictConfig):
    """Recipe example:

        passes:
          - quantize_plan: {file: bit_plan.yaml}   # e.g. an allocate run's plan, edited by hand
          - gptq: {group_size: 128}
    """

    path_fields: ClassVar[tuple[str, ...]] = ("file",)

    file: str


@register_pass("quantize_plan", QuantizePlanConfig, scope="model", kind="allocate")
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
