"""The sequential decoder-layer engine shared by every pass (GPTQ's layer-by-layer scheme, written once).

For a sweep of layer passes:
1. capture the inputs of decoder layer 0 on the calibration windows (only when some pass needs them);
2. for each layer i: move it to the compute device, run each pass on it, then recompute its outputs with
   the *compressed* layer so layer i+1 is calibrated on what it will really see; move it back to the CPU.
Only one decoder layer (plus the calibration activations) lives on the compute device at a time. The activations
themselves live where `calibration.offload` puts them: on the device, in host memory or on disk
(compress/engine/activations.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from compress.engine import distributed
from compress.engine.activations import (
    ActivationPool,
    ActivationStore,
    DeviceStore,
    LayerInput,
    activation_bytes,
    activation_pool,
    layer_inputs,
)
from compress.engine.checkpoint import LayerState, read_hidden
from compress.engine.context import RunContext
from compress.engine.damage import LayerReference, capture, measure_once, reference_outputs
from compress.engine.eager import OFFLOAD_DEVICE, dispatched, evaluation_device_map  # noqa: F401  (re-exported)
from compress.recipe.errors import UserError
from compress.engine.faults import check_finite_inputs, check_finite_output, check_finite_weights, split_batches
from compress.engine.model_io import ModelHandle
from compress.quant.modules import DEFAULT_IGNORE, find_linears, select

log = logging.getLogger("compress")


class _StopForward(Exception):
    """Raised from a hook once everything needed from this forward pass was captured; the rest is skipped."""


class LayerContext:
    """What a layer pass sees: one decoder layer on the compute device and its calibration inputs."""

    def __init__(self, index: int, prefix: str, layer: nn.Module, inputs: list[LayerInput] | None, run: RunContext):
        self.index = index
        self.prefix = prefix  # e.g. "model.layers.3"
        self.layer = layer
        self.inputs = inputs
        self.run = run
        self.part_seconds: dict[str, float] = {}  # the running pass's parts (`timed`), collected after each pass
        # The layer's state_dict (host copies) before this sweep's passes changed it, for a pass that corrects an
        # earlier one's error (lorc); None in a sweep without calibration inputs.
        self.state_before: dict[str, torch.Tensor] | None = None

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Count the seconds inside into `part` of the running pass (report.json `passes[i].seconds_by_part`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.part_seconds[part] = self.part_seconds.get(part, 0.0) + time.perf_counter() - start

    def linears(self, ignore: tuple[str, ...] | list[str] = DEFAULT_IGNORE) -> dict[str, nn.Module]:
        """Linear sublayers by fully qualified name, in definition order, minus the `ignore` patterns."""
        found = find_linears(self.layer, self.prefix)
        return {name: found[name] for name in select(found, ignore)}

    def calibration_inputs(self) -> list[LayerInput]:
        if self.inputs is None:
            raise RuntimeError("this sweep captured no calibration inputs; register the pass with needs_calibration=True")
        return self.inputs

    @torch.no_grad()  # torch applies it around each resumption of the generator, not across the caller's code
    def outputs(self) -> Iterator[torch.Tensor]:
        """The layer's output for each calibration batch in turn, with its current (possibly compressed) weights."""
        for item in self.calibration_inputs():
            yield _first(self.layer(item.hidden, **item.kwargs))  # no local name: the output is the caller's alone

    def new_store(self) -> ActivationStore:
        """An empty store in the same place as the inputs (device, host memory or disk)."""
        inputs = self.calibration_inputs()
        return inputs[0].store.sibling() if inputs else DeviceStore(self.run.inputs.device)

    def forward(self) -> ActivationStore:
        """The layer's outputs for every calibration batch, stored beside the inputs; `for out in ctx.forward()`
        then reads them back one batch at a time."""
        store = self.new_store()
        for output in self.outputs():
            store.append(output)
            del output  # freed before the next batch is computed
        return store

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
        inputs = self.calibration_inputs()
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
                for item in inputs:
                    seen.clear()
                    with contextlib.suppress(_StopForward):
                        self.layer(item.hidden, **item.kwargs)
        finally:
            for handle in handles:
                handle.remove()


def _first(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(handle: ModelHandle, run: RunContext,
                         store: ActivationStore | None = None) -> list[LayerInput]:
    """Inputs of decoder layer 0 for each calibration batch, stopping the forward pass right there.

    Hidden states go into `store` as each batch produces them (default: a store on the compute device).
    """
    assert run.inputs.calibration is not None
    store = store if store is not None else DeviceStore(run.inputs.device)
    captured_kwargs: list[dict[str, Any]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        store.append(hidden)
        captured_kwargs.append(kwargs)
        raise _StopForward

    layer0 = handle.bring_in(0, run.inputs.device)
    hook = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        batches = run.inputs.calibration.split(run.inputs.calibration_batch_size)
        with handle.outside_layers_on(run.inputs.device, with_head=False), \
                run.inputs.reporter.task("calibration inputs", total=len(batches), unit="batch") as advance:
            for batch in batches:
                with contextlib.suppress(_StopForward):
                    handle.model(batch.to(run.inputs.device), use_cache=False)
                advance(1)
    finally:
        hook.remove()
        handle.put_away(0)
    return layer_inputs(store, captured_kwargs)


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
    parts: dict[str, dict[str, float]]  # step label -> part ("statistics", "solve") -> seconds, where timed
    # layer prefix or module fqn -> output error against the uncompressed layer (compress/engine/damage.py);
    # empty for a sweep without calibration inputs
    damage: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_sweep(handle: ModelHandle, steps: list[SweepStep], run: RunContext) -> SweepResult:
    """Apply consecutive layer passes decoder layer by decoder layer (see module docstring).

    With `run.inputs.checkpoint` set, every finished layer is checkpointed and a resumed run skips the layers
    already done, continuing from their saved outputs (compress/engine/checkpoint.py). Calibration activations live
    where `run.inputs.offload` says; the choice and the peak of them in memory go into report.json (`calibration.offload`).
    """
    if not any(step.needs_calibration for step in steps):
        return _sweep_layers(handle, steps, run, None)
    with activation_pool(run.inputs.offload, _calibration_bytes(handle, run), run.inputs.device) as pool:
        if pool.choice.requested == "auto" and pool.choice.placement != "device":  # slower: say why
            run.inputs.reporter.note(f"calibration activations offloaded to {pool.choice.placement}: {pool.choice.reason}")
        result = _sweep_layers(handle, steps, run, pool)
        run.results.report_sections.setdefault("calibration", {}).setdefault("offload", []).append(pool.describe())
    return result


def _calibration_bytes(handle: ModelHandle, run: RunContext) -> int:
    assert run.inputs.calibration is not None
    windows, seq_len = run.inputs.calibration.shape
    dtype = next(handle.model.parameters()).dtype  # the embeddings' output, which every layer keeps
    model: Any = handle.model
    hidden_size = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    return activation_bytes(windows, seq_len, int(hidden_size), dtype)


def _sweep_layers(handle: ModelHandle, steps: list[SweepStep], run: RunContext,
                  pool: ActivationPool | None) -> SweepResult:
    inputs = capture_layer_inputs(handle, run, pool.new_store()) if pool is not None else None
    if inputs is not None:
        check_finite_inputs(inputs, f"{handle.layers_prefix}.0")
    modules: dict[str, dict[str, dict[str, Any]]] = {step.label: {} for step in steps}
    seconds = {step.label: 0.0 for step in steps}
    parts: dict[str, dict[str, float]] = {step.label: {} for step in steps}
    damage: dict[str, dict[str, Any]] = {}
    propagation = 0.0
    layers = handle.layers
    sweep = run.inputs.checkpoint.begin_sweep() if run.inputs.checkpoint is not None else None
    first = 0
    if sweep is not None and run.inputs.checkpoint is not None:
        resumed = run.inputs.checkpoint.restore(sweep, layers, handle.layers_prefix, run)
        first = resumed.next_layer
        for state in resumed.layers:
            _merge_layer_state(modules, seconds, parts, damage, state)
        if inputs is not None and resumed.hidden_files is not None:
            inputs = _restored_inputs(inputs, resumed.hidden_files)
        if first:
            log.info("resuming at decoder layer %d of %d", first, len(layers))
    with run.inputs.reporter.task(", ".join(s.label for s in steps), total=len(layers), unit="layer") as advance:
        advance(first)
        for index in range(first, len(layers)):
            fallbacks_before = len(run.results.fallbacks)
            layer = handle.bring_in(index, run.inputs.device)
            ctx = LayerContext(index, f"{handle.layers_prefix}.{index}", layer, inputs, run)
            check_finite_weights(layer, ctx.prefix, f"before {', '.join(step.label for step in steps)}")
            reference = _reference(ctx)  # before the passes change the layer
            state = apply_with_oom_fallback(ctx, steps)
            check_finite_weights(layer, ctx.prefix, f"after {', '.join(step.label for step in steps)}")
            feeds_next = ctx.inputs is not None and index + 1 < len(layers)  # the last layer's outputs feed no pass
            if feeds_next:
                start = time.perf_counter()
                inputs = _propagate(ctx, reference, state.damage)
                propagation += time.perf_counter() - start
            elif reference is not None and _same_first_batch(ctx, reference):
                first_batch = ctx.calibration_inputs()[0]
                state.damage.update(measure_once(reference, layer, ctx.linears(()), first_batch.hidden, first_batch.kwargs))
            _merge_layer_state(modules, seconds, parts, damage, state)
            if sweep is not None and run.inputs.checkpoint is not None:
                layer.to(OFFLOAD_DEVICE)  # the checkpoint stores CPU tensors; a lazy layer is still in memory here
                run.inputs.checkpoint.save(sweep, index, layer, ctx.prefix, run, state, run.results.fallbacks[fallbacks_before:],
                                    (item.hidden for item in inputs) if feeds_next and inputs is not None else None)
            if handle.layer_done(index):  # the layer left memory: keep only what the size report needs of it
                shed_records(run, f"{handle.layers_prefix}.{index}.")
            advance(1)
    return SweepResult(modules, seconds, propagation, parts, damage)


def _reference(ctx: LayerContext) -> LayerReference | None:
    """The uncompressed layer's outputs on the first calibration batch (None for a sweep without inputs)."""
    if ctx.inputs is None or not ctx.inputs:
        return None
    first_batch = ctx.inputs[0]
    return reference_outputs(ctx.prefix, ctx.layer, ctx.linears(()), first_batch.hidden, first_batch.kwargs)


def _same_first_batch(ctx: LayerContext, reference: LayerReference) -> bool:
    """False once an out-of-memory retry split the batches: the first one then holds fewer windows than measured."""
    return ctx.calibration_inputs()[0].shape[0] == reference.windows


def _propagate(ctx: LayerContext, reference: LayerReference | None, damage: dict[str, dict[str, Any]]) -> list[LayerInput]:
    """The next layer's inputs: this layer's outputs, checked for NaN/Inf and stored one batch at a time.

    The first batch's outputs are also compared with `reference` (its errors go into `damage`), so measuring the
    compressed layer costs no forward of its own. The kwargs (masks, rotary tables) carry over unchanged; the
    inputs' store is freed once the outputs are complete.
    """
    inputs = ctx.calibration_inputs()
    measuring = reference if reference is not None and _same_first_batch(ctx, reference) else None
    store = ctx.new_store()
    outputs = ctx.outputs()
    hooks: contextlib.AbstractContextManager[dict[str, torch.Tensor]] = (
        capture(ctx.linears(()), measuring.positions, measuring.tokens) if measuring is not None else contextlib.nullcontext({}))
    with hooks as seen:
        first = next(outputs, None)  # the generator runs batch 0's forward here, inside the hooks
    batches = _chain(first, outputs)
    del first  # held by `batches` alone, which lets go of it after batch 0, as for every other batch
    for batch, output in enumerate(batches):
        check_finite_output(ctx, batch, output)
        if batch == 0 and measuring is not None:
            damage.update(measuring.errors(output, seen))
        store.append(output)
        del output  # freed before the next batch is computed
    inputs[0].store.close()
    return layer_inputs(store, [item.kwargs for item in inputs])


def _chain(first: torch.Tensor | None, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    if first is not None:
        yield first
        del first
        yield from rest


def _restored_inputs(captured: list[LayerInput], hidden_files: list[Path]) -> list[LayerInput]:
    """A resumed sweep's inputs: the checkpointed hidden states with the captured kwargs (those never change)."""
    store = captured[0].store.sibling()
    for path in hidden_files:
        store.append(read_hidden(path))
    captured[0].store.close()
    return layer_inputs(store, [item.kwargs for item in captured])


def _merge_layer_state(modules: dict[str, dict[str, dict[str, Any]]], seconds: dict[str, float],
                       parts: dict[str, dict[str, float]], damage: dict[str, dict[str, Any]], state: LayerState) -> None:
    for label, results in state.modules.items():
        modules[label].update(results)
        seconds[label] += state.seconds[label]
        for part, part_seconds in state.parts.get(label, {}).items():
            parts[label][part] = parts[label].get(part, 0.0) + part_seconds
    damage.update(state.damage)


def _apply_steps(ctx: LayerContext, steps: list[SweepStep]) -> LayerState:
    state = LayerState({}, {})
    for step in steps:
        start = time.perf_counter()
        ctx.part_seconds = {}
        state.modules[step.label] = step.apply(ctx, step.config)
        state.seconds[step.label] = time.perf_counter() - start
        if ctx.part_seconds:
            state.parts[step.label] = ctx.part_seconds
    return state


def apply_with_oom_fallback(ctx: LayerContext, steps: list[SweepStep]) -> LayerState:
    """Run the passes on one layer; on accelerator out-of-memory, halve the calibration batches and retry.

    The layer's weights are restored before each retry so a pass that failed half-way is not applied twice.
    Every retry is recorded in `run.results.fallbacks` and the log; batch size 1 running out of memory is an error.
    """
    if ctx.inputs is None:
        return _apply_steps(ctx, steps)
    snapshot = {k: v.detach().to(OFFLOAD_DEVICE, copy=True) for k, v in ctx.layer.state_dict().items()}
    ctx.state_before = snapshot
    while True:
        try:
            return _apply_steps(ctx, steps)
        except torch.OutOfMemoryError:
            batch = ctx.inputs[0].shape[0]
            if batch <= 1:
                raise UserError(
                    f"out of memory on {ctx.run.inputs.device} at {ctx.prefix} even with calibration batches of 1 window; "
                    "lower calibration.seq_len, or run on a device with more memory"
                ) from None
            if ctx.run.inputs.device.type == "cuda":
                torch.cuda.empty_cache()
            ctx.layer.load_state_dict(snapshot)
            whole = ctx.inputs
            ctx.inputs = split_batches(whole, max(1, batch // 2))
            whole[0].store.close()
            message = f"out of memory at {ctx.prefix}: retrying with calibration batches of {max(1, batch // 2)} windows"
            ctx.run.inputs.reporter.note(message)  # printed unless --quiet, and always logged
            ctx.run.results.fallbacks.append({"pass": "engine", "module": ctx.prefix,
                                              "fallback": "smaller calibration batches", "reason": message})


def shed_records(run: RunContext, prefix: str) -> None:
    """Replace the records kept for modules under `prefix` by shape-only (meta) copies.

    A lazy model must not collect the codes of every layer in host memory (1 byte per weight); the report's
    size accounting and the export config need only their shapes and settings.
    """
    for fqn, record in list(run.results.records.items()):
        if fqn.startswith(prefix):
            run.results.records[fqn] = record.to("meta")


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
    # under torchrun every rank must walk the same groups (their Hessians are all-reduced group by group)
    return distributed.from_rank_zero([first_seen[key] for key in order])


def _first_row(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer kwargs for batch size 1: slice tensors whose leading dim is the batch (masks); keep shared ones."""
    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] > 1:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    return {k: cut(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def model_on_device(handle: ModelHandle, device: torch.device) -> Iterator[None]:
    """Make the whole model runnable on `device` for evaluation, then put it back (see `ModelHandle.runnable_on`).

    An eager model is moved at once if it fits, else over `max_memory`, else one decoder layer at a time, so
    peak GPU memory follows one layer, as during compression; a lazy one reads each layer just before its forward.
    """
    with handle.runnable_on(device):
        yield
