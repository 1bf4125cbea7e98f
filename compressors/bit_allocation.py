"""Choosing one bit width per unit (module or decoder layer) to minimise the summed sensitivity cost under a size
budget: an integer program (scipy `milp`, HiGHS), HAWQ-V2's Pareto frontier, and a greedy fallback.

Pure functions on plain numbers; `compressors/allocate.py` builds the problem from a model and turns the answer
into a bit plan. Sizes are integer bits (codes + scales + zero points, `UniformAffine.planned_bits`), so
"never over budget" is checked exactly, not up to a solver tolerance.

Costs are assumed additive over units: the total cost of a plan is the sum of its units' costs at their widths
(HAWQ-V2's sum of Tr(H)/n * ||Q(W) - W||^2; Hubara et al.'s additive loss-increase assumption).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

# Frontier points kept per DP step before thinning by size bucket (exact below it).
MAX_FRONTIER_POINTS = 5_000


Candidate = int | str
"""A unit's option: an integer bit width, or an element-float format by name (fp8, nvfp4, ...)."""


@dataclass(frozen=True)
class UnitOptions:
    """The candidate widths (or formats) of one unit, each with its cost and exact storage size in bits.

    extra: optional second resource per width (e.g. bit operations per token), limited by `Problem.extra_limit`.
    """

    name: str
    bits: tuple[Candidate, ...]
    costs: tuple[float, ...]
    sizes: tuple[int, ...]
    extra: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.bits:
            raise ValueError(f"unit {self.name} has no candidate widths")
        if not len(self.bits) == len(self.costs) == len(self.sizes):
            raise ValueError(f"unit {self.name}: bits, costs and sizes must have the same length")


@dataclass(frozen=True)
class Problem:
    units: tuple[UnitOptions, ...]
    budget_bits: int
    extra_limit: int | None = None


@dataclass(frozen=True)
class Allocation:
    """A width per unit (`choice[i]` indexes `units[i].bits`), with its total cost and size."""

    choice: tuple[int, ...]
    cost: float
    size_bits: int
    extra: int | None = None
    solver: str = ""
    notes: dict[str, object] = field(default_factory=dict)

    def bits(self, problem: Problem) -> dict[str, Candidate]:
        return {u.name: u.bits[c] for u, c in zip(problem.units, self.choice)}


class InfeasibleBudget(ValueError):
    """Even the narrowest allowed width of every unit exceeds the budget."""


def evaluate(problem: Problem, choice: tuple[int, ...], solver: str = "", **notes: object) -> Allocation:
    cost = sum(u.costs[c] for u, c in zip(problem.units, choice))
    size = sum(u.sizes[c] for u, c in zip(problem.units, choice))
    extra = None
    if problem.extra_limit is not None:
        extra = sum(_extra(u)[c] for u, c in zip(problem.units, choice))
    return Allocation(tuple(choice), float(cost), int(size), extra, solver, dict(notes))


def feasible(problem: Problem, allocation: Allocation) -> bool:
    within_extra = problem.extra_limit is None or (allocation.extra is not None and allocation.extra <= problem.extra_limit)
    return allocation.size_bits <= problem.budget_bits and within_extra


def _extra(unit: UnitOptions) -> tuple[int, ...]:
    if unit.extra is None:
        raise ValueError(f"unit {unit.name} has no value for the second constraint")
    return unit.extra


def check_feasible(problem: Problem) -> None:
    smallest = sum(min(u.sizes) for u in problem.units)
    if smallest > problem.budget_bits:
        raise InfeasibleBudget(
            f"the budget ({problem.budget_bits} bits) is below the smallest possible plan ({smallest} bits, every "
            f"unit at its narrowest allowed width); raise the budget or lower the floors in `constraints.min_bits`"
        )
    if problem.extra_limit is not None:
        smallest_extra = sum(min(_extra(u)) for u in problem.units)
        if smallest_extra > problem.extra_limit:
            raise InfeasibleBudget(f"the second limit ({problem.extra_limit}) is below its smallest possible "
                                   f"value ({smallest_extra})")


# ---------------------------------------------------------------------------------------------------
# Integer program


def solve_ilp(problem: Problem, *, time_limit_s: float = 60.0) -> Allocation:
    """min sum c_ub x_ub  s.t.  sum_b x_ub = 1 for each unit u,  sum s_ub x_ub <= budget,  x binary (HiGHS).

    A second resource (`extra`) adds one more <= row. The solution is re-checked in exact integer arithmetic; a
    tolerance-level overshoot is repaired by the greedy step-down, and noted.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # ~0.5 s to import; only when solving

    check_feasible(problem)
    offsets = np.cumsum([0] + [len(u.bits) for u in problem.units])
    n = int(offsets[-1])
    cost = np.concatenate([np.asarray(u.costs, dtype=float) for u in problem.units])
    one_per_unit = np.zeros((len(problem.units), n))
    for i in range(len(problem.units)):
        one_per_unit[i, offsets[i] : offsets[i + 1]] = 1
    rows = [LinearConstraint(one_per_unit, 1, 1)]
    # Scaled to ~1 so HiGHS's absolute feasibility tolerance means the same on a 1M- and a 7B-parameter model;
    # the exact integer check below is what guarantees the budget.
    size = np.concatenate([np.asarray(u.sizes, dtype=float) for u in problem.units])
    rows.append(LinearConstraint(size[None] / problem.budget_bits, -np.inf, 1.0))
    if problem.extra_limit is not None:
        extra = np.concatenate([np.asarray(_extra(u), dtype=float) for u in problem.units])
        rows.append(LinearConstraint(extra[None] / max(problem.extra_limit, 1), -np.inf, 1.0))
    result = milp(cost, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=rows,
                  options={"time_limit": time_limit_s, "mip_rel_gap": 0.0})
    if result.x is None:
        raise RuntimeError(f"milp found no solution: {result.message}")
    choice = tuple(int(np.argmax(result.x[offsets[i] : offsets[i + 1]])) for i in range(len(problem.units)))
    allocation = evaluate(problem, choice, "ilp", status=str(result.message), optimal=bool(result.status == 0))
    if not feasible(problem, allocation):
        repaired = _step_down(problem, list(choice))
        return evaluate(problem, repaired.choice, "ilp", status=str(result.message), optimal=False,
                        repaired_overshoot_bits=allocation.size_bits - problem.budget_bits)
    return allocation


# ---------------------------------------------------------------------------------------------------
# Greedy


def solve_greedy(problem: Problem) -> Allocation:
    """Start every unit at its widest width; repeatedly narrow the unit whose next narrower width costs the least
    extra per saved bit, until the plan fits."""
    check_feasible(problem)
    widest = [max(range(len(u.bits)), key=u.sizes.__getitem__) for u in problem.units]
    return _step_down(problem, widest)


def _step_down(problem: Problem, choice: list[int]) -> Allocation:
    current = evaluate(problem, tuple(choice), "greedy")
    while not feasible(problem, current):
        best: tuple[float, int, int] | None = None
        for i, unit in enumerate(problem.units):
            narrower = [k for k in range(len(unit.bits)) if unit.sizes[k] < unit.sizes[choice[i]]]
            if not narrower:
                continue
            k = max(narrower, key=unit.sizes.__getitem__)  # the next width down
            saved = unit.sizes[choice[i]] - unit.sizes[k]
            rate = (unit.costs[k] - unit.costs[choice[i]]) / saved
            if best is None or rate < best[0]:
                best = (rate, i, k)
        if best is None:  # cannot happen after check_feasible, but never loop forever
            raise InfeasibleBudget("no unit can be narrowed further")
        choice[best[1]] = best[2]
        current = evaluate(problem, tuple(choice), "greedy")
    return current


# ---------------------------------------------------------------------------------------------------
# Pareto frontier (HAWQ-V2)


@dataclass(frozen=True)
class FrontierPoint:
    size_bits: int
    cost: float
    choice: tuple[int, ...]


def pareto_frontier(problem: Problem, max_points: int = MAX_FRONTIER_POINTS) -> tuple[list[FrontierPoint], bool]:
    """Every plan not beaten in both size and cost by another, by dynamic programming over units.

    Adding one unit at a time and dropping dominated (size, cost) pairs keeps the set exact. If it grows past
    `max_points`, the cheapest plan per size bucket is kept instead (returned flag `exact` is then False), so
    very large models stay tractable at a small loss of optimality. Points keep a back-pointer to the previous
    unit's point, so a step costs O(points), not O(points x units).
    """
    levels: list[list[_Point]] = [[_Point(0, 0.0, -1, -1)]]
    exact = True
    for unit in problem.units:
        merged = [_Point(p.size + unit.sizes[k], p.cost + unit.costs[k], index, k)
                  for index, p in enumerate(levels[-1]) for k in range(len(unit.bits))]
        points = _non_dominated(merged)
        if len(points) > max_points:
            points, exact = _thin(points, max_points), False
        levels.append(points)
    return [FrontierPoint(p.size, p.cost, _choice_of(levels, i)) for i, p in enumerate(levels[-1])], exact


class _Point(NamedTuple):
    size: int
    cost: float
    parent: int  # index into the previous unit's points
    option: int  # this unit's width index


def _choice_of(levels: list[list[_Point]], index: int) -> tuple[int, ...]:
    choice = []
    for level in range(len(levels) - 1, 0, -1):
        point = levels[level][index]
        choice.append(point.option)
        index = point.parent
    return tuple(reversed(choice))


def _non_dominated(points: list[_Point]) -> list[_Point]:
    """Sorted by size; keep a point only if it is strictly cheaper than every smaller (or equal-size) one."""
    points.sort(key=lambda p: (p.size, p.cost))
    kept: list[_Point] = []
    for point in points:
        if not kept or point.cost < kept[-1].cost:
            kept.append(point)
    return kept


def _thin(points: list[_Point], max_points: int) -> list[_Point]:
    low, high = points[0].size, points[-1].size
    width = max(1, (high - low) // max_points + 1)
    best: dict[int, _Point] = {}
    for point in points:
        bucket = (point.size - low) // width
        if bucket not in best or point.cost < best[bucket].cost:
            best[bucket] = point
    return _non_dominated(list(best.values()))


def solve_pareto(problem: Problem) -> tuple[Allocation, list[FrontierPoint]]:
    """HAWQ-V2: build the cost-vs-size frontier and pick its cheapest point within the budget.

    With a second constraint the frontier is over size only, so points violating it are skipped.
    """
    check_feasible(problem)
    frontier, exact = pareto_frontier(problem)
    for point in sorted(frontier, key=lambda p: p.cost):
        allocation = evaluate(problem, point.choice, "pareto", exact_frontier=exact, frontier_points=len(frontier))
        if feasible(problem, allocation):
            return allocation, frontier
    raise InfeasibleBudget("no point of the Pareto frontier satisfies both limits; try solver: ilp")


def solve_brute_force(problem: Problem) -> Allocation:
    """Every combination: for tests on small instances only."""
    best: Allocation | None = None
    for choice in itertools.product(*(range(len(u.bits)) for u in problem.units)):
        candidate = evaluate(problem, tuple(choice), "brute_force")
        if feasible(problem, candidate) and (best is None or candidate.cost < best.cost):
            best = candidate
    if best is None:
        raise InfeasibleBudget("no combination fits")
    return best

