"""How much the model suffers when a weight matrix is quantized to b bits: the costs the bit allocator minimises.

Four estimators, from most to least faithful:
- `hessian_trace` (HAWQ-V2, Dong et al. 2020): Tr(H) of the calibration loss w.r.t. each module's weight, by
  Hutchinson's method (E[v^T H v] = Tr(H) for Rademacher v; Hv by double backward). Cost of width b:
  Tr(H)/n * ||Q_b(W) - W||^2. Memory: only one decoder layer's weights require grad at a time, so autograd keeps
  the graph from that layer up and one layer's worth of Hessian-vector products, never the whole model's.
- `delta_loss` (Hubara et al. 2021, AdaQuant/CalibTIP): quantize one unit at a time to each width and measure the
  calibration-loss increase; the increases are assumed additive, as in the paper's integer program.
- `fisher`: diagonal empirical Fisher, the mean of squared per-window gradients (SqueezeLLM/GWQ style). Cost:
  sum F * (Q_b(W) - W)^2 / 2.
- `io_similarity`: 1 - cos(input, output) of each decoder layer, a data-light proxy for how much the layer
  changes its residual stream. Cost: that score * ||Q_b(W) - W||^2.

Q_b is round-to-nearest with the following quantizer's group size and symmetry. `hutchinson_trace` is the pure
kernel (a Hessian-vector product function in, traces out); the rest wires models and calibration windows to it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from compress.engine.threads import thread_independent_sum
from compress.engine.vocab_head import (
    DEFAULT_LOGIT_CHUNK_MB,
    next_token_scorer,
    output_head,
    rows_per_chunk,
    target_nll,
)
from compress.quant.modules import set_weight_matrix, weight_matrix
from compress.quant.float_records import WeightFormat, quantize_weight_rtn

HVP = Callable[[list[list[torch.Tensor]]], list[list[torch.Tensor]]]  # probes -> H v per probe, block by block


@dataclass(frozen=True)
class TraceEstimate:
    """Per-tensor Hessian traces from `probes` Rademacher probes; `converged` is False when max_probes stopped it."""

    traces: tuple[float, ...]
    probes: int
    converged: bool


def hutchinson_trace(
    hvp: HVP,
    shapes: Sequence[torch.Size],
    *,
    tol: float = 1e-2,
    max_probes: int = 64,
    min_probes: int = 4,
    probes_per_round: int = 4,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    """Tr of each diagonal block H_ii of a Hessian, given `hvp(probes) = [[H v]_i for each probe]`.

    One probe serves every block at once: v_i^T [Hv]_i is an unbiased estimate of Tr(H_ii). Probes come in rounds
    of `probes_per_round` so `hvp` can reuse one gradient graph for several; it stops when the running mean of
    every block changed by less than `tol` (relative) over a round, as PyHessian's `trace()` does per probe,
    and never before `min_probes` probes or after `max_probes`.
    """
    # see HAWQ-V2 Sec. 3.1 (Hutchinson's algorithm); Dong et al. 2020
    sums = [0.0] * len(shapes)
    means = [0.0] * len(shapes)
    probes = 0
    while probes < max_probes:
        count = min(probes_per_round, max_probes - probes)
        round_probes = [[_rademacher(shape, generator, device) for shape in shapes] for _ in range(count)]
        previous = list(means)
        for vs, hvs in zip(round_probes, hvp(round_probes)):
            for i, (v, hv) in enumerate(zip(vs, hvs)):
                sums[i] += thread_independent_sum(v * hv.to(v.dtype))  # a whole-tensor sum rounds by thread count
        probes += count
        means = [total / probes for total in sums]
        settled = all(abs(m - p) <= tol * (abs(m) + 1e-12) for m, p in zip(means, previous))
        if probes >= min_probes and probes > count and settled:
            return TraceEstimate(tuple(means), probes, True)
    return TraceEstimate(tuple(means), probes, False)


def _rademacher(shape: torch.Size, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    return torch.randint(0, 2, tuple(shape), generator=generator).to(device, torch.float32) * 2 - 1


def loss_hvp(losses: Sequence[Callable[[], torch.Tensor]], params: list[torch.Tensor]) -> HVP:
    """H v for the Hessian of sum_k losses[k]() w.r.t. `params`, by double backward (Pearlmutter's trick).

    Each loss is built and differentiated on its own, so only one batch's graph is alive at a time; its gradient
    graph is reused for every probe of the round (H v = d(grad)/d(params)^T v, H being symmetric).
    """
    def hvp(probes: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        totals = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in probes]
        for loss_fn in losses:
            grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
            for k, vs in enumerate(probes):
                hvs = torch.autograd.grad(grads, params, grad_outputs=[v.to(g.dtype) for g, v in zip(grads, vs)],
                                          retain_graph=k + 1 < len(probes))
                for acc, hv in zip(totals[k], hvs):
                    acc += hv.float()
        return totals

    return hvp


# ---------------------------------------------------------------------------------------------------
# The calibration loss and the model-level estimators


def next_token_loss(model: nn.Module, windows: torch.Tensor, *,
                    logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch of token windows (batch, seq_len).

    The head runs `logit_chunk_mb` MiB of logits at a time under activation checkpointing (vocab_head.target_nll),
    so neither forward nor a first-order backward holds (batch, seq_len, vocab) logits.
    """
    return summed_nll(model, windows, 0, windows.shape[1] - 1, logit_chunk_mb) / (windows[:, 1:].numel())


def summed_nll(model: nn.Module, windows: torch.Tensor, first: int, last: int, logit_chunk_mb: int) -> torch.Tensor:
    """Summed NLL of the tokens windows[:, first + 1 : last + 1], predicted from positions [first, last).

    Causal attention makes the prefix windows[:, :last] all the model needs to read for them.
    """
    head, body = next_token_scorer(model)
    hidden = body(windows[:, :last])[:, first:]  # (B, last - first, hidden)
    targets = windows[:, first + 1 : last + 1]
    chunk_rows = rows_per_chunk(head.vocab_size(), logit_chunk_mb)
    return target_nll(head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), chunk_rows=chunk_rows)


def calibration_losses(model: nn.Module, batches: Sequence[torch.Tensor], *,
                       logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB) -> list[Callable[[], torch.Tensor]]:
    """Closures whose values sum to the mean loss over all calibration windows, each within a logit budget.

    A Hessian-vector product keeps the softmax of every position it differentiates twice, so a closure covers only
    as many positions as `logit_chunk_mb` MiB of logits hold (a range of positions of one batch, read through its
    prefix); at a small vocabulary that is the whole batch, one closure per batch as before.
    """
    tokens = sum(b[:, 1:].numel() for b in batches)

    def loss_of(batch: torch.Tensor, first: int, last: int) -> Callable[[], torch.Tensor]:
        return lambda: summed_nll(model, batch, first, last, logit_chunk_mb) / tokens

    head = output_head(model)
    closures = []
    for batch in batches:
        predicted = batch.shape[1] - 1
        span = max(1, rows_per_chunk(head.vocab_size(), logit_chunk_mb) // batch.shape[0])  # positions per closure
        closures += [loss_of(batch, first, min(first + span, predicted)) for first in range(0, predicted, span)]
    return closures


@contextlib.contextmanager
def grad_only_for(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Let autograd track just `params`: the graph then starts at the first module that uses one of them."""
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)


def hessian_traces(
    model: nn.Module,
    layer_modules: Sequence[dict[str, nn.Module]],
    batches: Sequence[torch.Tensor],
    *,
    tol: float,
    max_probes: int,
    seed: int,
    logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB,
) -> dict[str, TraceEstimate]:
    """Tr(H) of the calibration loss w.r.t. each module's weight, one decoder layer's modules at a time."""
    generator = torch.Generator().manual_seed(seed)
    estimates: dict[str, TraceEstimate] = {}
    for modules in layer_modules:
        params = _weights(modules)
        # Fused attention kernels (flash, memory-efficient) have no double backward; the math kernel does.
        with grad_only_for(model, params), sdpa_kernel(SDPBackend.MATH):
            hvp = loss_hvp(calibration_losses(model, batches, logit_chunk_mb=logit_chunk_mb), params)
            estimate = hutchinson_trace(hvp, [p.shape for p in params], tol=tol, max_probes=max_probes,
                                        generator=generator, device=params[0].device)
        for i, name in enumerate(modules):
            estimates[name] = TraceEstimate((estimate.traces[i],), estimate.probes, estimate.converged)
    return estimates


def fisher_diagonals(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor, *,
                     logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB) -> dict[str, torch.Tensor]:
    """Mean over calibration windows of the squared gradient of each window's loss, per weight, in (out, in) layout."""
    params = _weights(modules)
    sums = [torch.zeros_like(weight_matrix(m), dtype=torch.float32) for m in modules.values()]
    with grad_only_for(model, params):
        for window in windows.split(1):  # per-sample gradients: the Fisher is E[g g^T], not E[g] E[g]^T
            grads = torch.autograd.grad(next_token_loss(model, window, logit_chunk_mb=logit_chunk_mb), params)
            for acc, grad, module in zip(sums, grads, modules.values()):
                acc += _as_matrix(grad, module).float().pow(2)
    return {name: acc / windows.shape[0] for name, acc in zip(modules, sums)}


def _weights(modules: dict[str, nn.Module]) -> list[torch.Tensor]:
    return [cast(torch.Tensor, module.weight) for module in modules.values()]


def _as_matrix(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A gradient in the same (out, in) layout as `weight_matrix(module)` (GPT-2's Conv1D stores (in, out))."""
    return tensor if tensor.shape == weight_matrix(module).shape else tensor.t()


@torch.no_grad()
def io_dissimilarity(model: nn.Module, layers: Sequence[nn.Module], batches: Sequence[torch.Tensor]) -> list[float]:
    """1 - mean over tokens of cos(layer input, layer output), for each decoder layer."""
    sums = [0.0] * len(layers)
    tokens = 0

    def measure(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (B, T)
            sums[index] += thread_independent_sum(cos)
        return hook

    handles = [layer.register_forward_hook(measure(i), with_kwargs=True) for i, layer in enumerate(layers)]
    _, body = next_token_scorer(model)  # the head's (B, T, vocab) logits are not needed: only the last position runs
    try:
        for batch in batches:
            body(batch)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - s / tokens for s in sums]


def quantization_error(module: nn.Module, spec: WeightFormat) -> torch.Tensor:
    """(Q_b(W) - W) for round-to-nearest at `spec` (integer or element-float), in (out, in) layout, float32."""
    weight = weight_matrix(module).float()
    return quantize_weight_rtn(weight, spec).dequantize().to(weight.device) - weight


@torch.no_grad()
def loss_increases(
    model: nn.Module,
    units: dict[str, list[tuple[str, nn.Module]]],
    specs: Sequence[WeightFormat],
    batches: Sequence[torch.Tensor],
    logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB,
) -> dict[str, list[float]]:
    """Calibration-loss increase when only one unit is quantized (RTN at each spec), the others left in float."""
    baseline = _mean_loss(model, batches, logit_chunk_mb)
    increases: dict[str, list[float]] = {}
    for unit, modules in units.items():
        originals = [weight_matrix(m).clone() for _, m in modules]
        row = []
        for spec in specs:
            for (_, module), original in zip(modules, originals):
                set_weight_matrix(module, quantize_weight_rtn(original.float(), spec).dequantize().to(original.dtype))
            row.append(_mean_loss(model, batches, logit_chunk_mb) - baseline)
        for (_, module), original in zip(modules, originals):
            set_weight_matrix(module, original)
        increases[unit] = row
    return increases


def _mean_loss(model: nn.Module, batches: Sequence[torch.Tensor], logit_chunk_mb: int) -> float:
    total = sum(b.shape[0] for b in batches)
    value = sum(float(next_token_loss(model, b, logit_chunk_mb=logit_chunk_mb)) * b.shape[0] / total for b in batches)
    return value if math.isfinite(value) else float("inf")
