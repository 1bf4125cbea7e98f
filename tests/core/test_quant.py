"""RTN primitives: codes in range, half-step error bound, shorter last group, zeros kept."""

import pytest
import torch

from compress.quant.primitives import PerChannel, PerGroup, QuantSpec, group_bounds
from compress.quant.records import quantize_rtn


def _half_step_bound_holds(w: torch.Tensor, spec: QuantSpec) -> None:
    q = quantize_rtn(w, spec)
    error = (q.dequantize() - w).abs()
    for g, (start, end) in enumerate(group_bounds(w.shape[1], spec)):
        half_step = q.scale[:, g : g + 1] / 2
        assert torch.all(error[:, start:end] <= half_step * (1 + 1e-5) + 1e-7), f"group {g} exceeds half a step"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(16)])
def test_codes_in_range_and_error_within_half_step(bits, symmetric, granularity):
    torch.manual_seed(bits)
    w = torch.randn(24, 64) * torch.rand(24, 1) * 3  # rows of very different scale
    spec = QuantSpec(bits, symmetric, granularity)
    q = quantize_rtn(w, spec)
    assert q.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    _half_step_bound_holds(w, spec)


def test_symmetric_uses_full_signed_range():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.25, -0.25, 0.75]])
    q = quantize_rtn(w, QuantSpec(3, True, PerChannel()))
    # 8 levels from -4 to 3 (as compressed-tensors), not 7 from -3 to 3: scale = absmax / 3.5
    assert q.scale.item() == pytest.approx(1.0 / 3.5)
    assert q.codes.max().item() == 3 and q.codes[0, 1].item() == -2  # -0.5 * 3.5 = -1.75 -> -2


def test_group_size_that_does_not_divide_gives_shorter_last_group():
    torch.manual_seed(0)
    w = torch.randn(8, 100)
    w[:, 96:] *= 100  # the last 4 columns are far larger: they must get their own scale
    spec = QuantSpec(4, True, PerGroup(32))
    q = quantize_rtn(w, spec)
    assert group_bounds(100, spec) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert q.scale.shape == (8, 4) and q.codes.shape == (8, 100)
    expected_last = w[:, 96:].abs().amax(dim=1) / 7.5
    torch.testing.assert_close(q.scale[:, 3], expected_last)
    _half_step_bound_holds(w, spec)
    # The first groups keep their fine scale despite the outliers in the short group.
    assert q.scale[:, 0].max() < q.scale[:, 3].min() / 10


@pytest.mark.parametrize("symmetric", [True, False])
def test_zeros_stay_exactly_zero(symmetric):
    torch.manual_seed(1)
    w = torch.randn(16, 48) + 0.5
    w[w.abs() < 0.4] = 0.0
    q = quantize_rtn(w, QuantSpec(3, symmetric, PerGroup(16)))
    assert torch.all(q.dequantize()[w == 0] == 0)


def test_all_zero_rows_are_reconstructed():
    w = torch.zeros(4, 8)
    q = quantize_rtn(w, QuantSpec(4, False, PerChannel()))
    assert torch.equal(q.dequantize(), w)


def test_storage_bits_counts_codes_and_scales():
    q = quantize_rtn(torch.randn(8, 64), QuantSpec(4, True, PerGroup(32)))
    assert q.storage_bits().total == 8 * 64 * 4 + 8 * 2 * 16
    q = quantize_rtn(torch.randn(8, 64), QuantSpec(4, False, PerGroup(32)))
    assert q.storage_bits().total == 8 * 64 * 4 + 8 * 2 * (16 + 4)


def test_spec_rejects_out_of_range_bits():
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(9)


@pytest.mark.parametrize("group", [None, 16, 7])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_groups_at_once_equal_group_by_group(group, symmetric):
    """quantize_rtn/dequantize treat the whole groups as one batch of rows; the codes must be the bits a loop over
    the groups (the reference definition) gives, including the shorter last group."""
    from compress.quant.primitives import compute_qparams, dequantize_codes, quantize_codes

    torch.manual_seed(2)
    w = torch.randn(12, 100) * torch.rand(12, 1)
    spec = QuantSpec(3, symmetric, PerGroup(group) if group else PerChannel())
    q = quantize_rtn(w, spec)
    for g, (start, end) in enumerate(group_bounds(100, spec)):
        scale, zero = compute_qparams(w[:, start:end], spec)
        codes = quantize_codes(w[:, start:end], scale, zero, spec)
        assert torch.equal(q.scale[:, g], scale) and torch.equal(q.zero[:, g], zero)
        assert torch.equal(q.codes[:, start:end], codes.to(q.codes.dtype))
        assert torch.equal(q.dequantize()[:, start:end], dequantize_codes(codes, scale, zero))
