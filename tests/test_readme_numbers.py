"""The README's numbers are the bench's: its results table is bench/demo_results.py's output, verbatim, and the
protocol it quotes is what the shipped recipes score; the allocation table's rows are in bench/results/allocation.md.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from compress.recipe.schema import load_recipe
from compress.recipes import resolve_recipe_path
from tests.conftest import REPO

README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"


def _bench_module():
    spec = importlib.util.spec_from_file_location("demo_results", REPO / "bench" / "demo_results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


BENCH = _bench_module()


def readme_results_block() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(BENCH.BEGIN) == 1 and text.count(BENCH.END) == 1, "README's results markers are missing"
    return text[text.index(BENCH.BEGIN) + len(BENCH.BEGIN):text.index(BENCH.END)].strip()


def test_readme_results_table_is_the_bench_output():
    generated = (RESULTS / "demo_results.md").read_text(encoding="utf-8")
    assert readme_results_block() in generated, "README.md differs from bench/results/demo_results.md: rerun bench/demo_results.py"


def test_each_row_names_its_recipe_command():
    block = readme_results_block()
    for row in BENCH.ROWS:
        assert f"`{' '.join(row.command())}`".replace("'", "") in block.replace("'", ""), row.key


def test_the_quoted_protocol_is_what_the_shipped_recipes_score():
    """Every row's recipe scores every window of eval.txt at the quoted seq_len (not the first N of them)."""
    quoted = re.search(r"all (\d+) windows of (\d+) tokens", readme_results_block())
    assert quoted, "the table must say how many windows it scores"
    numbers = BENCH.json_numbers()
    for row in BENCH.ROWS:
        recipe = load_recipe(resolve_recipe_path(row.recipe), overrides=list(row.overrides))
        (step,) = [step for step in recipe.evaluations if step.name == "perplexity"]
        assert step.config.max_windows is None, f"{row.recipe} scores only {step.config.max_windows} windows"
        assert step.config.seq_len == int(quoted[2]), row.recipe
        assert Path(step.config.dataset) == REPO / "recipes" / "demo" / "eval.txt", row.recipe
        assert numbers[row.key]["windows"] == int(quoted[1]), f"{row.key} was scored on another number of windows"


def test_allocation_rows_are_in_the_allocation_bench():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("`bench/allocation.py` writes"):text.index("Every row is in `bench/results/allocation.md`")]
    bench = (RESULTS / "allocation.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (uniform GPTQ W(\d)|hessian_trace \+ ilp, then GPTQ) \| ([\d.]+) \| \**([\d.]+)\** \|$", table, re.M)
    assert len(rows) >= 6
    for scheme, uniform_bits, bits, perplexity in rows:
        wanted = f"| GPTQ W{uniform_bits} g128 | {bits} | {perplexity} |" if uniform_bits else f"{perplexity} ({bits})"
        assert wanted in bench, f"README's allocation row {scheme} {bits} {perplexity} is not in allocation.md"
