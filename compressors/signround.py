"""SignRound: learnable rounding and clipping of a whole decoder layer at once (Cheng et al. 2023, "Optimize Weight
Rounding via Signed Gradient Descent for the Quantization of LLMs", arXiv:2309.05516; the AutoRound library).

For every linear of a decoder layer the quantized weight is

    q(W) = s * (clamp(round(W / s + V) + z, qmin, qmax) - z),   s, z from the group's range shrunk by α (max), β (min)

with V in [-0.5, 0.5] per weight (which way each weight rounds) and α, β in [0.5, 1] per group (how much of the
range the grid covers). All of a layer's V, α, β are tuned together by signed gradient descent (step lr * sign(grad),
lr decaying linearly to 0, rounding passed straight through) to minimise the mean squared error between the
quantized layer's output and the full-precision layer's output on the calibration windows, both computed from the
same inputs (the outputs of the already-quantized layers before it, as AutoRound does). The iterate with the lowest
mini-batch loss is kept; step 0 is plain RTN, so the kept one is never worse than RTN on the batch it was scored on.
The result is an ordinary `UniformAffine` record (integer codes, group scales, integer zero points).

`learned_fake_quantize` is the pure, differentiable heart; `tune_layer` the optimisation; `run_signround` the thin
pass on the decoder-layer engine (so offload, checkpoints and --resume hold it like GPTQ).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from compress.engine.activations import ActivationStore, LayerInput
from compress.engine.layer_sweep import LayerContext
from compress.quant.gguf_records import GGUFBlocks, GGUFGrid, GGUFSpec, gguf_grid, gguf_record, round_codes
from compress.quant.modules import weight_matrix
from compress.quant.primitives import QuantSpec, codes_dtype
from compress.quant.records import UniformAffine
from compress.compressors.activation_scales import install_activations
from compress.compressors.base import integer_spec_for, keep_pruned_zeros, write_back
from compress.compressors.configs import SignRoundConfig  # noqa: F401  (re-exported; defined without torch)

OFFSET_RANGE = 0.5  # |V| <= 0.5: a weight may round to either neighbour of its grid point, never further
RANGE_SCALE_BOUNDS = (0.5, 1.0)  # α, β: the grid covers between half and all of the group's range, as AutoRound


# ---------------------------------------------------------------------------------------------------
# The kernel: a differentiable fake quantization with learnable offsets and range


RoundingSpec = QuantSpec | GGUFSpec  # a uniform integer grid, or a GGUF type's two-level one


@dataclass
class Rounding:
    """The learnable parameters of one weight matrix (rows, columns) with `groups` groups per row; on a GGUF type,
    the offsets only, over the type's grid fixed beforehand (`gguf`: its d / sc / dmin / m, not learned)."""

    offsets: torch.Tensor  # V (rows, columns)
    max_scale: torch.Tensor  # α (rows, groups)
    min_scale: torch.Tensor  # β (rows, groups); unused (and untouched) when symmetric
    gguf: GGUFGrid | None = None

    @classmethod
    def neutral(cls, weight: torch.Tensor, spec: RoundingSpec) -> "Rounding":
        """V = 0, α = β = 1: exactly round-to-nearest with the full range (on a GGUF type: RTN's grid and codes)."""
        rows, columns = weight.shape
        offsets = torch.zeros(rows, columns, device=weight.device)
        if isinstance(spec, GGUFSpec):
            none = torch.ones(rows, 0, device=weight.device)
            return cls(offsets, none, none.clone(), gguf_grid(weight, spec))
        groups = math.ceil(columns / (spec.group_size or columns))
        return cls(offsets, torch.ones(rows, groups, device=weight.device), torch.ones(rows, groups, device=weight.device))

    def tensors(self, spec: RoundingSpec) -> list[torch.Tensor]:
        if isinstance(spec, GGUFSpec):
            return [self.offsets]
        return [self.offsets, self.max_scale] + ([] if spec.symmetric else [self.min_scale])

    def detached_copy(self) -> "Rounding":
        return Rounding(self.offsets.detach().clone(), self.max_scale.detach().clone(), self.min_scale.detach().clone(),
                        self.gguf)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _grouped(w: torch.Tensor, size: int) -> torch.Tensor:
    """(rows, columns) -> (rows, groups, size), a short last group padded with zeros.

    Zero padding changes no group's range: the range always contains 0 (compress/quant/primitives.py).
    """
    rows, columns = w.shape
    pad = -columns % size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, -1, size)


def _scale_and_zero(wg: torch.Tensor, rounding: Rounding, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point (rows, groups, 1) of grouped weights, the range shrunk by α (and β)."""
    if spec.symmetric:
        wmin = None
        scale = wg.abs().amax(dim=-1) * rounding.max_scale / ((spec.qmax - spec.qmin) / 2)
    else:
        wmax = wg.amax(dim=-1).clamp(min=0) * rounding.max_scale
        wmin = wg.amin(dim=-1).clamp(max=0) * rounding.min_scale
        scale = (wmax - wmin) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    # the zero point in [0, qmax] (the range holds 0), rounded straight-through
    zero = torch.zeros_like(scale) if wmin is None else _round_ste(-wmin / scale)
    return scale.unsqueeze(-1), zero.unsqueeze(-1)


def _gguf_codes(weight: torch.Tensor, rounding: Rounding, spec: GGUFSpec,
                round_: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (with `round_`), step and bias of `weight` on its fixed GGUF grid, offsets added before rounding."""
    assert rounding.gguf is not None
    step, bias = rounding.gguf.step_and_bias(spec.gguf)
    return round_codes(weight, step, bias, spec.gguf, rounding.offsets, round_), step, bias


def learned_fake_quantize(weight: torch.Tensor, rounding: Rounding, spec: RoundingSpec) -> torch.Tensor:
    """q(W) of the module docstring for `weight` (rows, columns) float32; differentiable in `rounding`."""
    if isinstance(spec, GGUFSpec):
        codes, step, bias = _gguf_codes(weight, rounding, spec, _round_ste)
        return step * codes - bias
    rows, columns = weight.shape
    size = spec.group_size or columns
    wg = _grouped(weight, size)  # (rows, groups, size)
    scale, zero = _scale_and_zero(wg, rounding, spec)
    codes = torch.clamp(_round_ste(wg / scale + _grouped(rounding.offsets, size)) + zero, spec.qmin, spec.qmax)
    return ((codes - zero) * scale).reshape(rows, -1)[:, :columns]


@torch.no_grad()
def learned_record(weight: torch.Tensor, rounding: Rounding, spec: RoundingSpec) -> UniformAffine | GGUFBlocks:
    """The integer record `learned_fake_quantize` computes with: its dequantization is that fake-quantized matrix."""
    if isinstance(spec, GGUFSpec):
        assert rounding.gguf is not None
        return gguf_record(_gguf_codes(weight.float(), rounding, spec, torch.round)[0], rounding.gguf, spec)
    rows, columns = weight.shape
    size = spec.group_size or columns
    wg = _grouped(weight.float(), size)
    scale, zero = _scale_and_zero(wg, rounding, spec)
    codes = torch.clamp(torch.round(wg / scale + _grouped(rounding.offsets, size)) + zero, spec.qmin, spec.qmax)
    codes = codes.reshape(rows, -1)[:, :columns]
    return UniformAffine(codes.to(codes_dtype(spec)), scale.squeeze(-1), zero.squeeze(-1), spec)


# ---------------------------------------------------------------------------------------------------
# The optimisation of one layer


@dataclass(frozen=True)
class TuneResult:
    """What `tune_layer` kept: each matrix's best rounding, and the mini-batch losses at step 0 (RTN) and of it."""

    roundings: dict[str, Rounding]
    rtn_loss: float
    best_loss: float
    best_step: int


LayerLoss = Callable[[dict[str, torch.Tensor], int], torch.Tensor]  # (quantized weights, step) -> scalar loss


def tune_layer(weights: dict[str, torch.Tensor], specs: dict[str, RoundingSpec], loss_of: LayerLoss, *, iters: int,
               lr: float) -> TuneResult:
    """Signed gradient descent on every matrix's `Rounding` at once (see the module docstring).

    weights: name -> (rows, columns) float32, constant; specs: name -> its grid; loss_of(fake-quantized weights by
    name, step) is the layer's output error on that step's mini-batch. Returns the lowest-loss iterate.
    """
    device = next(iter(weights.values())).device
    roundings = {name: Rounding.neutral(w.to(device), specs[name]) for name, w in weights.items()}
    params = [t for name, r in roundings.items() for t in r.tensors(specs[name])]
    offsets = [r.offsets for r in roundings.values()]
    ranges = [t for name, r in roundings.items() for t in r.tensors(specs[name])[1:]]
    for p in params:
        p.requires_grad_(True)
    # RTN is the fallback should no step score a finite loss
    best, best_loss, best_step, rtn_loss = {n: r.detached_copy() for n, r in roundings.items()}, math.inf, 0, math.nan
    for step in range(iters + 1):  # the last round only scores the final iterate
        quantized = {name: learned_fake_quantize(w, roundings[name], specs[name]) for name, w in weights.items()}
        loss = loss_of(quantized, step)
        value = loss.item()
        if step == 0:
            rtn_loss = value
        if value < best_loss:  # False for NaN: a diverged iterate is never kept
            best, best_loss, best_step = {n: r.detached_copy() for n, r in roundings.items()}, value, step
        if step == iters:
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():  # AutoRound's SignSGD with a linear decay to 0
            torch._foreach_add_(params, torch._foreach_sign(grads), alpha=-lr * (1 - step / iters))
            torch._foreach_clamp_min_(offsets, -OFFSET_RANGE)
            torch._foreach_clamp_max_(offsets, OFFSET_RANGE)
            if ranges:
                torch._foreach_clamp_min_(ranges, RANGE_SCALE_BOUNDS[0])
                torch._foreach_clamp_max_(ranges, RANGE_SCALE_BOUNDS[1])
    return TuneResult(best, rtn_loss, best_loss, best_step)


# ---------------------------------------------------------------------------------------------------
# Calibration mini-batches


class Windows:
    """The calibration windows of one layer as single rows: their inputs and the full-precision layer's outputs.

    Windows of one sweep have the same length and no padding, so every window's keyword arguments (causal mask,
    rotary tables) are those of the first one: a mini-batch takes row 0's, expanded to its size.
    """

    def __init__(self, inputs: list[LayerInput], targets: ActivationStore):
        self.inputs = inputs
        self.targets = targets  # per calibration batch: (batch, seq_len, hidden) float32
        self.where = [(item, row) for item, batch in enumerate(inputs) for row in range(batch.shape[0])]

    def __len__(self) -> int:
        return len(self.where)

    def batch(self, picks: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(inputs, targets, kwargs) of the windows `picks`, float32 on `device`."""
        by_item: dict[int, list[int]] = {}
        for pick in picks:
            item, row = self.where[pick]
            by_item.setdefault(item, []).append(row)
        hidden = torch.cat([self.inputs[item].hidden[rows] for item, rows in by_item.items()])
        target = torch.cat([self.targets[item][rows] for item, rows in by_item.items()])
        kwargs = _rows_like(self.inputs[0].kwargs, len(picks))
        return hidden.to(device, torch.float32), target.to(device), kwargs


def _rows_like(kwargs: dict[str, Any], count: int) -> dict[str, Any]:
    """Layer kwargs for `count` windows: row 0 of per-window tensors expanded, float ones in float32."""
    def fit(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(fit(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() >= 2 and value.shape[0] > 1:
            value = value[:1]
        if value.dim() >= 2 and value.shape[0] == 1 and count > 1:
            value = value.expand(count, *value.shape[1:])
        return value.float() if value.is_floating_point() else value

    return {key: fit(value) for key, value in kwargs.items()}


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# ---------------------------------------------------------------------------------------------------
# The pass


def run_signround(layer: LayerContext, cfg: SignRoundConfig) -> dict[str, Any]:
    """SignRound: tune the rounding and clipping of all the layer's linears against its full-precision output."""
    modules = layer.linears(cfg.ignore)
    if not modules:
        return {}
    specs = {fqn: integer_spec_for(fqn, module, cfg, layer.run, "signround") for fqn, module in modules.items()}
    masks = {fqn: layer.run.handoff.masks.get(fqn) for fqn in modules}
    weights = {fqn: _kept(weight_matrix(module).float(), masks[fqn]) for fqn, module in modules.items()}
    with _frozen_float32(layer.layer) as work:
        result = tune_layer(weights, specs, _output_error(layer, work, modules, masks, cfg), iters=cfg.iters,
                            lr=cfg.step_size)
    results = {}
    for fqn, module in modules.items():
        record = keep_pruned_zeros(learned_record(weights[fqn], result.roundings[fqn], specs[fqn]), masks[fqn])
        results[fqn] = write_back(fqn, module, record, layer.run)
    # the layer's own loss beside each of its modules (they are tuned jointly): RTN's at step 0 and the kept one's
    summary = {"signround_rtn_loss": _rounded(result.rtn_loss), "signround_loss": _rounded(result.best_loss),
               "signround_best_step": result.best_step}
    install_activations(layer, modules, cfg.activations)  # after the rounding, as rtn: static scales see the result
    return {fqn: {**entry, **summary} for fqn, entry in results.items()}


def _output_error(layer: LayerContext, work: nn.Module, modules: dict[str, nn.Module],
                  masks: dict[str, torch.Tensor | None], cfg: SignRoundConfig) -> LayerLoss:
    """The loss `tune_layer` minimises: MSE of `work`'s output with the given weights against its full-precision
    output, on `cfg.batch_size` windows drawn for each step from a generator seeded by (seed, layer index)."""
    device = weight_matrix(next(iter(modules.values()))).device
    inputs = layer.calibration_inputs()
    windows = Windows(inputs, _full_precision_outputs(work, inputs, layer.new_store(), device))
    generator = torch.Generator().manual_seed(_layer_seed(cfg.seed, layer.index))
    draws = [torch.randperm(len(windows), generator=generator)[: cfg.batch_size].tolist() for _ in range(cfg.iters + 1)]
    names = {fqn: f"{fqn[len(layer.prefix) + 1:]}.weight" for fqn in modules}  # as functional_call names them
    transposed = {fqn for fqn, module in modules.items() if not isinstance(module, nn.Linear)}  # GPT-2's Conv1D

    def loss_of(quantized: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        hidden, target, kwargs = windows.batch(draws[step], device)
        params = {}
        for fqn, w in quantized.items():
            mask = masks[fqn]
            w = w if mask is None else w * mask.to(w.device)  # pruned weights stay 0, as in the record
            params[names[fqn]] = w.t() if fqn in transposed else w
        output = _first(functional_call(work, params, (hidden,), kwargs))
        return torch.nn.functional.mse_loss(output, target)

    return loss_of


@contextlib.contextmanager
def _frozen_float32(module: nn.Module) -> Iterator[nn.Module]:
    """The layer to tune through: itself when float32 (its parameters' requires_grad off meanwhile, so autograd
    builds no graph for the norms), else a float32 copy: the signs of tiny gradients decide the rounding."""
    work = module if all(p.dtype == torch.float32 for p in module.parameters()) else copy.deepcopy(module).float()
    flags = [(p, p.requires_grad) for p in work.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield work
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def _full_precision_outputs(work: nn.Module, inputs: list[LayerInput], store: ActivationStore,
                            device: torch.device) -> ActivationStore:
    """The unquantized layer's output (float32) for each calibration batch, computed once before tuning and kept
    where the calibration inputs are (device, host memory or disk: `calibration.offload`)."""
    for item in inputs:
        store.append(_first(work(item.hidden.to(device, torch.float32), **_rows_like(item.kwargs, item.shape[0]))).float())
    return store


def _kept(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The weights an earlier pruning pass kept (pruned ones 0), float32, detached from the module."""
    return weight.detach().clone() if mask is None else weight.detach() * mask.to(weight.device)


def _layer_seed(seed: int, index: int) -> int:
    """One seed per layer from the recipe's: a resumed run draws layer i's mini-batches exactly as a whole run."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def _rounded(value: float) -> float | None:
    return round(value, 8) if math.isfinite(value) else None
