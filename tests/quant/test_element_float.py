"""Element-float primitives against naive references: torch's float8 cast, an explicit E2M1 table with ties to the
even code, and compressed-tensors' own scale and rounding functions (the format's definition on disk)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

from compress.quant.element_float import (
    FP4_E2M1_MAX,
    FP4_E2M1_VALUES,
    FP8_E4M3_MAX,
    e8m0_exponent,
    e8m0_from_exponent,
    e8m0_scale,
    fake_quantize_fp8,
    fake_quantize_mxfp4,
    fp8_scale,
    fake_quantize_nvfp4,
    fp4_e2m1_codes,
    fp4_e2m1_values,
    fp8_e4m3_bits,
    fp8_e4m3_from_bits,
    nvfp4_block_scales,
    nvfp4_global_scale,
    round_to_fp4_e2m1,
    round_to_fp8_e4m3,
)


def naive_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest entry of the signed E2M1 table, one value at a time; a tie goes to the even code (0, 1, 2, 4 ...)."""
    out = []
    for value in x.flatten().tolist():
        magnitude = min(abs(value), FP4_E2M1_MAX)
        distances = [abs(magnitude - grid) for grid in FP4_E2M1_VALUES]
        best = min(distances)
        code = next(c for c in range(8) if distances[c] == best and (distances.count(best) == 1 or c % 2 == 0))
        out.append(-FP4_E2M1_VALUES[code] if value < 0 else FP4_E2M1_VALUES[code])
    return torch.tensor(out).reshape(x.shape)


def test_fp8_rounding_is_torchs_float8_cast_and_saturates() -> None:
    x = torch.randn(4096) * 100
    assert torch.equal(round_to_fp8_e4m3(x), x.to(torch.float8_e4m3fn).float())
    beyond = torch.tensor([448.0, 449.0, 1e6, -1e30, 464.0, 0.0])
    assert round_to_fp8_e4m3(beyond).tolist() == [448.0, 448.0, 448.0, -448.0, 448.0, 0.0]  # no NaN past the max
    assert torch.equal(fp8_e4m3_from_bits(fp8_e4m3_bits(x)), round_to_fp8_e4m3(x))


def test_fp4_rounding_is_the_nearest_table_entry_with_ties_to_even() -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0])
    assert round_to_fp4_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -1.0, -4.0]
    x = torch.cat([torch.randn(3000) * 3, torch.arange(-70, 71) / 10, torch.tensor([6.0, 7.0, 1e9, -1e9])])
    assert torch.equal(round_to_fp4_e2m1(x), naive_fp4(x))
    assert torch.equal(round_to_fp4_e2m1(x), cast_to_fp4(x.clone().clamp(-6, 6)))  # compressed-tensors' rounding
    assert torch.equal(fp4_e2m1_values(fp4_e2m1_codes(x)), round_to_fp4_e2m1(x))


def test_nvfp4_scales_are_compressed_tensors_scales() -> None:
    w = torch.randn(8, 64) * torch.logspace(-3, 1, 8)[:, None]
    args = preset_name_to_scheme("NVFP4A16", ["Linear"]).weights
    blocks = w.unflatten(-1, (4, 16))
    global_ct = generate_gparam(w.min(), w.max())
    global_ours = nvfp4_global_scale(w.abs().amax())
    assert torch.equal(global_ours, global_ct)
    ours = nvfp4_block_scales(blocks.abs().amax(-1), global_ours)
    theirs, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_ct)
    assert torch.equal(ours, theirs.float())
    expected = fake_quantize(w, theirs.float(), torch.zeros_like(theirs), args, global_scale=global_ct)
    assert torch.equal(fake_quantize_nvfp4(w, global_ours), expected)


def test_mxfp4_scales_are_compressed_tensors_e8m0_scales() -> None:
    w = torch.randn(8, 128) * torch.logspace(-4, 2, 8)[:, None]
    w[0, :32] = 1.75 * 4  # mantissa 1.75: the power of two rounds up
    w[1, :32] = 1.7499 * 4
    args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, scale_dtype=torch.uint8,
                            zp_dtype=torch.uint8)
    blocks = w.unflatten(-1, (4, 32))
    ours = e8m0_scale(blocks.abs().amax(-1))
    theirs, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    assert torch.equal(ours, theirs.float())
    assert ours[0, 0] == 2.0 and ours[1, 0] == 1.0
    assert torch.equal(e8m0_from_exponent(e8m0_exponent(ours)), ours)
    expected = fake_quantize(w, theirs.float(), torch.zeros_like(theirs), args)
    assert torch.equal(fake_quantize_mxfp4(w), expected)


def test_zero_and_all_equal_blocks_are_nan_free_and_exact() -> None:
    w = torch.zeros(4, 64)
    w[1] = 0.37  # all-equal blocks: the block max maps onto the format's largest or a grid value
    w[2, :32] = -3.0
    for name, out in {
        "fp8": fake_quantize_fp8(w, fp8_scale(w.abs().amax(1, keepdim=True))),
        "fp8 all zero": fake_quantize_fp8(torch.zeros_like(w), fp8_scale(torch.tensor(0.0))),
        "nvfp4": fake_quantize_nvfp4(w, nvfp4_global_scale(w.abs().amax())),
        "nvfp4 all zero": fake_quantize_nvfp4(torch.zeros_like(w), nvfp4_global_scale(torch.tensor(0.0))),
        "mxfp4": fake_quantize_mxfp4(w),
        "mxfp4 all zero": fake_quantize_mxfp4(torch.zeros_like(w)),
    }.items():
        assert torch.isfinite(out).all(), name
        assert (out[w == 0] == 0).all(), name
    assert torch.equal(fake_quantize_fp8(w, fp8_scale(w.abs().amax(1, keepdim=True)))[1], w[1])  # 0.37 -> 448 * s
    assert torch.allclose(fake_quantize_nvfp4(w, nvfp4_global_scale(w.abs().amax()))[1], w[1], rtol=0.07)
    assert torch.equal(fake_quantize_mxfp4(w)[2, :32], w[2, :32])  # scale 2^-1: -3 -> code -6
    # MX keeps no block max: 2.5 = 1.25 * 2 gets scale 2^-1 and code 5, a tie that goes to 4, i.e. 2.0
    assert fake_quantize_mxfp4(torch.full((1, 32), 2.5)).unique().tolist() == [2.0]


def test_groups_must_divide_the_last_dimension() -> None:
    with pytest.raises(ValueError, match="groups of 16"):
        fake_quantize_nvfp4(torch.ones(2, 40), torch.ones(1))
    with pytest.raises(ValueError, match="groups of 32"):
        fake_quantize_mxfp4(torch.ones(2, 40))
