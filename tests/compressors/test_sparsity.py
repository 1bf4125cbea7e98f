"""Mask helpers, magnitude and Wanda kernels against naive references written here, and config validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from compress.compressors.magnitude import magnitude_mask
from compress.compressors.pruning import PruneConfig
from compress.compressors.sparsity import NM, is_nm, nm_mask, owl_sparsities, parse_pattern, topk_mask
from compress.compressors.wanda import WandaConfig, wanda_mask


def scores(rows=8, columns=32, seed=0):
    return torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed))


def naive_row_mask(score, sparsity):
    keep = torch.ones_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda c: float(score[r, c]))
        for c in order[: round(sparsity * score.shape[1])]:
            keep[r, c] = False
    return keep


def naive_nm_mask(score, n, m):
    keep = torch.zeros_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            best = sorted(range(g, g + m), key=lambda c: -float(score[r, c]))[:n]
            for c in best:
                keep[r, c] = True
    return keep


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_topk_per_row_matches_naive_and_counts_exactly(sparsity):
    s = scores()
    keep = topk_mask(s, sparsity, per="row")
    assert torch.equal(keep, naive_row_mask(s, sparsity))
    assert (~keep).sum(dim=1).tolist() == [round(sparsity * 32)] * 8


def test_topk_per_module_prunes_the_globally_smallest():
    s = scores(rows=4, columns=10)
    keep = topk_mask(s, 0.3, per="module")
    assert int((~keep).sum()) == 12
    assert s[~keep].max() < s[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_naive_and_is_valid(n, m):
    s = scores(columns=32)
    keep = nm_mask(s, NM(n, m))
    assert torch.equal(keep, naive_nm_mask(s, n, m))
    assert is_nm(keep, NM(n, m))
    assert (keep.reshape(8, -1, m).sum(dim=2) == n).all()


def test_is_nm_rejects_a_dense_group():
    keep = nm_mask(scores(), NM(2, 4))
    keep[3, 5:8] = True  # a group with 3 kept weights
    assert not is_nm(keep, NM(2, 4))


def test_nm_mask_needs_width_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(scores(columns=30), NM(2, 4))


@pytest.mark.parametrize("text,expected", [("unstructured", None), ("2:4", NM(2, 4)), ("4:8", NM(4, 8))])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["4:2", "2-4", "0:4", "half"])
def test_parse_pattern_rejects(text):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


def test_owl_holds_the_mean_and_gives_outlier_layers_more_weights():
    shares = [0.01, 0.05, 0.02, 0.10]
    ratios = owl_sparsities(shares, target=0.5, spread=0.08)
    assert sum(ratios) / 4 == pytest.approx(0.5, abs=1e-12)
    assert max(ratios) - min(ratios) == pytest.approx(0.16)
    assert ratios.index(min(ratios)) == 3 and ratios.index(max(ratios)) == 0
    assert owl_sparsities([0.1, 0.1], 0.6, 0.08) == [0.6, 0.6]


def test_magnitude_mask_keeps_largest_weights():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    keep = magnitude_mask(w, 0.5)
    assert int((~keep).sum()) == 256
    assert w[~keep].abs().max() <= w[keep].abs().min()


def test_wanda_mask_matches_naive_score_and_differs_from_magnitude():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 32, generator=g)
    act_sq = torch.rand(32, generator=g) * torch.linspace(0.01, 100, 32)
    keep = wanda_mask(w, act_sq, 0.5)
    reference = naive_row_mask(w.abs() * act_sq.sqrt(), 0.5)
    assert torch.equal(keep, reference)
    assert not torch.equal(keep, topk_mask(w.abs(), 0.5, per="row"))  # activations change the decision
    assert is_nm(wanda_mask(w, act_sq, 0.5, NM(2, 4)), NM(2, 4))


def test_config_pattern_and_sparsity_must_agree():
    assert PruneConfig(pattern="2:4").nm == NM(2, 4)
    assert PruneConfig(sparsity=0.5, pattern="2:4").nm == NM(2, 4)
    with pytest.raises(ValidationError, match="pattern 2:4 prunes exactly 0.5"):
        PruneConfig(sparsity=0.6, pattern="2:4")
    with pytest.raises(ValidationError, match="set `sparsity`"):
        WandaConfig()
    with pytest.raises(ValidationError, match=r"sparsity must be in \[0, 1\)"):
        WandaConfig(sparsity=1.2)
    with pytest.raises(ValidationError, match="Extra inputs"):
        WandaConfig(sparsity=0.5, sparsty=0.5)
