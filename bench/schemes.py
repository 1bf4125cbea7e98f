"""The schemes compared in the benchmark: the same quantization written as our recipe and as llm-compressor modifiers.

Settings are matched where both tools expose them: symmetric int weights, groups of 128 input columns, lm_head left
in full precision, GPTQ with dampening_frac 0.01, block_size 128 and no activation ordering (llm-compressor's default
is `actorder: static`; ours is off, so we turn the peer's off), AWQ with a 20-point grid, SmoothQuant alpha 0.5.
Where the tools differ by design, the peer keeps its defaults and the difference is listed in `NOTES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

GROUP_SIZE = 128
DAMPENING_FRAC = 0.01
BLOCK_SIZE = 128
AWQ_GRID = 20
SMOOTHING_ALPHA = 0.5


@dataclass(frozen=True)
class Scheme:
    """One row of the table.

    ours: the `passes:` list of our recipe, as YAML flow text.
    peer: builds the llm-compressor recipe (a list of modifiers); called only when llmcompressor imports.
    calibrated: whether both tools get the calibration windows (RTN is data-free in both).
    """

    key: str
    title: str
    ours: str
    peer: Callable[[], list[Any]]
    calibrated: bool


def _weight_group(bits: int) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _peer_rtn(bits: int) -> Callable[[], list[Any]]:
    def build() -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=_weight_group(bits), ignore=["lm_head"])]

    return build


def _peer_gptq(bits: int) -> Callable[[], list[Any]]:
    def build() -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=_weight_group(bits), ignore=["lm_head"], actorder=None,
                             dampening_frac=DAMPENING_FRAC, block_size=BLOCK_SIZE)]

    return build


def _peer_awq(bits: int) -> Callable[[], list[Any]]:
    def build() -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQ is a transform in llm-compressor 0.14: it searches and folds the scales, QuantizationModifier rounds.
        return [AWQModifier(n_grid=AWQ_GRID),
                QuantizationModifier(config_groups=_weight_group(bits), ignore=["lm_head"])]

    return build


def _peer_smoothquant_w8a8() -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    # The peer's own W8A8 example: int8 per-channel weights, dynamic int8 per-token activations.
    return [SmoothQuantModifier(smoothing_strength=SMOOTHING_ALPHA),
            GPTQModifier(scheme="W8A8", ignore=["lm_head"], actorder=None,
                         dampening_frac=DAMPENING_FRAC, block_size=BLOCK_SIZE)]


GPTQ_TRUE_SEQUENTIAL = f", damp: {DAMPENING_FRAC}, block_size: {BLOCK_SIZE}, true_sequential: true"
GPTQ_MATCHED = f", damp: {DAMPENING_FRAC}, block_size: {BLOCK_SIZE}, true_sequential: false"


def _ours_weights(method: str, bits: int, extra: str = "") -> str:
    return f"[{{{method}: {{bits: {bits}, group_size: {GROUP_SIZE}, symmetric: true{extra}}}}}]"


SCHEMES: dict[str, Scheme] = {
    s.key: s
    for s in [
        Scheme("rtn-w4", "RTN W4 g128", _ours_weights("rtn", 4), _peer_rtn(4), calibrated=False),
        Scheme("rtn-w3", "RTN W3 g128", _ours_weights("rtn", 3), _peer_rtn(3), calibrated=False),
        # Matched: one Hessian-collecting forward per decoder layer, as the peer does.
        Scheme("gptq-w4", "GPTQ W4 g128", _ours_weights("gptq", 4, GPTQ_MATCHED), _peer_gptq(4), calibrated=True),
        Scheme("gptq-w3", "GPTQ W3 g128", _ours_weights("gptq", 3, GPTQ_MATCHED), _peer_gptq(3), calibrated=True),
        # Our default, true-sequential, against the same peer run.
        Scheme("gptq-w4-ts", "GPTQ W4 g128, ours true-sequential", _ours_weights("gptq", 4, GPTQ_TRUE_SEQUENTIAL),
               _peer_gptq(4), calibrated=True),
        Scheme("gptq-w3-ts", "GPTQ W3 g128, ours true-sequential", _ours_weights("gptq", 3, GPTQ_TRUE_SEQUENTIAL),
               _peer_gptq(3), calibrated=True),
        Scheme("awq-w4", "AWQ W4 g128", _ours_weights("awq", 4, f", grid: {AWQ_GRID}"), _peer_awq(4), calibrated=True),
        Scheme(
            "sq-w8a8",
            "SmoothQuant + W8A8",
            f"[{{smoothquant: {{alpha: {SMOOTHING_ALPHA}}}}}, "
            f"{{gptq: {{bits: 8, group_size: null, damp: {DAMPENING_FRAC}, true_sequential: false, "
            f"activations: {{bits: 8, per: token}}}}}}]",
            _peer_smoothquant_w8a8,
            calibrated=True,
        ),
    ]
}

NOTES = [
    "GPTQ groups: ours computes a group's scale when the solve reaches it, from the error-updated weights (the "
    "reference code's behaviour); llm-compressor computes every group's scale up front from the original weights.",
    "GPTQ order within a decoder layer: llm-compressor collects every Hessian of a decoder layer in one forward "
    "pass, and so do our plain GPTQ rows (`true_sequential: false`); the rows marked true-sequential run our "
    "default, which quantizes [q,k,v], o, [gate,up], down in turn and re-captures inputs after each.",
    "AWQ: the peer keeps its default `duo_scaling: true` (scales from activations and weights) and does no range "
    "clipping; ours scales from activations only (the paper's s = mean|x|^alpha) and searches a per-group clip.",
    "SmoothQuant + W8A8: both smooth with alpha 0.5, then GPTQ int8 per-channel weights and dynamic symmetric "
    "int8 per-token activations.",
]
