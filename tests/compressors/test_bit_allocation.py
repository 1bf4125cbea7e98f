"""Bit-allocation solvers: the ILP is optimal (equal to brute force), never worse than greedy, never over budget."""

import random

import pytest

from compress.compressors.bit_allocation import (
    InfeasibleBudget,
    Problem,
    UnitOptions,
    pareto_frontier,
    solve_brute_force,
    solve_greedy,
    solve_ilp,
    solve_pareto,
)

WIDTHS = (2, 3, 4, 8)


def random_problem(seed: int, units: int = 5, second_limit: bool = False) -> Problem:
    """Units of different sizes; cost falls roughly 4x per extra bit, with per-unit sensitivity and noise."""
    rng = random.Random(seed)
    options = []
    for i in range(units):
        params = rng.choice([64, 192, 256, 768])
        groups = params // 64
        sizes = tuple(params * b + groups * 16 for b in WIDTHS)  # codes + one 16-bit scale per group
        sensitivity = rng.lognormvariate(0, 1.5)
        costs = tuple(sensitivity * params * 4.0 ** (-b) * rng.uniform(0.7, 1.3) for b in WIDTHS)
        bops = tuple(params * b * rng.choice([1, 4]) for b in WIDTHS)
        options.append(UnitOptions(f"u{i}", WIDTHS, costs, sizes, bops))
    smallest, largest = sum(min(u.sizes) for u in options), sum(max(u.sizes) for u in options)
    budget = rng.randint(smallest, largest)
    extra_limit = None
    if second_limit:
        lo, hi = sum(min(u.extra) for u in options), sum(max(u.extra) for u in options)
        extra_limit = rng.randint(lo, hi)
    return Problem(tuple(options), budget, extra_limit)


@pytest.mark.parametrize("seed", range(25))
def test_ilp_equals_brute_force_and_beats_greedy(seed):
    problem = random_problem(seed)
    ilp, brute, greedy = solve_ilp(problem), solve_brute_force(problem), solve_greedy(problem)
    assert ilp.cost == pytest.approx(brute.cost, rel=1e-9, abs=1e-12)
    assert ilp.cost <= greedy.cost + 1e-12
    for allocation in (ilp, greedy):
        assert allocation.size_bits <= problem.budget_bits


def test_greedy_is_strictly_worse_somewhere():
    """Otherwise the comparison above would prove nothing about the ILP."""
    gaps = [solve_greedy(p).cost - solve_ilp(p).cost for p in (random_problem(s) for s in range(25))]
    assert max(gaps) > 0


@pytest.mark.parametrize("seed", range(10))
def test_ilp_honours_a_second_constraint(seed):
    problem = random_problem(seed, second_limit=True)
    try:
        brute = solve_brute_force(problem)
    except InfeasibleBudget:
        pytest.skip("this random instance has no plan within both limits")
    ilp = solve_ilp(problem)
    assert ilp.cost == pytest.approx(brute.cost, rel=1e-9, abs=1e-12)
    assert ilp.size_bits <= problem.budget_bits and ilp.extra <= problem.extra_limit


@pytest.mark.parametrize("seed", range(10))
def test_pareto_frontier_is_exact_and_its_budget_point_is_optimal(seed):
    problem = random_problem(seed)
    frontier, exact = pareto_frontier(problem)
    assert exact
    sizes = [p.size_bits for p in frontier]
    costs = [p.cost for p in frontier]
    assert sizes == sorted(sizes) and all(a > b for a, b in zip(costs, costs[1:]))  # strictly better with size
    pareto, _ = solve_pareto(problem)
    assert pareto.cost == pytest.approx(solve_brute_force(problem).cost, rel=1e-9)


def test_budget_met_exactly_at_its_edge():
    unit = UnitOptions("a", (2, 4), (10.0, 1.0), (200, 400))
    assert solve_ilp(Problem((unit, unit), 600)).size_bits == 600
    assert solve_ilp(Problem((unit, unit), 599)).size_bits == 400


def test_infeasible_budget_names_the_smallest_plan():
    unit = UnitOptions("a", (2, 4), (10.0, 1.0), (200, 400))
    with pytest.raises(InfeasibleBudget, match=r"smallest possible plan \(400 bits"):
        solve_ilp(Problem((unit, unit), 399))
