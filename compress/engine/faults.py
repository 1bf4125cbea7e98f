"""Faults a long run must not carry silently: non-finite numbers, and batches too big for the accelerator.

NaN or Inf is caught at the decoder layer where it first appears and reported with the module that produced
it, instead of surfacing hours later as a perplexity of `nan`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.engine.activations import LayerInput, layer_inputs
from compress.recipe.errors import UserError

if TYPE_CHECKING:
    from compress.engine.layer_sweep import LayerContext


class NonFiniteError(UserError):
    """NaN or Inf in weights or activations; the message names the module where it first appeared."""


def _is_finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def check_finite_weights(layer: nn.Module, prefix: str, when: str) -> None:
    """Raise if any parameter of `layer` holds NaN or Inf; `when` says at which point of the run (for the message)."""
    for name, param in layer.named_parameters(prefix=prefix):
        if not _is_finite(param):
            count = int((~torch.isfinite(param)).sum())
            raise NonFiniteError(f"{count} NaN/Inf values in {name} {when}; the run stops here rather than "
                                 "report metrics of a broken model")


def check_finite_inputs(inputs: list[LayerInput], where: str) -> None:
    for item in inputs:
        if not _is_finite(item.hidden):
            raise NonFiniteError(f"NaN/Inf in the calibration activations entering {where} (the embeddings or the "
                                 "checkpoint's weights before the decoder layers are broken)")


def check_finite_output(ctx: LayerContext, batch: int, output: torch.Tensor) -> None:
    """Raise naming the first module inside the layer whose output is non-finite, if this batch's output is.

    Checked one batch at a time, as the engine stores the outputs, so offloaded activations are not read back for it.
    """
    if not _is_finite(output):
        culprit = locate_nonfinite(ctx, batch) or ctx.prefix
        raise NonFiniteError(
            f"NaN/Inf in the activations of {culprit} (decoder layer {ctx.index}, calibration batch {batch}) "
            "after compressing it; earlier layers were finite. Check that module's weights and the pass settings"
        )


@torch.no_grad()
def locate_nonfinite(ctx: LayerContext, batch: int) -> str | None:
    """Re-run one batch with hooks on every submodule; the first to *finish* with non-finite output is the culprit.

    Hooks fire when a module returns, so inner modules (q_proj) report before the blocks that contain them.
    """
    assert ctx.inputs is not None
    found: list[str] = []

    def hook(name: str, output: Any) -> None:
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        if not found and any(isinstance(t, torch.Tensor) and not _is_finite(t) for t in tensors):
            found.append(name)

    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: hook(name, out))
               for name, m in ctx.layer.named_modules(prefix=ctx.prefix)]
    try:
        item = ctx.inputs[batch]
        ctx.layer(item.hidden, **item.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def split_batches(inputs: list[LayerInput], size: int) -> list[LayerInput]:
    """Cut every calibration batch into batches of at most `size` windows (the out-of-memory fallback).

    Keyword tensors whose leading dimension is the batch (attention masks) are cut with it; shared ones
    (rotary tables with a leading 1) are kept whole. The pieces go into a new store beside the old one
    (device, host memory or disk), read one batch at a time.
    """
    store = inputs[0].store.sibling()
    kwargs = []
    for item in inputs:
        hidden = item.hidden
        batch = hidden.shape[0]
        for start in range(0, batch, size):
            def cut(value: Any, start: int = start) -> Any:
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch and batch > 1:
                    return value[start:start + size]
                if isinstance(value, tuple):
                    return tuple(cut(v) for v in value)
                return value

            store.append(hidden[start:start + size])
            kwargs.append({k: cut(v) for k, v in item.kwargs.items()})
    return layer_inputs(store, kwargs)
