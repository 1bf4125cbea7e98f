"""The allocator's element-float candidates: their true storage (scales included), bit operations and floors."""

from __future__ import annotations

import pytest

from compress.compressors.allocate import build_problem, following_quantizer
from compress.compressors.configs import AllocateConfig, AWQConfig, RTNConfig
from compress.recipe.errors import UserError

SHAPES = {"a": (128, 256), "b": (64, 512)}


def problem_for(candidates, **constraints):
    cfg = AllocateConfig(candidates=candidates, budget={"avg_bits": 6.0}, constraints=constraints)
    sensitivities = {"units": {name: {"modules": [name], "cost": {str(c): 1.0 for c in cfg.candidates}}
                               for name in SHAPES}}
    return cfg, build_problem(sensitivities, cfg, RTNConfig(group_size=128), SHAPES, 10**9)


def test_float_candidates_cost_their_codes_and_scales_at_stored_width():
    cfg, problem = problem_for([4, "nvfp4", "mxfp4", "fp8", "fp8-block"], activation_bits=8)
    assert cfg.candidates == [4, "fp8", "fp8-block", "nvfp4", "mxfp4"]  # integers first, then FLOAT_LABELS order
    a = problem.units[0]
    rows, columns = SHAPES["a"]
    weights = rows * columns
    assert dict(zip(a.bits, a.sizes)) == {
        4: weights * 4 + rows * 2 * 16,                      # int4 g128: a float16 scale per row and group
        "fp8": weights * 8 + rows * 32,                      # a float32 scale per row
        "fp8-block": weights * 8 + 1 * 2 * 32,               # a float32 scale per 128x128 tile
        "nvfp4": weights * 4 + rows * columns // 16 * 8 + 32,  # FP8 per 16, one FP32 global
        "mxfp4": weights * 4 + rows * columns // 32 * 8,     # E8M0 per 32
    }
    assert a.extra is not None
    assert dict(zip(a.bits, a.extra)) == {4: weights * 4 * 8, "fp8": weights * 8 * 8, "fp8-block": weights * 8 * 8,
                                          "nvfp4": weights * 4 * 8, "mxfp4": weights * 4 * 8}


def test_min_bits_floors_count_element_widths():
    _, problem = problem_for([4, "nvfp4", "fp8"], min_bits={"a": 8})
    assert problem.units[0].bits == ("fp8",) and problem.units[1].bits == (4, "fp8", "nvfp4")


def test_awq_cannot_follow_float_candidates():
    with pytest.raises(UserError, match="awq cannot round to"):
        following_quantizer(AWQConfig(), [4, "nvfp4"])
    assert isinstance(following_quantizer(RTNConfig(), [4, "nvfp4"]), RTNConfig)


def test_float_candidates_are_weight_only():
    with pytest.raises(UserError, match="weight-only here"):
        following_quantizer(RTNConfig(bits=8, activations={"bits": 8}), [8, "fp8"])


def test_a_linear_the_fp4_groups_do_not_split_is_refused_by_name():
    import torch

    from compress.compressors.base import checked_spec
    from compress.engine.context import RunContext, RunInputs

    run = RunContext(RunInputs(device=torch.device("cpu")))
    odd = torch.nn.Linear(40, 8, bias=False)
    with pytest.raises(UserError, match="mxfp4 scales groups of 32 input columns, and m.proj has 40: add it to the "
                                        "pass's `ignore`, or use fp8 for it"):
        checked_spec("m.proj", odd, RTNConfig(format="mxfp4"), run)
    run.handoff.bit_plan["m.proj"] = RTNConfig().spec("nvfp4")
    with pytest.raises(UserError, match="gives m.proj the element-float format nvfp4, which is weight-only here"):
        checked_spec("m.proj", torch.nn.Linear(64, 8), RTNConfig(bits=8, activations={"bits": 8}), run)
