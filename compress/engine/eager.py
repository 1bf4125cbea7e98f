"""Models held in host memory: every parameter is real, on the CPU between uses.

`EagerWeights` is the `ModelWeights` strategy of a model from `load_model` (compress/engine/model_io.py): a
decoder layer moves to the compute device while its passes run and back afterwards; evaluation moves the
whole model when it fits, spreads it over `max_memory` when given, or else moves one layer in at a time. The
model stays in memory to the end, when the runner saves it (and digests it) from there. Models larger than host
memory use `LazyWeights` (compress/engine/lazy.py), which has the same methods.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import torch
from torch import nn

from compress.engine.digest import weights_digest

if TYPE_CHECKING:
    from compress.engine.model_io import ModelHandle

OFFLOAD_DEVICE = torch.device("cpu")


def _outside_layers(handle: ModelHandle) -> Iterator[tuple[str, nn.Module]]:
    """The modules outside the decoder layers (embeddings, final norm, lm_head, rotary tables), by name."""
    for name, module in handle.model.named_modules():
        if name != handle.layers_prefix and not name.startswith(handle.layers_prefix + "."):
            yield name, module


@contextlib.contextmanager
def outside_layers_on(handle: ModelHandle, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer outside the decoder layers (embeddings, rotary tables) to `device`."""
    moved: list[tuple[nn.Module, str, torch.device, bool]] = []
    for _name, module in _outside_layers(handle):
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
def _layer_by_layer_on(handle: ModelHandle, device: torch.device) -> Iterator[None]:
    """Each decoder layer moves to `device` just before its forward and back right after."""
    hooks = []
    for layer in handle.layers:
        hooks.append(layer.register_forward_pre_hook(lambda module, _args: module.to(device)))
        hooks.append(layer.register_forward_hook(lambda module, _args, _out: module.to(OFFLOAD_DEVICE)))
    try:
        with outside_layers_on(handle, device):
            yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def _whole_model_on(handle: ModelHandle, device: torch.device) -> Iterator[None]:
    handle.model.to(device)
    try:
        yield
    finally:
        handle.model.to(OFFLOAD_DEVICE)


class EagerWeights:
    """The `ModelWeights` of a model held in host memory (see the module docstring)."""

    saves_layers_as_they_finish = False  # the model stays in memory; the runner saves it at the end

    def __init__(self) -> None:
        # called with (index, prefix, layer) for each finished layer while it is still on the compute device
        self.on_layer_written: Callable[[int, str, nn.Module], None] | None = None

    def bring_in(self, handle: ModelHandle, index: int, device: torch.device) -> nn.Module:
        return cast(nn.Module, handle.layers[index]).to(device)

    def put_away(self, handle: ModelHandle, index: int) -> None:
        handle.layers[index].to(OFFLOAD_DEVICE)

    def layer_done(self, handle: ModelHandle, index: int) -> bool:
        if self.on_layer_written is not None:
            self.on_layer_written(index, f"{handle.layers_prefix}.{index}", cast(nn.Module, handle.layers[index]))
        self.put_away(handle, index)
        return False  # still in host memory

    def outside_layers_on(self, handle: ModelHandle, device: torch.device, *,
                          with_head: bool = True) -> contextlib.AbstractContextManager[None]:
        return outside_layers_on(handle, device)  # an in-memory lm_head costs no reading: it moves too

    def runnable_on(self, handle: ModelHandle, device: torch.device) -> contextlib.AbstractContextManager[None]:
        """The whole model moved to `device` if it fits, else over `max_memory`, else one layer at a time.

        Layer by layer, peak GPU memory follows one layer, as during compression.
        """
        if handle.max_memory:
            return dispatched(handle)
        if device == OFFLOAD_DEVICE:
            return contextlib.nullcontext()
        if _fits_on(handle.model, device):
            return _whole_model_on(handle, device)
        return _layer_by_layer_on(handle, device)

    def outside_tensors(self, handle: ModelHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """The parameters outside the decoder layers, tied ones once (as `unique_state_dict` keeps them)."""
        seen: set[int] = set()
        for module_name, module in _outside_layers(handle):
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{module_name}.{name}" if module_name else name, param.detach()

    def finish(self, handle: ModelHandle) -> Path | None:
        return None  # nothing was written as the layers finished: the runner saves the model from memory

    def weights_digest(self, handle: ModelHandle) -> str:
        return weights_digest(handle.model)
