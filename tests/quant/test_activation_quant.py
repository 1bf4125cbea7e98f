"""Activation fake-quantization formats and the static-scale observers, against naive references."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from compress.quant.activation import activation_quantizer, config_of, fake_quantize_fp8_per_token, settings_of
from compress.quant.config import ActivationQuantConfig
from compress.quant.element_float import FP8_E4M3_MAX
from compress.quant.observers import HISTOGRAM_BINS, MSE_SHRINK, MeanSquaredError, MinMax, Percentile


def heavy_tailed(seed: int = 0, n: int = 40_000) -> torch.Tensor:
    """Mostly unit-scale values with a few 50x outliers: the case where the observers disagree."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator)
    x[torch.randint(0, n, (20,), generator=generator)] *= 50
    return x


def feed(observer, x: torch.Tensor, batches: int = 4) -> None:
    """Every pass over `x` split into batches, as a layer's calibration batches reach an observer."""
    for pass_index in range(observer.passes):
        for part in x.chunk(batches):
            observer.observe(part.reshape(1, -1), pass_index)


def fp8_at(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    scale = clip / FP8_E4M3_MAX
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def test_minmax_is_the_largest_magnitude_over_all_batches():
    x = heavy_tailed()
    observer = MinMax()
    feed(observer, x)
    assert observer.clip().item() == x.abs().max().item()


def test_percentile_is_the_quantile_of_all_batches_to_one_bin():
    x = heavy_tailed()
    observer = Percentile(99.9)
    feed(observer, x)
    expected = torch.quantile(x.abs().double(), 0.999).item()  # the naive reference: every value at once
    clip = observer.clip().item()
    assert expected <= clip <= expected + x.abs().max().item() / HISTOGRAM_BINS
    assert clip < x.abs().max().item() / 10  # the outliers are clipped: it is not min-max


def test_mse_picks_the_candidate_with_least_error_on_the_whole_tensor():
    x = heavy_tailed(n=8000)
    observer = MeanSquaredError(fp8_at)
    feed(observer, x)
    amax = x.abs().max()
    errors = [((fp8_at(x, amax * shrink) - x) ** 2).sum().item() for shrink in MSE_SHRINK]  # naive: one candidate at a time
    best = amax * MSE_SHRINK[min(range(len(errors)), key=errors.__getitem__)]
    assert observer.clip().item() == pytest.approx(best.item(), rel=1e-6)


def test_observers_keep_one_value_per_group():
    x = torch.stack([heavy_tailed(1, 4096), 3 * heavy_tailed(2, 4096)])  # (2 heads, n)
    observer = MinMax()
    observer.observe(x)
    assert torch.equal(observer.clip(), x.abs().amax(dim=1))


def test_fp8_per_token_equals_a_naive_loop():
    x = heavy_tailed(3, 6 * 64).reshape(2, 3, 64)
    x[0, 1] = 0  # an all-zero token stays zero (no NaN from a zero scale)
    expected = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            row = x[b, t]
            scale = row.abs().max().item() / 448 or torch.finfo(torch.float32).eps
            expected[b, t] = (row / scale).to(torch.float8_e4m3fn).float() * scale
    out = fake_quantize_fp8_per_token(x)
    assert torch.equal(out, expected)
    assert torch.equal(out[0, 1], torch.zeros(64))
    assert not torch.equal(out, x)  # it did quantize


def test_fp8_per_group_scales_each_128_features_of_each_token():
    x = heavy_tailed(4, 2 * 256).reshape(2, 256)
    cfg = ActivationQuantConfig(format="fp8", per="group")
    expected = torch.cat([fake_quantize_fp8_per_token(part) for part in x.split(128, dim=-1)], dim=-1)
    assert torch.equal(activation_quantizer(cfg, {})(x), expected)


def test_static_fp8_saturates_beyond_its_scale():
    cfg = ActivationQuantConfig(format="fp8", per="tensor", static=True)
    quantize = activation_quantizer(cfg, {"input_scale": 0.01})
    out = quantize(torch.tensor([0.64, 1.0, 10.0, -10.0]))
    assert out.tolist() == pytest.approx([0.64, 0.96, 4.48, -4.48])  # 64, 100 -> 96 (ties to even), 448 x 0.01


def test_settings_round_trip_with_their_calibrated_scale():
    cfg = ActivationQuantConfig(format="fp8", per="tensor", static=True, observer="mse")
    saved = settings_of(cfg, {"input_scale": 0.0123456789})
    assert config_of(saved) == (cfg, {"input_scale": 0.0123456789})
    assert config_of({"bits": 8, "per": "token"})[0].width == 8  # settings written before formats existed


@pytest.mark.parametrize(("settings", "message"), [
    ({"format": "fp8", "bits": 8}, "`bits` is for `format: int`"),
    ({"format": "fp8", "static": True}, "static: true is one calibrated scale per tensor"),
    ({"format": "nvfp4", "per": "token"}, "scaled per group of 16"),
    ({"format": "fp8", "observer": "mse"}, "these activations are dynamic"),
    ({"format": "fp8", "per": "tensor", "static": True, "percentile": 99.0}, "read only by `observer: percentile`"),
])
def test_inconsistent_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        ActivationQuantConfig(**settings)
