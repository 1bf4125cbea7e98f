"""Results do not depend on the torch thread count (compress/engine/threads.py): the inverse-Hessian factor bit
for bit, and GPTQ on the demo recipe (weights, perplexity, losses) at 1 and 2 threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.app.runner import run_recipe
from compress.compressors.hessian import inverse_hessian_factor
from compress.compressors.sensitivity import hutchinson_trace
from compress.engine.threads import single_threaded, thread_independent_sum, torch_threads
from compress.recipe.schema import load_recipe
from tests.conftest import DEMO_DIR, requires_demo_model


def demo_like_hessian(columns: int) -> torch.Tensor:
    """2 X^T X / n of correlated inputs with uneven scales, like a decoder layer's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, columns, generator=g) @ torch.randn(columns, columns, generator=g) * 0.1
    return (2 * x.t() @ x / x.shape[0]).float()


@pytest.mark.parametrize("columns", [256, 768])  # the demo model's hidden and MLP widths
def test_inverse_hessian_factor_has_the_same_bits_at_one_and_two_threads(columns):
    H = demo_like_hessian(columns)
    with torch_threads(1):
        one, _ = inverse_hessian_factor(H, 0.01)
    with torch_threads(2):
        two, _ = inverse_hessian_factor(H, 0.01)
        assert torch.get_num_threads() == 2  # the caller's thread count is restored
    assert torch.equal(one, two), f"max |difference| {(one - two).abs().max().item():.3g}"


def gptq_demo_report(threads: int, output: Path) -> dict:
    recipe = load_recipe(DEMO_DIR.parent / "gptq-w4.yaml", overrides=[
        "calibration.samples=2", "evaluate.perplexity[0].max_windows=1"])
    with torch_threads(threads):
        return run_recipe(recipe, output)


@requires_demo_model()
def test_gptq_demo_recipe_gives_the_same_weights_at_one_and_two_threads(tmp_path):
    one, two = gptq_demo_report(1, tmp_path / "one"), gptq_demo_report(2, tmp_path / "two")
    assert one["weights_sha256"] == two["weights_sha256"]
    assert one["metrics"]["perplexity"]["eval"]["compressed"] == two["metrics"]["perplexity"]["eval"]["compressed"]
    losses = [{fqn: entry["gptq_loss"] for fqn, entry in report["passes"][0]["modules"].items()} for report in (one, two)]
    assert losses[0] == losses[1]
    assert one["parallelism"] == {"torch_threads": 1, "interop_threads": torch.get_num_interop_threads(), "world_size": 1}
    assert two["parallelism"]["torch_threads"] == 2


def test_single_threaded_restores_the_callers_count_after_an_error():
    with torch_threads(2):
        with pytest.raises(ValueError):
            with single_threaded():
                assert torch.get_num_threads() == 1
                raise ValueError("inside")
        assert torch.get_num_threads() == 2


def test_thread_independent_sum_equals_the_one_thread_sum_at_two_threads():
    values = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)).exp()  # > 32,768: split by thread
    with torch_threads(1):
        expected = float(values.sum())
    with torch_threads(2):
        assert thread_independent_sum(values) == expected


def test_hutchinson_traces_have_the_same_bits_at_one_and_two_threads():
    # A diagonal Hessian over a 700 x 300 weight: v^T H v sums 210,000 products, which torch splits by thread.
    diagonal = torch.rand(700, 300, generator=torch.Generator().manual_seed(0)) * 100

    def hvp(probes):
        return [[diagonal * v for v in vs] for vs in probes]

    def traces(threads: int) -> tuple[float, ...]:
        with torch_threads(threads):
            return hutchinson_trace(hvp, [diagonal.shape], max_probes=8, tol=0.0,
                                    generator=torch.Generator().manual_seed(1)).traces

    assert traces(1) == traces(2)
