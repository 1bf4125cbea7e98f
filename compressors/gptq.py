"""GPTQ: quantize a weight matrix column by column, folding each column's rounding error into the columns not yet
quantized, weighted by the inverse Hessian of the layer's reconstruction error (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", arXiv:2210.17323).

`gptq_quantize` is the pure tensor kernel (weight + Hessian in, codes out); `compressors.hessian` (shared with
SparseGPT) builds the Hessian from calibration inputs; `run_gptq` is the thin pass that wires both into the
decoder-layer engine.

Group quantization parameters, two honest choices:
- dynamic groups (default without act_order): a group's scale and zero point are computed when the algorithm
  reaches its first column, from the error-updated weights of the whole group, as in the reference code. Unlike
  the reference, the pending lazy block updates of group columns past the current block are included, so the
  result does not depend on `block_size`.
- static groups: every group's scale and zero point come from the original weights, up front, in the original
  column order. With `act_order` this is the only mode we allow with groups: the reference's act-order groups
  are contiguous in the *permuted* order, which `UniformAffine` (contiguous groups in the original order,
  no g_idx) cannot store, and which fast inference kernels do not like either.

Element-float formats (FP8, NVFP4, MXFP4; `gptq: {format: nvfp4}`): `gptq_quantize_float` fixes the format's own
scales from the original weights before the column loop, as llm-compressor does (NVFP4's global scale from the
whole tensor), then rounds column by column onto the FP8 / FP4 grid with the same error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.layer_sweep import LayerContext, input_groups
from compress.engine.threads import thread_independent_sum
from compress.recipe.errors import UserError
from compress.quant.modules import weight_matrix
from compress.quant.primitives import QuantSpec, codes_dtype, compute_qparams, dequantize_codes, group_bounds, quantize_codes
from compress.quant.float_records import (
    FloatSpec,
    check_columns,
    element_scales,
    float_scales,
    quantize_weight_rtn,
    record_from_values,
    round_to_grid,
)
from compress.quant.gguf_records import GGUFSpec, gguf_grid, gguf_record, round_codes
from compress.quant.lookup_records import LookupSpec, quantize_lookup
from compress.quant.records import UniformAffine, WeightRecord
from compress.compressors.activation_scales import install_activations
from compress.compressors.base import checked_spec, keep_pruned_zeros, write_back
from compress.compressors.hessian import (  # noqa: F401  (HessianAccumulator is re-exported: tests and the bench import it here)
    HessianAccumulator,
    HessianNotPositiveDefinite,
    HessianOptions,
    collect_hessians,
    inverse_hessian_factor,
    mark_dead_columns,
)
from compress.compressors.configs import GPTQConfig  # noqa: F401  (re-exported; defined without torch)


@dataclass(frozen=True)
class GPTQResult:
    """What `gptq_quantize` produced for one weight matrix.

    loss: the algorithm's own reconstruction-error estimate, sum over columns of (w - q)^2 / (2 [H^-1]_jj), the
    quantity the reference code prints as "error".
    dampening_frac_used: the dampening that made the Hessian factorizable (>= the one asked for).
    dead_columns: input features that were zero on every calibration token; their weights were set to 0.
    """

    qweight: WeightRecord  # UniformAffine from gptq_quantize, ElementFloat from gptq_quantize_float
    loss: float
    dampening_frac_used: float
    dead_columns: int


# ---------------------------------------------------------------------------------------------------
# The kernel


def working_copies(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The float32 weight (pruned entries zeroed) and Hessian the column loop may overwrite, and the keep mask on
    the weight's device (None without pruning)."""
    W = weight.detach().float().clone()
    H = hessian.detach().to(W.device, torch.float32, copy=True)
    keep = None if mask is None else mask.to(W.device, torch.bool)
    if keep is not None:
        W[~keep] = 0
    return W, H, keep


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize `weight` (rows, columns) with GPTQ given the layer Hessian `hessian` (columns, columns).

    act_order: quantize columns by descending Hessian diagonal (largest input energy first). With groups it
    requires `static_groups` (see the module docstring). mask: bool (rows, columns), True where a weight is
    kept; pruned weights stay exactly zero and never feed the error updates. Neither input is modified.

    Raises HessianNotPositiveDefinite when dampening cannot make the Hessian factorizable, and ValueError for
    act_order with dynamic groups.
    """
    if act_order and spec.group_size is not None and not static_groups:
        raise ValueError(
            "act_order with group quantization needs static_groups=true: groups formed in the permuted column "
            "order cannot be stored as contiguous groups of the original order"
        )
    W, H, keep = working_copies(weight, hessian, mask)
    dead = mark_dead_columns(W, H)
    # Per-channel qparams are static by nature: from the whole original row, as in the reference.
    static_qparams = _static_group_qparams(W, spec) if static_groups or spec.group_size is None else None

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    Hinv, damp_used = inverse_hessian_factor(H, dampening_frac)
    codes, scale, zero, loss = _quantize_columns(W, Hinv, spec, block_size, keep, perm, static_qparams)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qweight = UniformAffine(codes.to(codes_dtype(spec)), scale, zero, spec)
    return GPTQResult(qweight, loss, damp_used, dead)


def _static_group_qparams(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, groups) scales and zero points from the original weights, groups in the original column order."""
    pairs = [compute_qparams(W[:, start:end], spec) for start, end in group_bounds(W.shape[1], spec)]
    return torch.stack([s for s, _ in pairs], dim=1), torch.stack([z for _, z in pairs], dim=1)


def _quantize_columns(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    spec: QuantSpec,
    block_size: int,
    keep: torch.Tensor | None,
    perm: torch.Tensor | None,
    static_qparams: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ's lazy-batch loop over (possibly permuted) columns; W is overwritten.

    Returns codes (rows, columns) in loop order, scale/zero (rows, groups) in the original order, and the loss.
    Without `static_qparams`, a group's qparams are computed when the loop reaches its first column.
    """
    # see GPTQ Alg. 1 (lazy batch updates, Cholesky of H^-1); Frantar et al. 2022
    rows, columns = W.shape
    bounds = group_bounds(columns, spec)
    group_of = _group_of_column(columns, spec, perm)
    if static_qparams is not None:
        scale, zero = static_qparams
    else:
        scale = torch.empty(rows, len(bounds), device=W.device)
        zero = torch.empty_like(scale)
    Q = torch.empty_like(W)  # codes, float until the end
    row_loss = torch.zeros(rows, device=W.device)  # per row: a whole-matrix sum would round by thread count
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = group_of[j]
            if static_qparams is None and j == bounds[g][0]:
                current = _current_group(W, W1, Err1, Hinv, i1, i, bounds[g][1], keep)
                scale[:, g], zero[:, g] = compute_qparams(current, spec)
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i : i + 1] if keep is None else W1[:, i : i + 1] * keep[:, j : j + 1]  # (rows, 1)
            codes = quantize_codes(w, s, z, spec)
            Q[:, j : j + 1] = codes
            err = (w - dequantize_codes(codes, s, z)) / Hinv1[i, i]  # (rows, 1)
            W1[:, i:].addmm_(err, Hinv1[i : i + 1, i:], alpha=-1)
            Err1[:, i : i + 1] = err
        row_loss += Err1.pow(2).sum(dim=1) / 2
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return Q, scale, zero, thread_independent_sum(row_loss)


def gptq_quantize_float(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: FloatSpec,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ onto an element-float grid: `gptq_quantize` with the format's scales fixed before the column loop.

    The scales (and NVFP4's global scale) come from the original weights, pruned ones zeroed, exactly as RTN would
    choose them; the loop then only decides each weight's grid point. Arguments as `gptq_quantize`.
    """
    W, H, keep = working_copies(weight, hessian, mask)
    check_columns(W.shape[1], spec)
    dead = mark_dead_columns(W, H)
    scale, global_scale = float_scales(W, spec)
    per_element = element_scales(spec, scale, global_scale, (W.shape[0], W.shape[1])).expand_as(W)  # (rows, columns)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H, per_element = W[:, perm], H[perm][:, perm], per_element[:, perm]
        keep = None if keep is None else keep[:, perm]
    Hinv, damp_used = inverse_hessian_factor(H, dampening_frac)

    def round_column(j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = per_element[:, j : j + 1]
        values = round_to_grid(spec, w / s)
        return values, values * s

    values, loss = _round_columns_to_grid(W, Hinv, round_column, block_size, keep)
    if perm is not None:
        values = values[:, torch.argsort(perm)]
    return GPTQResult(record_from_values(values, scale, global_scale, spec), loss, damp_used, dead)


def gptq_quantize_gguf(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: GGUFSpec,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ onto a GGUF type's grid: the type's d / sc / dmin / m fixed first from the original weights, each
    sub-block's range searched with the Hessian diagonal as the weight of each column's error, then the codes
    rounded column by column on that grid with GPTQ's error feedback. Arguments as `gptq_quantize`."""
    W, H, keep = working_copies(weight, hessian, mask)
    dead = mark_dead_columns(W, H)
    grid = gguf_grid(W, spec, importance=torch.diag(H))
    step, bias = grid.step_and_bias(spec.gguf)  # (rows, columns)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H, step, bias = W[:, perm], H[perm][:, perm], step[:, perm], bias[:, perm]
        keep = None if keep is None else keep[:, perm]
    Hinv, damp_used = inverse_hessian_factor(H, dampening_frac)

    def round_column(j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, b = step[:, j : j + 1], bias[:, j : j + 1]
        codes = round_codes(w, s, b, spec.gguf)
        return codes, s * codes - b

    codes, loss = _round_columns_to_grid(W, Hinv, round_column, block_size, keep)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GPTQResult(gguf_record(codes, grid, spec), loss, damp_used, dead)


def _round_columns_to_grid(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    round_column: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    block_size: int,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, float]:
    """`_quantize_columns` for a grid fixed up front (element-float scales, a GGUF type's sub-block scales): what
    `round_column(j, w)` stores for column j (rows, columns, loop order), and the loss. `round_column` returns the
    stored values of `w` (rows, 1) and their dequantized weights.

    The same lazy-batch loop; kept apart because with every scale known up front there is no group state to track.
    """
    # see GPTQ Alg. 1 (lazy batch updates, Cholesky of H^-1); Frantar et al. 2022
    rows, columns = W.shape
    V = torch.empty_like(W)  # stored values: grid values before scaling, or GGUF codes
    row_loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i : i + 1] if keep is None else W1[:, i : i + 1] * keep[:, j : j + 1]  # (rows, 1)
            V[:, j : j + 1], dequantized = round_column(j, w)
            err = (w - dequantized) / Hinv1[i, i]
            W1[:, i:].addmm_(err, Hinv1[i : i + 1, i:], alpha=-1)
            Err1[:, i : i + 1] = err
        row_loss += Err1.pow(2).sum(dim=1) / 2
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return V, thread_independent_sum(row_loss)


def _group_of_column(columns: int, spec: QuantSpec, perm: torch.Tensor | None) -> list[int]:
    """The group (in the original column order) of each loop position; a plain list, read once per column."""
    original = perm.tolist() if perm is not None else range(columns)
    return [c // spec.group_size if spec.group_size else 0 for c in original]


def _current_group(
    W: torch.Tensor,
    W1: torch.Tensor,
    Err1: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    i: int,
    end: int,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    """The error-updated weights of columns [i1+i, end), including this block's updates not yet applied to W.

    The reference reads W[:, i1+i:end] here, stale where a group straddles a block boundary; adding the pending
    lazy update makes the result independent of block_size.
    """
    i2 = i1 + W1.shape[1]
    part = W1[:, i : min(end, i2) - i1]
    if end > i2:
        pending = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
        part = torch.cat([part, pending], dim=1)
    start = i1 + i
    return part if keep is None else part * keep[:, start:end]


# ---------------------------------------------------------------------------------------------------
# The pass


def run_gptq(layer: LayerContext, cfg: GPTQConfig) -> dict[str, Any]:
    """GPTQ: quantize with second-order error compensation from calibration inputs (Frantar et al. 2022)."""
    modules = layer.linears(cfg.ignore)
    groups = input_groups(layer, modules)  # before the activation hooks, which give each module its own input copy
    # Installed first so the Hessians are built from the (fake-quantized) inputs the model will really see.
    install_activations(layer, modules, cfg.activations)
    # true_sequential re-captures inputs per group so each sees the quantized sublayers before it.
    stages = [[g] for g in groups] if cfg.true_sequential else [groups]
    # Modules the probe batch never reached (MoE experts no token was routed to) are still quantized, each
    # with its own Hessian from all batches (RTN, recorded, if no calibration token reached it at all).
    grouped = {name for g in groups for name in g}
    unreached = [[name] for name in modules if name not in grouped]
    if unreached:
        stages.append(unreached)
    results: dict[str, Any] = {}
    for stage in stages:
        # Modules of a group read the very same tensor, so they share one Hessian.
        hessians = collect_hessians(layer, {names[0]: modules[names[0]] for names in stage}, cfg.hessian_torch_dtype)
        with layer.timed("solve"):
            for names in stage:
                for fqn in names:
                    results[fqn] = quantize_module(fqn, modules[fqn], hessians[names[0]], cfg, layer.run)
    return results


def quantize_module(
    fqn: str, module: nn.Module, hessian: HessianAccumulator, cfg: GPTQConfig, run: RunContext
) -> dict[str, Any]:
    """GPTQ one module, write its weights back, and return its report entry (RTN fallback recorded)."""
    spec = checked_spec(fqn, module, cfg, run)
    mask = run.handoff.masks.get(fqn)
    weight = weight_matrix(module)
    if isinstance(spec, QuantSpec) and cfg.act_order and spec.group_size is not None and not cfg.use_static_groups:
        raise UserError(
            f"gptq: {fqn} gets group_size {spec.group_size} from the bit plan; act_order then needs static_groups: true"
        )
    extra: dict[str, Any] = {"hessian_samples": hessian.samples}
    if hessian.samples == 0 and not hessian.hessian.any():  # no input reached it (an MoE expert nobody was routed to)
        qweight = keep_pruned_zeros(quantize_weight_rtn(weight if mask is None else weight * mask.to(weight.device), spec),
                                    mask)
        run.results.fallbacks.append({"pass": "gptq", "module": fqn, "fallback": "rtn", "reason": "no calibration input"})
        return {**write_back(fqn, module, qweight, run), **extra, "fallback": "rtn"}
    if isinstance(spec, LookupSpec):
        # The allocator chose a per-row table for this module: SqueezeLLM's k-means, weighted by the Hessian's
        # diagonal (each input column's energy), in place of GPTQ's column loop, which needs a uniform grid.
        qweight = quantize_lookup(weight if mask is None else weight * mask.to(weight.device), spec,
                                  torch.diag(hessian.hessian).clamp_min(0))
        return {**write_back(fqn, module, keep_pruned_zeros(qweight, mask), run), **extra, "method": "lookup table"}
    try:
        if isinstance(spec, GGUFSpec):
            result = gptq_quantize_gguf(weight, hessian.hessian, spec, block_size=cfg.block_size,
                                        dampening_frac=cfg.damp, act_order=cfg.act_order, mask=mask)
        elif isinstance(spec, FloatSpec):
            result = gptq_quantize_float(weight, hessian.hessian, spec, block_size=cfg.block_size,
                                         dampening_frac=cfg.damp, act_order=cfg.act_order, mask=mask)
        else:
            result = gptq_quantize(
                weight, hessian.hessian, spec, block_size=cfg.block_size, dampening_frac=cfg.damp,
                act_order=cfg.act_order, static_groups=cfg.use_static_groups, mask=mask,
            )
        qweight = result.qweight
        extra.update(gptq_loss=round(result.loss, 6), damp_used=result.dampening_frac_used,
                     dead_columns=result.dead_columns)
    except HessianNotPositiveDefinite as exc:
        qweight = quantize_weight_rtn(weight if mask is None else weight * mask.to(weight.device), spec)
        run.results.fallbacks.append({"pass": "gptq", "module": fqn, "fallback": "rtn", "reason": str(exc)})
        extra["fallback"] = "rtn"
    qweight = keep_pruned_zeros(qweight, mask)
    return {**write_back(fqn, module, qweight, run), **extra}
