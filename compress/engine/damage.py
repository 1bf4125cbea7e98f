"""Where the damage is: each decoder layer's, and each of its linears', output error against the uncompressed layer.

Measured on the first calibration batch, at up to `MAX_POSITIONS` token positions spread evenly over it:

    rel_error(y) = ||y_compressed - y_reference||_F / ||y_reference||_F

`y_reference` comes from one forward of the uncompressed layer before the passes touch it; `y_compressed` from the
forward the engine runs anyway to propagate the compressed layer's outputs to the next layer, so the measurement
costs one batch's forward per layer, never a second pass over all the windows. A module's error is taken at its
output, so it holds what the modules before it in the layer did too (o_proj sees q/k/v's error), and it stays
right for passes that rescale a module's input and weight together (AWQ, SmoothQuant), where comparing weights
would not. Only the sampled positions are kept, in float32 on the compute device: (positions, features) per
module, 512 x 43,008 features = 88 MB for a Llama-3-8B layer, whatever the number of windows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

MAX_POSITIONS = 512  # token positions kept per module: bounds the memory above whatever the batch size


def sampled_positions(tokens: int, limit: int = MAX_POSITIONS) -> torch.Tensor:
    """Indices of up to `limit` evenly spaced positions among `tokens` (batch x seq_len flattened)."""
    return torch.linspace(0, tokens - 1, steps=min(tokens, limit)).round().long().unique()


def relative_error(compressed: torch.Tensor, reference: torch.Tensor) -> float:
    """||compressed - reference|| / ||reference|| in float64; for a reference of zeros, 0 if it stayed zeros, else inf."""
    diff, scale = float((compressed.double() - reference.double()).norm()), float(reference.double().norm())
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else float("inf")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _rows(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The sampled positions of a (batch, seq, features) activation as (positions, features) float32 rows."""
    flat = tensor.detach().reshape(-1, tensor.shape[-1])
    return flat.index_select(0, positions.to(flat.device)).float()


@contextlib.contextmanager
def capture(modules: dict[str, nn.Module], positions: torch.Tensor, tokens: int) -> Iterator[dict[str, torch.Tensor]]:
    """For a `with` block: the sampled rows of each module's output, by name, from the forwards run inside it on a
    batch of `tokens` positions (windows x seq_len)."""
    found: dict[str, torch.Tensor] = {}

    def keep(name: str, output: Any) -> None:
        value = _first(output)
        # A module whose output has a row per token position; an MoE expert's has one per token routed to it,
        # which no position index can address, so it is left out.
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:-1].numel() == tokens:
            found[name] = _rows(value, positions)

    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: keep(name, out)) for name, m in modules.items()]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def uncounted(layer: nn.Module) -> Iterator[None]:
    """MoE expert token counters paused: a measuring forward is not one of the calibration runs they count."""
    paused = {m: m.counter for m in layer.modules() if getattr(m, "counter", None) is not None}
    for module in paused:
        setattr(module, "counter", None)
    try:
        yield
    finally:
        for module, counter in paused.items():
            setattr(module, "counter", counter)


@dataclass
class LayerReference:
    """The uncompressed layer's outputs (its own and each linear's) at the sampled positions of the first batch."""

    prefix: str
    positions: torch.Tensor  # indices into the first batch's (windows x seq_len) flattened positions
    windows: int
    tokens: int  # windows x seq_len of the first batch
    layer_output: torch.Tensor  # (positions, hidden) float32
    module_outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # fqn -> (positions, out_features)

    def errors(self, layer_output: torch.Tensor, module_outputs: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """report.json `damage` entries from the compressed layer's outputs on the same batch:
        `{prefix: {output_rel_error, windows, positions}, fqn: {output_rel_error}, ...}`.

        A module whose output changed shape (a width-pruned projection) gets no entry: there is no like to compare.
        """
        found: dict[str, dict[str, Any]] = {
            self.prefix: {"output_rel_error": round(relative_error(_rows(layer_output, self.positions), self.layer_output), 6),
                          "windows": self.windows, "positions": int(self.positions.numel())}}
        for name, reference in self.module_outputs.items():
            output = module_outputs.get(name)
            if output is not None and output.shape == reference.shape:
                found[name] = {"output_rel_error": round(relative_error(output, reference), 6)}
        return found


@torch.no_grad()
def reference_outputs(prefix: str, layer: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor,
                      kwargs: dict[str, Any]) -> LayerReference:
    """Run the uncompressed layer once on one calibration batch `hidden` (batch, seq, hidden) and keep samples."""
    tokens = hidden.shape[0] * hidden.shape[1]
    positions = sampled_positions(tokens)
    with uncounted(layer), capture(modules, positions, tokens) as outputs:
        output = _first(layer(hidden, **kwargs))
    return LayerReference(prefix, positions, hidden.shape[0], tokens, _rows(output, positions), outputs)


@torch.no_grad()
def measure_once(reference: LayerReference, layer: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor,
                 kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The errors of a layer whose outputs feed nothing (the last one): one more forward on the first batch."""
    with uncounted(layer), capture(modules, reference.positions, reference.tokens) as outputs:
        output = _first(layer(hidden, **kwargs))
    return reference.errors(output, outputs)
