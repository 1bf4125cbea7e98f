"""Calibration activations between decoder layers, kept where they fit (`calibration.offload`).

A sweep holds, per calibration batch, the hidden state (batch, seq_len, hidden) entering the current layer, and
while that layer's outputs are computed, those too: two copies of samples x seq_len x hidden. For a 70B model
calibrated on 512 windows of 2048 tokens that is 17 GB per copy in fp16, more than fits beside the layer on
most GPUs. An `ActivationStore` keeps one copy, one tensor per batch, in one of three places:

- `device`: on the compute device (no copies; what fits there is fastest);
- `cpu`: in host memory (pinned when the device is CUDA, so the copy to the GPU is a DMA), one batch copied to
  the device at a time;
- `disk`: one raw file per batch in a scratch folder, written as the batch is produced and memory-mapped back
  one batch at a time, so about two batches are in memory at once (the one read and the one written).

`auto` takes the first of these that fits comfortably (`choose_placement`). Passes see none of this: a
`LayerInput.hidden` is read from its store when accessed and freed when the caller drops it.

Why raw files and not safetensors: the files are this process's scratch, read back by the store that wrote them
and knows their shapes and dtype, so a self-describing format buys nothing. Writing is one `write()` of the
tensor's bytes (safetensors serialises to a buffer first: 2.2 vs 1.2 GiB/s measured here), and
`torch.from_file` maps the bytes straight into a tensor, for any dtype (numpy's memmap has no bfloat16).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch

from compress.recipe.errors import UserError

log = logging.getLogger("compress")

OffloadMode = Literal["auto", "device", "cpu", "disk"]
Placement = Literal["device", "cpu", "disk"]
# `auto` keeps activations in a memory only when they take at most this share of what is free there: the rest
# is for the decoder layer, the passes' statistics (a GPTQ Hessian per linear) and the forward's intermediates.
COMFORTABLE_SHARE = 0.5
SCRATCH_PREFIX = ".compress-activations-"


@dataclass(frozen=True)
class OffloadSettings:
    """What the recipe asked for: the mode, and the folder in which disk offload makes its scratch folder."""

    mode: OffloadMode = "device"
    folder: Path | None = None  # None: the system's temporary folder


# -- deciding where they go ---------------------------------------------------------------------------------


def activation_bytes(windows: int, seq_len: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of one layer's inputs plus its outputs over every calibration window (the two copies a sweep holds)."""
    return 2 * windows * seq_len * hidden_size * dtype.itemsize


def host_available_bytes() -> int:
    """Memory the kernel could give this process without swapping (psutil if installed, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # reported in KiB
    raise RuntimeError("cannot tell the available host memory: no psutil and no MemAvailable in /proc/meminfo")


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`; for the CPU (and Apple's unified memory) the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


@dataclass(frozen=True)
class OffloadChoice:
    """Where a sweep keeps its activations and why; goes into report.json under `calibration.offload`."""

    requested: OffloadMode
    placement: Placement
    activation_bytes: int  # inputs + outputs, see `activation_bytes`
    free_device_bytes: int | None  # measured only for `auto`
    free_host_bytes: int | None
    reason: str


def choose_placement(requested: OffloadMode, needed: int, device: torch.device) -> OffloadChoice:
    """`requested`, unless it is `auto`: then the device if `needed` fits comfortably there, else host memory,
    else disk."""
    if requested != "auto":
        return OffloadChoice(requested, requested, needed, None, None, "set in the recipe")
    free_device = free_memory_bytes(device)
    on_host = device.type != "cuda"  # the CPU (or unified memory): "device" and "cpu" are the same memory
    free_host = free_device if on_host else host_available_bytes()
    where = f"{needed / 2**30:.2f} GiB of activations"
    if needed <= COMFORTABLE_SHARE * free_device:
        return OffloadChoice("auto", "device", needed, free_device, free_host,
                             f"{where} fit in {free_device / 2**30:.2f} GiB free on {device}")
    if not on_host and needed <= COMFORTABLE_SHARE * free_host:
        return OffloadChoice("auto", "cpu", needed, free_device, free_host,
                             f"{where} do not fit in {free_device / 2**30:.2f} GiB free on {device}; "
                             f"host memory has {free_host / 2**30:.2f} GiB available")
    return OffloadChoice("auto", "disk", needed, free_device, free_host,
                         f"{where} fit in neither {device} ({free_device / 2**30:.2f} GiB free) nor host memory "
                         f"({free_host / 2**30:.2f} GiB available)")


# -- measuring what is resident ----------------------------------------------------------------------------


@dataclass
class ResidencyMeter:
    """Bytes of calibration hidden states in memory (host or device) now, and the most at any one time.

    A store adds what it holds; a tensor it hands out (or is handed to write) counts until its Python object is
    freed, which a weakref finalizer reports. Tensors that alias what a store already holds are not counted twice.
    """

    current: int = 0
    peak: int = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def remove(self, nbytes: int) -> None:
        self.current -= nbytes

    def follow(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self.add(nbytes)
        weakref.finalize(tensor, self.remove, nbytes)
        return tensor


# -- stores ------------------------------------------------------------------------------------------------


@dataclass
class _Holdings:
    """What a store gives back when closed or garbage-collected, kept apart so its finalizer does not keep it alive."""

    meter: ResidencyMeter
    held_bytes: int = 0
    files: list[Path] = field(default_factory=list)

    def release(self) -> None:
        self.meter.remove(self.held_bytes)
        self.held_bytes = 0
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()


class ActivationStore:
    """The hidden states of a sweep's calibration batches, one tensor per batch; `store[i]` is on the compute device.

    Append in batch order. `close()` frees the memory or files at once; a store dropped without it is freed when
    garbage-collected (a pass calling `LayerContext.forward()` for its own use need not close anything).
    """

    def __init__(self, device: torch.device, meter: ResidencyMeter | None = None, folder: Path | None = None):
        self.device = device
        self.meter = meter if meter is not None else ResidencyMeter()
        self.folder = folder  # where a disk store writes; unused by the others
        self._tensors: list[torch.Tensor] = []  # what a memory store holds
        self._shapes: list[torch.Size] = []
        self._dtypes: list[torch.dtype] = []
        self._holdings = _Holdings(self.meter)
        self._finalizer = weakref.finalize(self, self._holdings.release)

    def append(self, hidden: torch.Tensor) -> None:
        self._shapes.append(hidden.shape)
        self._dtypes.append(hidden.dtype)
        self._put(hidden.detach())

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"calibration batch {index} of {len(self)}")
        return self._get(index % len(self))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]

    def shape(self, index: int) -> torch.Size:
        """The shape of batch `index`, without reading it."""
        return self._shapes[index]

    def sibling(self) -> ActivationStore:
        """An empty store of the same kind, place and meter (for a layer's outputs, or re-cut batches)."""
        return type(self)(self.device, self.meter, self.folder)

    def close(self) -> None:
        self._tensors.clear()
        self._finalizer()

    def _put(self, hidden: torch.Tensor) -> None:
        raise NotImplementedError

    def _get(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _hold(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self._holdings.held_bytes += nbytes
        self.meter.add(nbytes)


class DeviceStore(ActivationStore):
    """Every batch on the compute device: today's behaviour, and the fastest when it fits."""

    def _put(self, hidden: torch.Tensor) -> None:
        tensor = hidden.to(self.device)
        self._tensors.append(tensor)
        self._hold(tensor)

    def _get(self, index: int) -> torch.Tensor:
        return self._tensors[index]


class HostStore(ActivationStore):
    """Every batch in host memory (pinned for CUDA); one batch at a time is copied to the device."""

    def _put(self, hidden: torch.Tensor) -> None:
        if self.device.type == "cuda":
            tensor = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            tensor.copy_(hidden)  # blocking: the device tensor may be freed as soon as this returns
        else:
            tensor = hidden.to("cpu")
        self._tensors.append(tensor)
        self._hold(tensor)

    def _get(self, index: int) -> torch.Tensor:
        held = self._tensors[index]
        if self.device.type == "cpu":
            return held  # the same memory; already counted
        # non_blocking from pinned memory is safe: the source stays alive in this store
        return self.meter.follow(held.to(self.device, non_blocking=True))


class DiskStore(ActivationStore):
    """Every batch in its own raw file under `folder`; read back (memory-mapped) one batch at a time."""

    _names = itertools.count()

    def __init__(self, device: torch.device, meter: ResidencyMeter | None = None, folder: Path | None = None):
        if folder is None:
            raise ValueError("a DiskStore needs the scratch folder to write its batches into")
        super().__init__(device, meter, folder)
        self._name = f"store-{next(self._names):05d}"

    def _put(self, hidden: torch.Tensor) -> None:
        self.meter.follow(hidden)  # the batch being written is resident until the caller drops it
        assert self.folder is not None
        path = self.folder / f"{self._name}-{len(self._holdings.files):05d}.bin"
        raw = hidden.to("cpu").contiguous().reshape(-1).view(torch.uint8)  # any dtype as bytes (bfloat16 too)
        with open(path, "wb") as file:
            file.write(raw.numpy().data)
        self._holdings.files.append(path)

    def _get(self, index: int) -> torch.Tensor:
        shape = self._shapes[index]
        # shared=False maps the file privately: pages are read as the layer touches them, and writes never reach it
        mapped = torch.from_file(str(self._holdings.files[index]), shared=False, size=shape.numel(),
                                 dtype=self._dtypes[index]).view(shape)
        return self.meter.follow(mapped if self.device.type == "cpu" else mapped.to(self.device))


@dataclass(frozen=True, eq=False)
class LayerInput:
    """One calibration batch entering a decoder layer. `hidden` (batch, seq_len, hidden_size) is read from its
    store on access; `kwargs` (attention mask, position ids/embeddings) are small and stay as the model passed them."""

    store: ActivationStore
    index: int
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.store[self.index]

    @property
    def shape(self) -> torch.Size:
        return self.store.shape(self.index)


def layer_inputs(store: ActivationStore, kwargs: Sequence[dict[str, Any]]) -> list[LayerInput]:
    """Pair each stored batch with its keyword arguments."""
    if len(store) != len(kwargs):
        raise ValueError(f"{len(store)} stored batches but {len(kwargs)} sets of keyword arguments")
    return [LayerInput(store, index, item) for index, item in enumerate(kwargs)]


# -- one sweep's stores ------------------------------------------------------------------------------------

STORES: dict[Placement, type[ActivationStore]] = {"device": DeviceStore, "cpu": HostStore, "disk": DiskStore}


class ActivationPool:
    """The stores of one sweep: one placement, one meter, and (for disk) one scratch folder removed at the end."""

    def __init__(self, choice: OffloadChoice, device: torch.device, folder: Path | None):
        self.choice = choice
        self.device = device
        self.folder = folder
        self.meter = ResidencyMeter()

    def new_store(self) -> ActivationStore:
        return STORES[self.choice.placement](self.device, self.meter, self.folder)

    def describe(self) -> dict[str, Any]:
        """The report entry: what was asked, what was chosen and why, the estimate, and the measured peak."""
        return {
            "requested": self.choice.requested,
            "placement": self.choice.placement,
            "reason": self.choice.reason,
            "activation_bytes": self.choice.activation_bytes,
            "free_device_bytes": self.choice.free_device_bytes,
            "free_host_bytes": self.choice.free_host_bytes,
            "peak_resident_bytes": self.meter.peak,
        }


@contextlib.contextmanager
def activation_pool(settings: OffloadSettings, needed: int, device: torch.device) -> Iterator[ActivationPool]:
    """Decide where this sweep's activations go, and remove the scratch folder however the sweep ends."""
    choice = choose_placement(settings.mode, needed, device)
    log.info("calibration activations: %s (%s; %.2f GiB for inputs + outputs)", choice.placement, choice.reason,
             needed / 2**30)
    folder = _scratch_folder(settings.folder, needed) if choice.placement == "disk" else None
    try:
        yield ActivationPool(choice, device, folder)
    finally:  # on success, error and Ctrl-C alike (SIGKILL leaves it; the next run in that folder removes it)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _scratch_folder(base: Path | None, needed: int) -> Path:
    from compress.engine.output import process_alive

    base = base if base is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    for left in base.glob(f"{SCRATCH_PREFIX}*"):  # from runs that were SIGKILLed
        pid = left.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    free = shutil.disk_usage(base).free
    if free < needed:
        raise UserError(f"calibration.offload: disk needs about {needed / 2**30:.2f} GiB in {base}, but "
                        f"{free / 2**30:.2f} GiB are free; set calibration.offload_dir to a bigger disk")
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=base))
