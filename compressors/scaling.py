"""Per-input-channel rescaling that leaves a model's function unchanged: shared by AWQ and SmoothQuant.

Both methods pick a positive scale `s` per input channel of a group of linears that read the same tensor,
divide the producer of that tensor by `s` and multiply the consumers' input columns by `s`:

    previous(x) / s  ->  W * s     (W @ (y / s) * s == W @ y, exactly, before any quantization)

The producer is a norm (divide its weight and bias) or a linear (divide its output rows and bias). A linear
producer only works when nothing nonlinear sits in between, or the nonlinearity is positively homogeneous
(OPT's ReLU) or a product with an unscaled branch (Llama's `act(gate) * up`).

Which module feeds which is a per-architecture table (`LAYOUTS`), not discovered from the graph: discovery
cannot tell an exact fold from a wrong one (Gemma's norm multiplies by `1 + weight`; OPT-350m normalises
*after* attention). GPT-2 is handled only for its norms (ln_1 -> c_attn, ln_2 -> c_fc): its fused c_attn
cannot have just the value rows rescaled, and GELU between c_fc and c_proj is not homogeneous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.recipe.errors import UserError
from compress.quant.modules import is_linear, set_weight_matrix, weight_matrix

# (producer, consumers) pairs, relative to the decoder layer, in execution order.
Layout = tuple[tuple[str, tuple[str, ...]], ...]

LLAMA: Layout = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),  # dropped under GQA, where the shapes differ
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
OPT: Layout = (
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("final_layer_norm", ("fc1",)),
    ("fc1", ("fc2",)),  # ReLU(x / s) == ReLU(x) / s for s > 0
)
GPT2: Layout = (
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
)

LAYOUTS: dict[str, Layout] = {
    "LlamaDecoderLayer": LLAMA,
    "MistralDecoderLayer": LLAMA,
    "Qwen2DecoderLayer": LLAMA,
    "Qwen3DecoderLayer": LLAMA,
    "OPTDecoderLayer": OPT,
    "GPT2Block": GPT2,
}


@dataclass(frozen=True)
class ScaleGroup:
    """`previous` (a norm or a linear) produces the single input that every module in `linears` reads."""

    previous: str  # fully qualified name
    linears: tuple[str, ...]  # fully qualified names, in execution order
    after_norm: bool  # False when `previous` is a linear


def scale_groups(layer: nn.Module, prefix: str) -> list[ScaleGroup]:
    """The groups of `layer` whose scales can be folded exactly; raises UserError for an unknown architecture."""
    kind = type(layer).__name__
    if kind not in LAYOUTS:
        raise UserError(
            f"no scale-folding layout for decoder layer {kind}; supported: {', '.join(sorted(LAYOUTS))}. "
            "Add its (norm -> linears) table to compressors/scaling.py, or use rtn/gptq instead."
        )
    groups = []
    for previous, linears in LAYOUTS[kind]:
        if _foldable(layer, previous, linears):
            groups.append(ScaleGroup(f"{prefix}.{previous}", tuple(f"{prefix}.{n}" for n in linears),
                                     after_norm=not is_linear(layer.get_submodule(previous))))
    return groups


def unquantized_groups(groups: list[ScaleGroup], run: RunContext, pass_name: str) -> list[ScaleGroup]:
    """Drop groups touching a module an earlier pass already quantized: rescaling would break its codes.

    Each dropped group is recorded in `run.results.fallbacks`; scaling passes belong before quantization passes.
    """
    kept = []
    for group in groups:
        done = [name for name in (group.previous, *group.linears) if name in run.results.records]
        if done:
            run.results.fallbacks.append({"pass": pass_name, "module": done[0], "fallback": "not rescaled",
                                  "reason": "already quantized by an earlier pass; put scaling passes first"})
        else:
            kept.append(group)
    return kept


def _foldable(layer: nn.Module, previous: str, linears: tuple[str, ...]) -> bool:
    modules = dict(layer.named_modules())
    if previous not in modules or any(name not in modules for name in linears):
        return False
    producer = modules[previous]
    if is_linear(producer):
        # GQA: v_proj has fewer output rows than o_proj has input columns, so no 1:1 channel map exists.
        return all(weight_matrix(producer).shape[0] == weight_matrix(modules[n]).shape[1] for n in linears)
    # OPT-350m applies this norm after attention, so it does not produce the projections' input.
    return getattr(layer, "do_layer_norm_before", True)


def module_at(layer: nn.Module, prefix: str, fqn: str) -> nn.Module:
    """The submodule of `layer` (whose own name is `prefix`) called `fqn`."""
    return layer.get_submodule(fqn[len(prefix) + 1 :])


@torch.no_grad()
def fold_scales(previous: nn.Module, consumers: list[nn.Module], scales: torch.Tensor) -> None:
    """Divide `previous`'s output channels by `scales` (in_features,) and multiply the consumers' columns by it."""
    scales = scales.float()
    if is_linear(previous):
        w = weight_matrix(previous).float()  # (out, in): one scale per output row
        set_weight_matrix(previous, w / scales.to(w.device)[:, None])
    else:
        gain = cast(torch.Tensor, previous.weight).data  # a norm's per-channel weight
        gain.copy_(gain.float() / scales.to(gain.device))
    bias = getattr(previous, "bias", None)
    if bias is not None:
        bias.data.copy_(bias.data.float() / scales.to(bias.device))
    for module in consumers:
        w = weight_matrix(module).float()  # (out, in): one scale per input column
        set_weight_matrix(module, w * scales.to(w.device)[None, :])
