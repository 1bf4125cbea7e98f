"""AWQ, activation-aware weight quantization (Lin et al., 2024), for weight-only low-bit quantization.

Weights that multiply large activations matter most. AWQ scales those input channels up before rounding
(so they lose less relative precision) and folds the inverse scale into the preceding norm or linear, so
the fp model is unchanged. Per group of linears sharing an input it grid-searches s = mean|x|^α for the α
with the smallest output error after quantization, then shrinks each weight group's range where clipping
lowers the output error, then rounds to nearest.

Both searches score a candidate by the mean squared change of the linears' outputs on the calibration
tokens. That is a quadratic form in the weight change, so it is computed from the input's Gram matrix
XᵀX / tokens (as GPTQ's Hessian) instead of re-running the tokens through every candidate: same numbers,
a cost per candidate that no longer grows with the number of tokens.

GPT-2 is scaled only at its norms (see compressors/scaling.py); its other linears get clipping and RTN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.engine.layer_sweep import LayerContext
from compress.quant.modules import matches, weight_matrix
from compress.quant.primitives import QuantSpec, compute_qparams, fake_quantize, group_bounds
from compress.quant.gguf_records import GGUFSpec, quantize_gguf_rtn
from compress.quant.records import WeightRecord, quantize_rtn
from compress.compressors.activation_scales import install_activations
from compress.compressors.base import integer_spec_for, keep_pruned_zeros, write_back
from compress.compressors.scaling import ScaleGroup, fold_scales, module_at, scale_groups, unquantized_groups
from compress.compressors.configs import AWQConfig  # noqa: F401  (re-exported; defined without torch)

# Query/key errors only show up through the softmax, not in their own outputs, so the reference skips them.
CLIP_SKIP = ("q_proj", "k_proj", "c_attn", "query_key_value")
# see AWQ reference `auto_clip_layer`: try shrinking the range by up to 50%
MAX_SHRINK = 0.5


@dataclass(frozen=True)
class ScaleSearch:
    scales: torch.Tensor  # (in_features,)
    alpha: float
    error: float  # output MSE of the group with these scales
    rtn_error: float  # output MSE at α = 0, i.e. plain RTN


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec | GGUFSpec) -> torch.Tensor:
    """The (out, in) weights a model quantized with `spec` by round-to-nearest computes with.

    Same numbers as `quantize_rtn(w, spec).dequantize()`, but all groups at once: the searches call this
    hundreds of times per layer. A GGUF type rounds on its own two-level grid (quantize_gguf_rtn).
    """
    if isinstance(spec, GGUFSpec):
        return quantize_gguf_rtn(w, spec).dequantize().to(w.device)
    size = spec.group_size or w.shape[1]
    if w.shape[1] % size:
        return quantize_rtn(w, spec).dequantize().to(w.device)
    groups = w.float().reshape(-1, size)  # (out * groups, size): one quantization group per row
    scale, zero = compute_qparams(groups, spec)
    return fake_quantize(groups, scale, zero, spec).reshape(w.shape)


def output_mse(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared output change, (out,), of a weight change delta (out, in) on inputs with Gram (in, in).

    With gram = XᵀX / tokens this equals ((X @ delta.T) ** 2).mean(dim=0), at a cost independent of the tokens.
    """
    return ((delta @ gram) * delta).sum(dim=1)


@torch.no_grad()
def awq_search_scales(gram: torch.Tensor, x_mean_abs: torch.Tensor, weights: list[torch.Tensor],
                      specs: list[QuantSpec | GGUFSpec | None], grid: int) -> ScaleSearch:
    """Per-input-channel scales for linears [(out_i, in)] sharing one input; a None spec keeps that linear fp.

    gram: XᵀX / tokens (in, in) of the shared input; x_mean_abs: mean |X| per channel (in,).
    """
    # see AWQ §3.2 Eq. 4-5, Lin et al. 2024: s = s_X^α, α* = argmin ||Q(W·diag(s))·(diag(s)^-1·X) - W·X||²
    W = torch.cat([w.float() for w in weights])  # (sum out_i, in)
    rows = [w.shape[0] for w in weights]
    scales, errors = [], []
    for step in range(grid):
        s = x_mean_abs.float().pow(step / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # the reference's normalisation: scales centred around 1
        W_q = torch.cat([w if spec is None else fake_quantize_weight(w * s, spec) / s
                         for w, spec in zip(W.split(rows), specs)])
        scales.append(s)
        errors.append(output_mse(W_q - W, gram).mean().item())
    best = min(range(grid), key=errors.__getitem__)
    return ScaleSearch(scales[best], best / grid, errors[best], rtn_error=errors[0])


@torch.no_grad()
def awq_search_clip(gram: torch.Tensor, w: torch.Tensor, spec: QuantSpec, grid: int) -> torch.Tensor:
    """Max |w| to keep per row and quantization group, (out, groups), minimising each group's output error.

    gram: XᵀX / tokens (in, in) of the linear's input.
    """
    # see AWQ reference `auto_clip_layer`: per (row, group), shrink the range, keep the best partial output
    W = w.float()
    limits = []
    for start, end in group_bounds(W.shape[1], spec):
        W_g, G_g = W[:, start:end], gram[start:end, start:end]  # (out, g), (g, g)
        W_max = W_g.abs().amax(dim=1, keepdim=True)  # (out, 1)
        best_err = torch.full((W.shape[0],), math.inf, device=W.device)
        best_max = W_max.squeeze(1).clone()
        for step in range(int(MAX_SHRINK * grid)):
            m = W_max * (1 - step / grid)
            W_c = W_g.clamp(-m, m)
            scale, zero = compute_qparams(W_c, spec)
            err = output_mse(fake_quantize(W_c, scale, zero, spec) - W_g, G_g)  # (out,)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, m.squeeze(1), best_max)
        limits.append(best_max)
    return torch.stack(limits, dim=1)


def clamp_groups(w: torch.Tensor, limits: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Clamp each (row, group) of w (out, in) to ±limits (out, groups)."""
    bounds = group_bounds(w.shape[1], spec)
    widths = torch.tensor([end - start for start, end in bounds], device=limits.device)
    per_column = limits.repeat_interleave(widths, dim=1)  # (out, in)
    return torch.maximum(torch.minimum(w.float(), per_column), -per_column)


@dataclass
class InputStats:
    mean_abs: torch.Tensor  # (in,) over every calibration token
    gram: torch.Tensor  # XᵀX / tokens (in, in) over at most max_tokens evenly strided tokens


def collect_inputs(layer: LayerContext, readers: dict[str, nn.Module], max_tokens: int) -> dict[str, InputStats]:
    """One calibration pass through the fp layer, summarising each reader module's input."""
    total = sum(item.shape[0] * item.shape[1] for item in layer.inputs or [])  # shapes only: no batch is read
    stride = max(1, math.ceil(total / max_tokens))
    abs_sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        kept = flat[::stride]
        abs_sums[name] = abs_sums.get(name, 0) + flat.abs().sum(dim=0)
        grams[name] = grams.get(name, 0) + kept.T @ kept
        counts[name] = counts.get(name, 0) + kept.shape[0]

    layer.observe(readers, observe)
    return {name: InputStats(abs_sums[name] / total, grams[name] / counts[name]) for name in readers}


def _search_and_fold(layer: LayerContext, cfg: AWQConfig, group: ScaleGroup, stats: InputStats,
                     quantized: dict[str, nn.Module]) -> dict[str, Any]:
    """Find this group's scales, fold them in, and return the search's report entry."""
    consumers = [module_at(layer.layer, layer.prefix, name) for name in group.linears]
    specs = [integer_spec_for(name, quantized[name], cfg, layer.run, "awq") if name in quantized else None
             for name in group.linears]
    search = awq_search_scales(stats.gram, stats.mean_abs, [weight_matrix(m) for m in consumers], specs, cfg.grid)
    fold_scales(module_at(layer.layer, layer.prefix, group.previous), consumers, search.scales)
    # The consumers now read X / s.
    stats.gram = stats.gram / torch.outer(search.scales, search.scales)
    return {"awq_alpha": search.alpha, "awq_output_mse": search.error, "rtn_output_mse": search.rtn_error}


def _quantize(layer: LayerContext, cfg: AWQConfig, fqn: str, module: nn.Module, gram: torch.Tensor | None) -> dict[str, Any]:
    """Clip (where the input is known and the module is not q/k), round to nearest, write back."""
    spec = integer_spec_for(fqn, module, cfg, layer.run, "awq")
    w = weight_matrix(module).float()
    entry: dict[str, Any] = {}
    record: WeightRecord
    if isinstance(spec, GGUFSpec):
        # A GGUF type's grid searches its own clipped range per sub-block; weighted by the input's second moments
        # (the Gram diagonal, as llama.cpp's importance matrix), that search takes the place of the clip search
        # (`clip: false`: unweighted).
        record = quantize_gguf_rtn(w, spec, torch.diagonal(gram) if cfg.clip and gram is not None else None)
    else:
        if cfg.clip and gram is not None and not any(matches(fqn, p) for p in CLIP_SKIP):
            limits = awq_search_clip(gram, w, spec, cfg.clip_grid)
            entry["clip_ratio_mean"] = round((limits / w_groups_absmax(w, spec)).mean().item(), 4)
            w = clamp_groups(w, limits, spec)
        record = quantize_rtn(w, spec)
    qweight = keep_pruned_zeros(record, layer.run.handoff.masks.get(fqn))
    entry.update(write_back(fqn, module, qweight, layer.run))
    return entry


def w_groups_absmax(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Max |w| per row and quantization group, (out, groups); 1 for an all-zero group (a ratio's denominator)."""
    absmax = torch.stack([w[:, s:e].abs().amax(dim=1) for s, e in group_bounds(w.shape[1], spec)], dim=1)
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax))


def run_awq(layer: LayerContext, cfg: AWQConfig) -> dict[str, Any]:
    """Activation-aware per-channel scaling (folded into norms/linears), range clipping, round-to-nearest."""
    quantized = layer.linears(cfg.ignore)
    groups = unquantized_groups(scale_groups(layer.layer, layer.prefix), layer.run, "awq")
    groups = [g for g in groups if any(n in quantized for n in g.linears)]
    grouped = {name for g in groups for name in g.linears}
    # Each group's input is recorded once, under its first reader; only clipping needs the others' inputs.
    readers = {g.linears[0]: module_at(layer.layer, layer.prefix, g.linears[0]) for g in groups}
    if cfg.quantize and cfg.clip:
        readers.update({fqn: m for fqn, m in quantized.items() if fqn not in grouped})
    stats = collect_inputs(layer, readers, cfg.max_tokens)

    results: dict[str, dict[str, Any]] = {}
    for group in groups:
        entry = _search_and_fold(layer, cfg, group, stats[group.linears[0]], quantized)
        results.update({name: dict(entry) for name in group.linears if name in quantized})
    if not cfg.quantize:
        return results
    gram_of = {name: stats[g.linears[0]].gram for g in groups for name in g.linears}
    gram_of.update({fqn: stats[fqn].gram for fqn in readers if fqn not in grouped})
    for fqn, module in quantized.items():
        results.setdefault(fqn, {}).update(_quantize(layer, cfg, fqn, module, gram_of.get(fqn)))
    install_activations(layer, quantized, cfg.activations)  # after every module is rounded (one calibration forward)
    return results
