"""SparseGPT: the kernel against a naive OBS reference (one column at a time, full inverse Hessian downdated),
exact sparsity and N:M validity, reconstruction better than Wanda/magnitude masks, and the fallback."""

from __future__ import annotations

import pytest
import torch

from compress.compressors.hessian import HessianAccumulator, HessianNotPositiveDefinite
from compress.compressors.magnitude import magnitude_mask
from compress.compressors.sparsegpt import sparsegpt_prune
from compress.compressors.sparsity import NM, is_nm
from compress.compressors.wanda import wanda_mask
from tests.compressors.test_gptq import correlated_inputs

DAMP = 0.01


def hessian_of(x):
    acc = HessianAccumulator(x.shape[-1], x.device)
    acc.add(x.unsqueeze(0))
    return acc.hessian


def random_weight(rows=16, columns=32, seed=1):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def naive_obs(weight, hessian, keep):
    """Given a mask, remove columns' pruned weights in order with the OBS update and the explicit inverse Hessian
    of the remaining columns (SparseGPT eq. 2/3), in float64."""
    W = weight.double().clone()
    H = hessian.double().clone()
    H += DAMP * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    for j in range(W.shape[1]):
        err = W[:, j] * (~keep[:, j])  # (rows,): the part of column j that is removed
        W[:, j:] -= torch.outer(err / Hinv[j, j], Hinv[j, j:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]  # drop column j from the inverse
    return W


def output_error(w_new, w, x):
    return float(((w_new - w) @ x.t()).norm() / (w @ x.t()).norm())


def test_kernel_matches_naive_obs_with_its_own_mask():
    x, w = correlated_inputs(), random_weight()
    H = hessian_of(x)
    result = sparsegpt_prune(w, H, 0.5, block_size=8, dampening_frac=DAMP)
    expected = naive_obs(w, H, result.mask)
    torch.testing.assert_close(result.weight.double(), expected, atol=1e-4, rtol=1e-4)
    assert (result.weight[~result.mask] == 0).all()


@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_exact_sparsity_per_block(block_size):
    x, w = correlated_inputs(columns=64), random_weight(columns=64)
    result = sparsegpt_prune(w, hessian_of(x), 0.5, block_size=block_size)
    assert int((result.weight == 0).sum()) == 16 * 64 // 2
    width = min(block_size, 64)
    per_block = (~result.mask).reshape(16, 64 // width, width).sum(dim=(0, 2))
    assert per_block.tolist() == [16 * width // 2] * (64 // width)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(4, 8)])
def test_nm_masks_are_valid(nm):
    x, w = correlated_inputs(), random_weight()
    result = sparsegpt_prune(w, hessian_of(x), nm.sparsity, nm=nm, block_size=16)
    assert is_nm(result.mask, nm)
    assert int(result.mask.sum()) == 16 * 32 * nm.n // nm.m
    assert ((result.weight != 0) <= result.mask).all()


def test_reconstruction_beats_wanda_and_magnitude():
    x, w = correlated_inputs(), random_weight()
    H = hessian_of(x)
    sparse = sparsegpt_prune(w, H, 0.5, block_size=32).weight
    wanda = w * wanda_mask(w, x.pow(2).sum(dim=0), 0.5)
    magnitude = w * magnitude_mask(w, 0.5)
    assert output_error(sparse, w, x) < 0.8 * output_error(wanda, w, x)
    assert output_error(wanda, w, x) < output_error(magnitude, w, x)


def test_dead_columns_are_pruned_and_inputs_untouched():
    x, w = correlated_inputs(), random_weight()
    x[:, 5] = 0
    H = hessian_of(x)
    w_before, H_before = w.clone(), H.clone()
    result = sparsegpt_prune(w, H, 0.25, block_size=32)
    assert result.dead_columns == 1
    assert (result.weight[:, 5] == 0).all()
    assert torch.equal(w, w_before) and torch.equal(H, H_before)


def test_nan_hessian_raises():
    with pytest.raises(HessianNotPositiveDefinite):
        sparsegpt_prune(random_weight(), torch.full((32, 32), float("nan")), 0.5)


def test_block_size_must_tile_nm_groups():
    with pytest.raises(ValueError, match="multiple of M=4"):
        sparsegpt_prune(random_weight(), hessian_of(correlated_inputs()), 0.5, nm=NM(2, 4), block_size=6)
