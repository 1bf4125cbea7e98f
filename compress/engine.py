"""The sequential decoder-layer engine shared by every pass (GPTQ's layer-by-layer scheme, written once).

For a sweep of layer passes:
1. capture the inputs of decoder layer 0 on the calibration windows (only when some pass needs them);
2. for each layer i: move it to the compute device, run each pass on it, then recompute its outputs with
   the *compressed* layer so layer i+1 is calibrated on what it will really see; move it back to the CPU.
Only one decoder layer (plus the calibration activations) lives on the compute device at a time.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, cast

import torch
from torch import nn

from compress.context import RunContext
from compress.model_io import ModelHandle
from compress.modules import DEFAULT_IGNORE, find_linears, select

OFFLOAD_DEVICE = torch.device("cpu")


class _StopForward(Exception):
    """Raised from a hook once everything needed from this forward pass was captured; the rest is skipped."""


@dataclass
class LayerInput:
    hidden: torch.Tensor  # (batch, seq_len, hidden_size)
    kwargs: dict[str, Any]  # attention mask, position ids/embeddings, ... exactly as the model passed them


class LayerContext:
    """What a layer pass sees: one decoder layer on the compute device and its calibration inputs."""

    def __init__(self, index: int, prefix: str, layer: nn.Module, inputs: list[LayerInput] | None, run: RunContext):
        self.index = index
        self.prefix = prefix  # e.g. "model.layers.3"
        self.layer = layer
        self.inputs = inputs
        self.run = run

    def linears(self, ignore: tuple[str, ...] | list[str] = DEFAULT_IGNORE) -> dict[str, nn.Module]:
        """Linear sublayers by fully qualified name, in definition order, minus the `ignore` patterns."""
        found = find_linears(self.layer, self.prefix)
        return {name: found[name] for name in select(found, ignore)}

    @torch.no_grad()
    def forward(self) -> list[torch.Tensor]:
        """The layer's outputs for every calibration batch, with its current (possibly compressed) weights."""
        if self.inputs is None:
            raise RuntimeError("this sweep captured no calibration inputs; register the pass with needs_calibration=True")
        outputs = []
        for item in self.inputs:
            out = self.layer(item.hidden, **item.kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outputs

    def observe(
        self,
        modules: dict[str, nn.Module],
        observer: Callable[[str, torch.Tensor], None],
        *,
        stop_early: bool = False,
    ) -> None:
        """Run the calibration batches through the layer, calling `observer(name, input)` for each module's input.

        stop_early: end each batch's forward as soon as every module has seen its input. Observing only q/k/v
        then costs the input norm, not the whole layer (GPTQ's true_sequential re-captures per sublayer group).
        """
        if self.inputs is None:
            raise RuntimeError("this sweep captured no calibration inputs; register the pass with needs_calibration=True")
        seen: set[str] = set()

        def hook(name: str, x: torch.Tensor) -> None:
            observer(name, x.detach())
            seen.add(name)
            if stop_early and len(seen) == len(modules):
                raise _StopForward

        handles = [
            module.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0]))
            for name, module in modules.items()
        ]
        try:
            with torch.no_grad():
                for item in self.inputs:
                    seen.clear()
                    with contextlib.suppress(_StopForward):
                        self.layer(item.hidden, **item.kwargs)
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _outside_layers_on(handle: ModelHandle, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer outside the decoder layers (embeddings, rotary tables) to `device`."""
    moved: list[tuple[nn.Module, str, torch.device, bool]] = []
    for name, module in handle.model.named_modules():
        if name == handle.layers_prefix or name.startswith(handle.layers_prefix + "."):
            continue
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and tensor.device != device:
                is_param = key in module._parameters
                moved.append((module, key, tensor.device, is_param))
                tensor.data = tensor.data.to(device)
    try:
        yield
    finally:
        for module, key, original, is_param in moved:
            tensor = (module._parameters if is_param else module._buffers)[key]
            if tensor is not None:
                tensor.data = tensor.data.to(original)


@torch.no_grad()
def capture_layer_inputs(handle: ModelHandle, run: RunContext) -> list[LayerInput]:
    """Inputs of decoder layer 0 for each calibration batch, stopping the forward pass right there."""
    assert run.calibration is not None
    captured: list[LayerInput] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        captured.append(LayerInput(hidden.detach(), kwargs))
        raise _StopForward

    layer0 = bring_in(handle, 0, run.device)
    hook = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        outside = (handle.lazy.outside_on(handle, run.device, with_head=False) if handle.lazy
                   else _outside_layers_on(handle, run.device))
        with outside:
            for batch in run.calibration.split(run.calibration_batch_size):
                with contextlib.suppress(_StopForward):
                    handle.model(batch.to(run.device), use_cache=False)
    finally:
        hook.remove()
        put_away(handle, 0, save=False)
    return captured


def bring_in(handle: ModelHandle, index: int, device: torch.device) -> nn.Module:
    """Decoder layer `index` on `device`: moved there, or read from the shards when the model is lazy."""
    if handle.lazy is not None:
        return handle.lazy.load_layer(handle, index, device)
    layer = cast(nn.Module, handle.layers[index])
    return layer.to(device)


def put_away(handle: ModelHandle, index: int, *, save: bool) -> None:
    """Back to the CPU, or (lazy model) written to the output shards when `save` and freed."""
    if handle.lazy is not None:
        handle.lazy.unload_layer(handle, index, save=save)
    else:
        handle.layers[index].to(OFFLOAD_DEVICE)


LayerApply = Callable[[LayerContext, Any], dict[str, Any]]


@dataclass
class SweepStep:
    """One layer pass in a sweep: its label for reports, its function and its validated config."""

    label: str
    apply: LayerApply
    config: Any
    needs_calibration: bool


@dataclass
class SweepResult:
    modules: dict[str, dict[str, dict[str, Any]]]  # step label -> module fqn -> result
    seconds: dict[str, float]  # step label -> seconds inside the pass
    propagation_seconds: float


def run_sweep(handle: ModelHandle, steps: list[SweepStep], run: RunContext) -> SweepResult:
    """Apply consecutive layer passes decoder layer by decoder layer (see module docstring)."""
    needs_inputs = any(step.needs_calibration for step in steps)
    inputs = capture_layer_inputs(handle, run) if needs_inputs else None
    modules: dict[str, dict[str, dict[str, Any]]] = {step.label: {} for step in steps}
    seconds = {step.label: 0.0 for step in steps}
    propagation = 0.0
    layers = handle.layers
    with run.reporter.task(", ".join(s.label for s in steps), total=len(layers)) as advance:
        for index in range(len(layers)):
            layer = bring_in(handle, index, run.device)
            ctx = LayerContext(index, f"{handle.layers_prefix}.{index}", layer, inputs, run)
            for step in steps:
                start = time.perf_counter()
                modules[step.label].update(step.apply(ctx, step.config))
                seconds[step.label] += time.perf_counter() - start
            if inputs is not None and index + 1 < len(layers):  # the last layer's outputs feed no pass
                start = time.perf_counter()
                inputs = [LayerInput(out, item.kwargs) for out, item in zip(ctx.forward(), inputs)]
                propagation += time.perf_counter() - start
            put_away(handle, index, save=True)
            if handle.lazy is not None:  # the layer is on disk now; keep only what the size report needs
                shed_records(run, f"{handle.layers_prefix}.{index}.")
            advance(1)
    return SweepResult(modules, seconds, propagation)


def shed_records(run: RunContext, prefix: str) -> None:
    """Replace the integer codes kept for modules under `prefix` by shape-only (meta) tensors.

    A lazy model must not collect the codes of every layer in host memory (1 byte per weight); the report's
    size accounting needs only their shapes.
    """
    for fqn, record in list(run.quantized.items()):
        if fqn.startswith(prefix):
            run.quantized[fqn] = type(record)(record.codes.to("meta"), record.scale.to("meta"),
                                              record.zero.to("meta"), record.spec)


def input_groups(ctx: LayerContext, modules: dict[str, nn.Module]) -> list[list[str]]:
    """Group the modules that read the very same input tensor, in execution order.

    For a Llama layer this gives [[q, k, v], [o], [gate, up], [down]]: the order GPTQ's `true_sequential`
    quantizes in and the groups AWQ scales together. Found from one calibration batch (or a dummy input when
    the sweep captured none), so it works for any architecture without a per-family table.
    """
    first_seen: dict[int, list[str]] = {}
    order: list[int] = []
    keep_alive: list[torch.Tensor] = []  # a freed tensor's id can be reused by the next one

    def record(_module: nn.Module, args: tuple, name: str) -> None:
        keep_alive.append(args[0])
        key = id(args[0])
        if key not in first_seen:
            first_seen[key] = []
            order.append(key)
        if name not in first_seen[key]:
            first_seen[key].append(name)

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: record(mod, args, name)) for name, m in modules.items()]
    try:
        if ctx.inputs is None:
            raise RuntimeError("input_groups needs calibration inputs (register the pass with needs_calibration=True)")
        with torch.no_grad():
            item = ctx.inputs[0]
            ctx.layer(item.hidden[:1], **_first_row(item.kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return [first_seen[key] for key in order]


def _first_row(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer kwargs for batch size 1: slice tensors whose leading dim is the batch (masks); keep shared ones."""
    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] > 1:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    return {k: cut(v) for k, v in kwargs.items()}


def evaluation_device_map(handle: ModelHandle) -> dict[str, Any]:
    """accelerate's placement of the model under `handle.max_memory`, never splitting a decoder layer."""
    from accelerate import infer_auto_device_map

    budget: dict[int | str, str] = {int(k) if k.isdigit() else k: v for k, v in (handle.max_memory or {}).items()}
    layer_class = type(handle.layers[0]).__name__
    return dict(infer_auto_device_map(handle.model, max_memory=budget, no_split_module_classes=[layer_class]))


@contextlib.contextmanager
def dispatched(handle: ModelHandle) -> Iterator[None]:
    """Spread the model over the devices of `max_memory` (accelerate hooks move activations between them)."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    dispatch_model(handle.model, device_map=evaluation_device_map(handle))
    try:
        yield
    finally:
        remove_hook_from_module(handle.model, recurse=True)
        handle.model.to(OFFLOAD_DEVICE)


def _fits_on(model: nn.Module, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    return needed < 0.7 * free  # leave room for activations and logits


@contextlib.contextmanager
def model_on_device(handle: ModelHandle, device: torch.device) -> Iterator[None]:
    """Make the whole model runnable on `device` for evaluation, then put it back on the CPU.

    If it fits, it is moved at once; otherwise each decoder layer is moved in just before its forward and
    out right after, so peak GPU memory follows one layer, as during compression.
    """
    if handle.lazy is not None:
        with handle.lazy.streaming(handle, device):
            yield
        return
    if handle.max_memory:
        with dispatched(handle):
            yield
        return
    if device == OFFLOAD_DEVICE:
        yield
        return
    if _fits_on(handle.model, device):
        handle.model.to(device)
        try:
            yield
        finally:
            handle.model.to(OFFLOAD_DEVICE)
        return
    hooks = []
    for layer in handle.layers:
        hooks.append(layer.register_forward_pre_hook(lambda module, _args: module.to(device)))
        hooks.append(layer.register_forward_hook(lambda module, _args, _out: module.to(OFFLOAD_DEVICE)))
    try:
        with _outside_layers_on(handle, device):
            yield
    finally:
        for hook in hooks:
            hook.remove()
