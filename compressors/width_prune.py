"""Width pruning: remove attention heads (whole KV groups for GQA models) and MLP intermediate channels, so the
weight matrices really shrink and the config's sizes change (in the spirit of FLAP, An et al. 2024,
arXiv:2312.11983, and CFSP: activation statistics times weight norms decide what goes).

Importance of input channel j of o_proj / down_proj (the only places where a head's or channel's output enters
the residual stream):
- `fluctuation` (FLAP's WIFV): Var_tokens(X_j) * ||W[:, j]||^2, how much the channel's contribution *varies*;
  a steady contribution can be replaced by a bias (see `compensate`).
- `magnitude`: mean_tokens(X_j^2) * ||W[:, j]||^2, the channel's output energy (Wanda-sp).
A KV group's importance sums its channels over all query heads that share it.

compensate: FLAP's bias compensation: the removed channels' mean contribution W[:, removed] @ mean(X_removed) is
added as a bias of o_proj / down_proj. Llama-style configs express biases per block (`attention_bias`,
`mlp_bias`), so the other projections of that block get zero biases and the flag is turned on.

`channel_importance`, `group_importance` and `kept_indices` are the pure kernels; `run_width_prune` is the
model-scope pass: it prunes layer by layer inside the engine (each layer is measured on the outputs of the
already pruned layers before it), then rewrites the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.layer_sweep import LayerContext, SweepStep, run_sweep
from compress.recipe.errors import UserError
from compress.engine.model_io import ModelHandle
from compress.recipe.registry import StrictConfig
from compress.compressors.configs import Metric, WidthPruneConfig  # noqa: F401  (re-exported; defined without torch)


@dataclass
class ChannelStats:
    """Running per-channel sums of an input over calibration tokens, for mean and variance."""

    total: torch.Tensor  # (channels,)
    total_sq: torch.Tensor  # (channels,)
    tokens: int = 0

    @classmethod
    def empty(cls, channels: int, device: torch.device) -> "ChannelStats":
        return cls(torch.zeros(channels, dtype=torch.float64, device=device),
                   torch.zeros(channels, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()  # (tokens, channels)
        self.total += flat.sum(dim=0)
        self.total_sq += flat.pow(2).sum(dim=0)
        self.tokens += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.total_sq / max(self.tokens, 1)


def channel_importance(stats: ChannelStats, weight: torch.Tensor, metric: Metric) -> torch.Tensor:
    """(channels,) importance of each input channel of `weight` (out, channels)."""
    energy = stats.mean_sq - stats.mean.pow(2) if metric == "fluctuation" else stats.mean_sq
    return energy.clamp_min(0).float() * weight.detach().float().pow(2).sum(dim=0)


def group_importance(per_channel: torch.Tensor, head_dim: int, heads_per_group: int) -> torch.Tensor:
    """(groups,) summed importance of each KV group: `heads_per_group` consecutive query heads of `head_dim`."""
    return per_channel.reshape(-1, heads_per_group * head_dim).sum(dim=1)


def kept_indices(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` most important entries, in ascending order (the original layout is preserved)."""
    return torch.sort(torch.topk(importance, keep).indices).values


def shrink_linear(linear: nn.Linear, *, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None,
                  bias: bool | None = None) -> nn.Linear:
    """A new Linear holding only the given output rows / input columns (and a zero bias if `bias` adds one)."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    has_bias = linear.bias is not None if bias is None else bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if has_bias:
        old = linear.bias.data if linear.bias is not None else torch.zeros(linear.out_features, dtype=weight.dtype,
                                                                           device=weight.device)
        new.bias.data.copy_(old if rows is None else old[rows])
    return new


@dataclass(frozen=True)
class WidthPlan:
    """The per-layer sizes after pruning, the same for every layer."""

    head_dim: int
    heads_per_group: int
    groups: int
    keep_groups: int
    intermediate: int
    keep_intermediate: int


def plan_width(config: Any, cfg: WidthPruneConfig) -> WidthPlan:
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    keep_groups = _storable_groups(groups - int(round(cfg.attention_ratio * groups)), groups, heads // groups,
                                   config.hidden_size)
    intermediate = config.intermediate_size
    kept = intermediate - int(round(cfg.mlp_ratio * intermediate))
    if cfg.mlp_ratio > 0:
        kept = max(cfg.channel_multiple, int(round(kept / cfg.channel_multiple)) * cfg.channel_multiple)
    return WidthPlan(head_dim, heads // groups, groups, keep_groups, intermediate, min(kept, intermediate))


def _storable_groups(wanted: int, groups: int, heads_per_group: int, hidden_size: int) -> int:
    """The largest KV-group count <= `wanted` (at least the smallest storable one) whose head count divides hidden_size.

    transformers' Llama-family configs refuse to load when hidden_size % num_attention_heads != 0, even with an
    explicit head_dim, so 3 of 4 heads of a 256-wide model is not storable: we keep 2 (prune at least what was asked;
    the report shows the groups kept).
    """
    valid = [g for g in range(1, groups + 1) if hidden_size % (g * heads_per_group) == 0]
    at_most = [g for g in valid if g <= max(wanted, 1)]
    return max(at_most) if at_most else min(valid)


def _blocks(layer: nn.Module) -> tuple[Any, Any]:
    """The attention and MLP blocks, typed Any: their projections are attributes mypy cannot see."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
    if any(block is None or not all(isinstance(getattr(block, n, None), nn.Linear) for n in names)
           for block, names in needed):
        raise UserError(f"width_prune supports Llama-style layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); "
                        f"{type(layer).__name__} is not one")
    assert attn is not None and mlp is not None
    return attn, mlp


def _bias_compensation(stats: ChannelStats, weight: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """(out,) the removed channels' mean contribution, W[:, removed] @ mean(X_removed)."""
    return weight.double()[:, removed] @ stats.mean[removed]


def _prune_layer(layer: LayerContext, cfg: WidthPruneConfig, plan: WidthPlan) -> dict[str, Any]:
    attn, mlp = _blocks(layer.layer)
    watched: dict[str, nn.Module] = {"o_proj": attn.o_proj, "down_proj": mlp.down_proj}
    stats = {name: ChannelStats.empty(m.in_features, m.weight.device) for name, m in (
        ("o_proj", attn.o_proj), ("down_proj", mlp.down_proj))}
    layer.observe(watched, lambda name, x: stats[name].add(x))
    o_importance = channel_importance(stats["o_proj"], attn.o_proj.weight, cfg.metric)
    groups = kept_indices(group_importance(o_importance, plan.head_dim, plan.heads_per_group), plan.keep_groups)
    kv_rows = (groups[:, None] * plan.head_dim + torch.arange(plan.head_dim)).flatten()
    q_width = plan.heads_per_group * plan.head_dim
    q_rows = (groups[:, None] * q_width + torch.arange(q_width)).flatten()
    channels = kept_indices(channel_importance(stats["down_proj"], mlp.down_proj.weight, cfg.metric),
                            plan.keep_intermediate)
    o_bias = down_bias = None
    if cfg.compensate:
        o_bias = _removed_mean(stats["o_proj"], attn.o_proj, q_rows)
        down_bias = _removed_mean(stats["down_proj"], mlp.down_proj, channels)
    _shrink_attention(attn, q_rows, kv_rows, o_bias)
    _shrink_mlp(mlp, channels, down_bias)
    return {f"{layer.prefix}.self_attn": {"kv_groups_kept": plan.keep_groups, "kv_groups_removed":
                                          plan.groups - plan.keep_groups},
            f"{layer.prefix}.mlp": {"channels_kept": plan.keep_intermediate,
                                    "channels_removed": plan.intermediate - plan.keep_intermediate}}


def _removed_mean(stats: ChannelStats, linear: nn.Linear, kept: torch.Tensor) -> torch.Tensor | None:
    removed = torch.ones(linear.in_features, dtype=torch.bool)
    removed[kept] = False
    if not removed.any():
        return None
    return _bias_compensation(stats, linear.weight.data, removed.nonzero().flatten())


def _shrink_attention(attn: Any, q_rows: torch.Tensor, kv_rows: torch.Tensor,
                      compensation: torch.Tensor | None) -> None:
    bias = None if compensation is None else True
    attn.q_proj = shrink_linear(attn.q_proj, rows=q_rows, bias=bias)
    attn.k_proj = shrink_linear(attn.k_proj, rows=kv_rows, bias=bias)
    attn.v_proj = shrink_linear(attn.v_proj, rows=kv_rows, bias=bias)
    attn.o_proj = shrink_linear(attn.o_proj, columns=q_rows, bias=bias)
    if compensation is not None:
        attn.o_proj.bias.data += compensation.to(attn.o_proj.bias.dtype)


def _shrink_mlp(mlp: Any, channels: torch.Tensor, compensation: torch.Tensor | None) -> None:
    bias = None if compensation is None else True
    mlp.gate_proj = shrink_linear(mlp.gate_proj, rows=channels, bias=bias)
    mlp.up_proj = shrink_linear(mlp.up_proj, rows=channels, bias=bias)
    mlp.down_proj = shrink_linear(mlp.down_proj, columns=channels, bias=bias)
    if compensation is not None:
        mlp.down_proj.bias.data += compensation.to(mlp.down_proj.bias.dtype)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def _check_compensation(config: Any, cfg: WidthPruneConfig) -> None:
    missing = [flag for flag, ratio in (("attention_bias", cfg.attention_ratio), ("mlp_bias", cfg.mlp_ratio))
               if ratio > 0 and not hasattr(config, flag)]
    if cfg.compensate and missing:
        raise UserError(f"width_prune compensate: {config.model_type} configs have no {' / '.join(missing)} flag, so "
                        f"the compensating bias could not be saved; set compensate: false")


def run_width_prune(handle: ModelHandle, cfg: WidthPruneConfig, run: RunContext,
                    next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """Width pruning: remove attention heads (KV groups) and MLP channels by activation importance (FLAP)."""
    config: Any = handle.model.config
    _check_compensation(config, cfg)
    plan = plan_width(config, cfg)
    before = handle.parameter_count()

    def prune(layer: LayerContext, _cfg: Any) -> dict[str, Any]:
        return _prune_layer(layer, cfg, plan)

    sweep = run_sweep(handle, [SweepStep("width_prune", prune, cfg, True)], run)
    config.head_dim = plan.head_dim  # explicit: hidden_size / num_attention_heads no longer gives it
    config.num_key_value_heads = plan.keep_groups
    config.num_attention_heads = plan.keep_groups * plan.heads_per_group
    config.intermediate_size = plan.keep_intermediate
    if cfg.compensate:
        config.attention_bias = config.attention_bias or cfg.attention_ratio > 0
        config.mlp_bias = config.mlp_bias or cfg.mlp_ratio > 0
    results = sweep.modules["width_prune"]
    results["model"] = {"parameters_before": before, "parameters_after": handle.parameter_count()}
    return results
