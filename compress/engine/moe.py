"""Mixture-of-experts models: every expert quantized, calibration tokens counted per expert, rare experts flagged.

transformers 5 stores a sparse MoE block's experts as two fused 3-D parameters (`gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I)) in Mixtral, Qwen2/Qwen3-MoE, DeepSeek-V3 and their relatives. Quantizers only touch
`nn.Linear`s, so those experts would be skipped silently. `unfuse_experts` swaps each such module for
`LinearExperts`: the same weights as one gate/up/down `nn.Linear` per expert and the same forward signature
(hidden_states, top_k_index, top_k_weights), so every pass, hook and report sees the experts like any MLP.
The per-expert modules carry the names of the family's own per-expert checkpoints (`mlp.experts.3.gate_proj`, Mixtral's
`mlp.experts.3.w1`): those are the names transformers' conversion mapping merges back into the fused parameters
when it loads a checkpoint, so an export written from these modules loads with plain `from_pretrained`.

Routing: a top-k router sends each token to a few experts, so on a small calibration set a rarely chosen expert
sees few tokens (or none), and its Hessian is poor (or zero). `route_all=True` feeds every token to every
expert's linears during calibration while still combining only the routed outputs, so the layer's output, and
what later layers are calibrated on, does not change. Either way `calibrating` counts the routed tokens per
expert and the run report lists them and flags experts under a threshold (see compress/app/runner.py).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, cast

import torch
from torch import nn

from compress.engine import distributed


# (gate, up, down) names of one expert's projections in a family's per-expert checkpoints; transformers merges
# `experts.*.<gate>.weight` and `experts.*.<up>.weight` into `gate_up_proj` and `experts.*.<down>.weight` into
# `down_proj` (transformers/conversion_mapping.py), so an export must write exactly these names.
CHECKPOINT_PROJECTIONS = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # Qwen2/Qwen3-MoE, DeepSeek-V3 and their relatives


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), as the fused implementation computes it."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module,
                 names: tuple[str, str, str] = DEFAULT_PROJECTIONS):
        super().__init__()
        self.projection_names = names
        for name, weight in zip(names, (gate, up, down)):
            self.add_module(name, _linear(weight))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.projection_names)
        return down(self.act_fn(gate(x)) * up(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return layer


class LinearExperts(nn.ModuleList):
    """Drop-in for a fused experts module, with one nn.Linear per projection per expert.

    A ModuleList of the experts itself (as transformers' own `SequentialLlama4TextExperts`), so expert 3's gate is
    `<block>.experts.3.gate_proj`, the name it has in the family's per-expert checkpoints.
    """

    def __init__(self, fused: nn.Module, names: tuple[str, str, str] = DEFAULT_PROJECTIONS):
        gate_up = cast(torch.Tensor, fused.gate_up_proj).data
        down = cast(torch.Tensor, fused.down_proj).data
        inner = gate_up.shape[1] // 2
        act_fn = fused.act_fn
        assert isinstance(act_fn, nn.Module)
        super().__init__(
            ExpertMLP(gate_up[e, :inner], gate_up[e, inner:], down[e], act_fn, names) for e in range(gate_up.shape[0])
        )
        self.num_experts: int = gate_up.shape[0]
        self.route_all = False  # calibration: every token reaches every expert's linears
        self.counter: ExpertCounter | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts + 1)[: self.num_experts]
        if self.counter is not None:
            self.counter.add(counts)
        for e, expert in enumerate(self):
            token_idx, position = torch.where(top_k_index == e)
            if self.route_all:
                out = expert(hidden_states)[token_idx]  # all tokens seen, only the routed ones kept
            elif token_idx.numel() == 0:
                continue
            else:
                out = expert(hidden_states[token_idx])
            out = out * top_k_weights[token_idx, position, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3 and down.dim() == 3 and isinstance(getattr(module, "act_fn", None), nn.Module)
        and not any(n.endswith("bias") for n, _ in module.named_parameters())
    )


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by `LinearExperts` (weights copied); returns how many were replaced."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = CHECKPOINT_PROJECTIONS.get(str(model_type), DEFAULT_PROJECTIONS)
    targets = [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, LinearExperts(module, names))
    return len(targets)


class ExpertCounter:
    """Routed tokens per expert over one pass through the calibration batches.

    The engine runs a layer on its batches several times (a one-row probe to find the sublayer groups, once per
    GPTQ group, then to propagate), and every full run routes the same tokens; the last run of a layer is
    always a full one, so the counts of the last `batches` calls are exactly one pass.
    """

    def __init__(self, batches: int):
        self.recent: deque[torch.Tensor] = deque(maxlen=batches)

    def add(self, counts: torch.Tensor) -> None:
        self.recent.append(counts.detach().cpu())

    @property
    def routed(self) -> torch.Tensor | None:
        return torch.stack(list(self.recent)).sum(0) if self.recent else None


@dataclass
class ExpertStats:
    modules: dict[str, LinearExperts] = field(default_factory=dict)
    counters: dict[str, ExpertCounter] = field(default_factory=dict)


@contextlib.contextmanager
def calibrating(model: nn.Module, *, route_all: bool, batches: int) -> Iterator[ExpertStats]:
    """Count routed tokens per expert (and route all tokens to all experts when asked) for the block's duration."""
    stats = ExpertStats({n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)})
    for name, module in stats.modules.items():
        stats.counters[name] = module.counter = ExpertCounter(batches)
        module.route_all = route_all
    try:
        yield stats
    finally:
        for module in stats.modules.values():
            module.counter = None
            module.route_all = False


def expert_report(stats: ExpertStats, *, route_all: bool, calibration_tokens: int, top_k: int | None,
                  min_tokens: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report section (tokens per expert) and one fallback entry per expert calibrated on too few tokens."""
    layers: dict[str, Any] = {}
    flagged: list[dict[str, Any]] = []
    for name, counter in stats.counters.items():
        if counter.routed is None:  # the layer never ran on calibration data (a data-free pass such as rtn)
            continue
        summed = counter.routed.to(torch.float64)
        distributed.all_reduce_sum(summed, 0)  # torchrun: every rank's share of the tokens
        routed = [int(c) for c in summed.tolist()]
        seen = [calibration_tokens] * len(routed) if route_all else routed
        under = [e for e, n in enumerate(seen) if n < min_tokens]
        layers[name] = {"routed_tokens": routed, "calibration_tokens": seen, "under_threshold": under}
        for e in under:
            flagged.append({"pass": "calibration", "module": f"{name}.{e}", "fallback": "few_tokens",
                            "reason": f"expert {e} was calibrated on {seen[e]} tokens (< min_expert_tokens={min_tokens}); "
                                      "set calibration.route_all_experts: true or add calibration samples"})
    section = {"route_all_experts": route_all, "min_expert_tokens": min_tokens, "top_k": top_k,
               "calibration_tokens": calibration_tokens, "layers": layers}
    return section, flagged
