"""Element-float formats: FP8 E4M3 and FP4 E2M1 grids and their scales, exactly as compressed-tensors defines them.

Weights (records, RTN, GPTQ) and activations (dynamic/static FP8, W4A4 fake-quant) share these, so what we
compute in memory is what the library's packers write and vLLM runs. The references, read from
compressed-tensors 0.20 (quantization/utils/helpers.py `calculate_qparams`, `generate_gparam`;
quantization/utils/fp4_utils.py `cast_to_fp4`; quantization/utils/mxfp_utils.py `generate_mx_scales`;
lifecycle/forward_helpers.py `_quantize`/`_dequantize`):

- FP8 E4M3 (`float8_e4m3fn`): max 448, no infinities; values are clamped to +-448, then cast (round to nearest,
  ties to even). Scale = amax / 448 (a zero scale becomes float32 eps, as the library does).
- FP4 E2M1: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; clamp to +-6, round to nearest, ties to the even code
  (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4): `cast_to_fp4`'s thresholds.
- NVFP4: FP4 elements, one FP8 E4M3 scale per 16 along the last dim, one FP32 global scale per tensor:
  global = 448 * 6 / amax(tensor); block = fp8(global * amax(block) / 6) (0 -> 0.125, the FP8 eps the library
  substitutes); the element scale is block / global.
- MXFP4: FP4 elements, one E8M0 (power of two) scale per 32: amax rounded to a power of two (up when its
  mantissa reaches 1.75, the E2M1 mantissa's half step), divided by 4 (2^floor(log2 6)); biased exponent
  clamped to [0, 255] (an all-zero block gets 2^-127).

Every function takes and returns float tensors; groups run along the last dimension and must divide it.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of code 0..7; bit 3 is the sign
E8M0_BIAS = 127
NVFP4_GROUP = 16
MXFP4_GROUP = 32
FP8_ZERO_SCALE = 0.125  # compressed-tensors' `_get_dtype_eps(float8_e4m3fn)`: the stand-in for a zero FP8 scale

# (threshold, inclusive) pairs between consecutive E2M1 magnitudes: a magnitude above the threshold (or at it,
# when inclusive) moves up one code. Inclusive exactly where the upper neighbour has the even code: ties to even.
_FP4_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def round_to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 values of `x` on the E4M3 grid: saturated at +-448, then torch's `float8_e4m3fn` cast."""
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def fp4_e2m1_magnitude_codes(magnitude: torch.Tensor) -> torch.Tensor:
    """Code 0..7 (uint8) of the E2M1 magnitude nearest to `magnitude` (>= 0), saturating at 6, ties to even."""
    codes = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for threshold, inclusive in _FP4_THRESHOLDS:
        codes += (magnitude >= threshold if inclusive else magnitude > threshold).to(torch.uint8)
    return codes


def fp4_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes of `x` (uint8, sign in bit 3, magnitude code in bits 0-2), the packer's nibbles."""
    x = x.float()
    sign = (x < 0).to(torch.uint8) << 3
    return fp4_e2m1_magnitude_codes(x.abs()) | sign


def fp4_e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit E2M1 codes (`fp4_e2m1_codes`)."""
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -magnitude, magnitude)


def round_to_fp4_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float32 values of `x` on the E2M1 grid: nearest magnitude, saturating at +-6, ties to the even code."""
    return fp4_e2m1_values(fp4_e2m1_codes(x))


def fp8_e4m3_bits(values: torch.Tensor) -> torch.Tensor:
    """The E4M3 bit patterns (uint8) of `values` (already on the grid, or rounded onto it)."""
    return round_to_fp8_e4m3(values).to(torch.float8_e4m3fn).view(torch.uint8)


def fp8_e4m3_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3 bit patterns (uint8)."""
    return bits.view(torch.float8_e4m3fn).float()


def grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """`x` (..., n) viewed as (..., n // group, group); `group` must divide n."""
    if x.shape[-1] % group:
        raise ValueError(f"a last dimension of {x.shape[-1]} does not split into groups of {group}")
    return x.unflatten(-1, (x.shape[-1] // group, group))


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP8 scale(s) mapping `amax` onto 448 (float32); a zero amax gets float32 eps, as compressed-tensors does."""
    scale = amax.float() / FP8_E4M3_MAX
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x on the FP8 grid times `scale` (broadcast against x), in x's dtype: quantize then dequantize."""
    scale = scale.float()
    return (round_to_fp8_e4m3(x.float() / scale) * scale).to(x.dtype)


def e8m0_scale(block_amax: torch.Tensor) -> torch.Tensor:
    """MXFP4 block scales (float32 powers of two) for per-block amax values, as `generate_mx_scales` makes them."""
    amax = block_amax.float().contiguous()
    # Round to a power of two by adding half an E2M1 mantissa step (2^21 in float32's 23-bit mantissa) to the bit
    # pattern and dropping the mantissa: amax = m * 2^e becomes 2^(e+1) when m >= 1.75, else 2^e.
    power_of_two = ((amax.view(torch.int32) + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)
    exponent = torch.floor(torch.log2(power_of_two)) - 2  # 2 = floor(log2(6)): the block max lands near 4..6
    biased = (exponent + E8M0_BIAS).clamp(0, 255)
    return torch.exp2(biased - E8M0_BIAS)


def e8m0_exponent(scale: torch.Tensor) -> torch.Tensor:
    """The stored E8M0 byte (biased exponent, uint8) of power-of-two scales (`e8m0_scale`)."""
    return (torch.floor(torch.log2(scale.float())) + E8M0_BIAS).to(torch.uint8)


def e8m0_from_exponent(biased: torch.Tensor) -> torch.Tensor:
    """float32 power-of-two scales of stored E8M0 bytes."""
    return torch.exp2(biased.float() - E8M0_BIAS)


def nvfp4_global_scale(tensor_amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 per-tensor scale, shape (1,): 448 * 6 / amax, so block scales use FP8's whole range.

    A zero or non-finite amax gives 1.0 (no global scaling), as `generate_gparam` does.
    """
    amax = tensor_amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = FP8_E4M3_MAX * FP4_E2M1_MAX / amax
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def nvfp4_block_scales(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP8 scales (float32 values on the E4M3 grid) for per-block amax values and the global scale.

    The element scale a block divides by is this / global_scale.
    """
    scales = round_to_fp8_e4m3(global_scale.float() * (block_amax.float() / FP4_E2M1_MAX))
    return torch.where(scales == 0, FP8_ZERO_SCALE, scales)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor, group: int = NVFP4_GROUP) -> torch.Tensor:
    """x on the NVFP4 grid (FP4 elements, FP8 scale per `group` of the last dim, `global_scale`), in x's dtype."""
    blocks = grouped(x.float(), group)  # (..., groups, group)
    scales = nvfp4_block_scales(blocks.abs().amax(dim=-1, keepdim=True), global_scale)
    element_scale = scales / global_scale.float()
    return (round_to_fp4_e2m1(blocks / element_scale) * element_scale).flatten(-2).to(x.dtype)


def fake_quantize_mxfp4(x: torch.Tensor, group: int = MXFP4_GROUP) -> torch.Tensor:
    """x on the MXFP4 grid (FP4 elements, E8M0 scale per `group` of the last dim), in x's dtype."""
    blocks = grouped(x.float(), group)  # (..., groups, group)
    scales = e8m0_scale(blocks.abs().amax(dim=-1, keepdim=True))
    return (round_to_fp4_e2m1(blocks / scales) * scales).flatten(-2).to(x.dtype)
