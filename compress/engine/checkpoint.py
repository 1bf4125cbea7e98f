"""Layer checkpoints, so a run killed at any point (SIGKILL included) resumes from its last finished layer.

After each decoder layer of a sweep the engine saves, atomically (written into a temporary folder, then
renamed):
- the layer's compressed weights (its whole state dict, in its own dtype, so restoring is bit-exact);
- the pass state that layer produced: `run.results.records` records (their tensors and kind), `run.handoff.masks`, `run.handoff.bit_plan` and
  `run.results.activation_quant` entries of its modules, the fallbacks it added, and its per-module report entries;
- the *actual* inputs of the next layer. Recomputing them on resume would drift (auto-round measured a 20x
  larger loss on the first resumed block), so they are stored, not recomputed. Only the newest layer keeps
  them; older layers' inputs are deleted as soon as a newer layer is saved. One file per calibration batch,
  written one at a time, so offloaded activations (`calibration.offload`) are never all in memory at once.

Layout, beside the output folder (`out/run` -> `out/.run.resume/`):

    manifest.json                    fingerprints of the resolved recipe and of the model's files, so a changed
                                     recipe, or weights changed in place, are refused
    sweep-0/layer-0003/weights.safetensors, state.json, inputs/batch-00000.safetensors, ...

The folder is removed when the run finishes; an interrupted run (or one stopped by a full disk) leaves it for
`--resume`. It has no lock of its own: it belongs to its output folder, whose lock (`hold_output`,
compress/engine/output.py) the run holds from before this folder is opened until after it is removed, so no two
live runs ever share, adopt or delete each other's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.quant.activation import config_of, install_activation_quant
from compress.quant.kv_cache import install_kv_cache
from compress.engine.output import replace_atomically
from compress.recipe.errors import UserError
from compress.quant.float_records import format_from_description
from compress.quant.records import restore_record, saved_form

if TYPE_CHECKING:  # context.py imports this module for `Checkpointer`
    from compress.engine.context import RunContext

MANIFEST = "manifest.json"
INPUTS = "inputs"  # folder of a layer's checkpoint holding the next layer's inputs, one file per batch
# Test-only fault injection: "<k>:<SIGNAL>" sends SIGNAL to this process right after the k-th layer checkpoint
# (0-based, counted over the whole run), to prove that a run killed there resumes bit-identically.
FAULT_ENV = "COMPRESS_FAULT_AFTER_LAYER"


def checkpoint_dir_for(output: Path) -> Path:
    """Where the checkpoints of the run writing `output` live: a hidden sibling, never inside an old run."""
    return output.parent / f".{output.name}.resume"


# Where activations are kept changes memory use, not results (offloading is bit-exact), so a run that ran out of
# memory may resume with `offload: disk`.
PLACEMENT_KEYS = ("offload", "offload_dir")


def recipe_fingerprint(recipe: dict[str, Any]) -> str:
    calibration = recipe.get("calibration")
    if isinstance(calibration, dict):
        recipe = {**recipe, "calibration": {k: v for k, v in calibration.items() if k not in PLACEMENT_KEYS}}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


# The model's files are fingerprinted, not hashed in full: reading every byte of a 140 GB checkpoint twice (when a
# run starts and when it resumes) would add minutes. Size and mtime_ns catch any ordinary in-place write; the
# safetensors header and sampled blocks catch a file swapped for another with its timestamp preserved (cp -p,
# rsync -t). Files up to FULL_HASH_BYTES (configs, tokenizers, small models) are hashed whole.
FULL_HASH_BYTES = 4 * 2**20
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 64 * 2**10


def file_fingerprint(path: Path) -> str:
    """`size:mtime_ns:sha256` of `path`, the hash over its safetensors header (if any) and sampled blocks."""
    info = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        if info.st_size <= FULL_HASH_BYTES:
            digest.update(stream.read())
        else:
            if path.suffix == ".safetensors":  # 8-byte little-endian length, then the JSON of names, dtypes, offsets
                length = int.from_bytes(stream.read(8), "little")
                digest.update(stream.read(min(length, info.st_size)))
            step = (info.st_size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for block in range(SAMPLE_BLOCKS):  # the first and last blocks, and evenly spaced ones between
                stream.seek(block * step)
                digest.update(stream.read(SAMPLE_BYTES))
    return f"{info.st_size}:{info.st_mtime_ns}:{digest.hexdigest()[:16]}"


def model_files_fingerprint(model: str | None) -> dict[str, str]:
    """File name -> `file_fingerprint` for every file of a local model folder (hidden files are ours: locks, checkpoints).

    A hub id gives {}: its files are not on a path of ours to watch, and the recipe's fingerprint covers the id.
    """
    folder = Path(model) if model else None
    if folder is None or not folder.is_dir():
        return {}
    return {path.name: file_fingerprint(path) for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".")}


def changed_files(saved: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """Names of the model's files that differ between a checkpoint's manifest and now (added and removed included)."""
    if saved is None:  # checkpoints written before model files were fingerprinted
        return ["(not recorded by the version that made these checkpoints)"]
    return sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))


def resume_refusal(folder: Path, fingerprint: str, model_files: dict[str, str]) -> str | None:
    """Why the checkpoints in `folder` cannot continue this run; None when they can."""
    try:
        saved = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"the checkpoints in {folder} have no readable {MANIFEST}"
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        recorded = saved.get("fingerprint") if isinstance(saved, dict) else None
        return (f"the checkpoints in {folder} were made by a different recipe or model "
                f"(fingerprint {recorded}, this run {fingerprint})")
    changed = changed_files(saved.get("model_files"), model_files)
    if changed:
        return (f"the model's files changed since the checkpoints in {folder} were made ({', '.join(changed[:5])}"
                f"{f' and {len(changed) - 5} more' if len(changed) > 5 else ''}): its weights may differ")
    return None


def _contiguous_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage or are not contiguous; copies on the CPU avoid both.
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


@dataclass
class LayerState:
    """What one finished layer left behind, as read back from its checkpoint."""

    modules: dict[str, dict[str, Any]]  # step label -> module fqn -> report entry
    seconds: dict[str, float]  # step label -> seconds spent on this layer
    damage: dict[str, dict[str, Any]] = field(default_factory=dict)  # output errors (compress/engine/damage.py)
    # step label -> part of the pass ("statistics", "solve", ...) -> seconds, for passes that time their parts
    parts: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Resumed:
    """Where a sweep continues: the first layer still to do and, if the sweep has inputs, that layer's inputs."""

    next_layer: int
    hidden_files: list[Path] | None  # one per calibration batch, in order; read each with `read_hidden`
    layers: list[LayerState] = field(default_factory=list)


class Checkpointer:
    """Saves every finished layer of every sweep; on resume, restores them and says where to continue."""

    def __init__(self, folder: Path, fingerprint: str, *, resume: bool, model_files: dict[str, str] | None = None):
        self.folder = folder
        self.fingerprint = fingerprint
        self.model_files = model_files or {}
        self.sweeps_started = 0
        self.layers_saved = 0
        self._open(resume)

    def _open(self, resume: bool) -> None:
        manifest = self.folder / MANIFEST
        if self.folder.exists() and not resume:
            raise UserError(
                f"an interrupted run left checkpoints in {self.folder}: add --resume to continue it, "
                f"or delete that folder to start over"
            )
        if resume and manifest.is_file():
            refusal = resume_refusal(self.folder, self.fingerprint, self.model_files)
            if refusal is not None:
                raise UserError(f"cannot resume: {refusal}; delete that folder to start over")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        replace_atomically(manifest, json.dumps({"fingerprint": self.fingerprint, "model_files": self.model_files}) + "\n")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- one sweep ---------------------------------------------------------------------------------------

    def begin_sweep(self) -> Path:
        """The folder of the next sweep; sweeps are numbered in the (fixed) order the recipe runs them."""
        folder = self.folder / f"sweep-{self.sweeps_started}"
        self.sweeps_started += 1
        return folder

    def restore(self, sweep: Path, layers: nn.ModuleList, prefix: str, run: RunContext) -> Resumed:
        """Load every consecutive finished layer of `sweep` into the model and `run`; say where to go on."""
        states: list[LayerState] = []
        index = 0
        while (sweep / f"layer-{index:04d}" / "state.json").is_file():
            states.append(self._restore_layer(sweep / f"layer-{index:04d}", layers[index], f"{prefix}.{index}", run))
            index += 1
        hidden_files = None
        if index:
            inputs = sweep / f"layer-{index - 1:04d}" / INPUTS
            if inputs.is_dir():
                hidden_files = sorted(inputs.glob("batch-*.safetensors"))
        return Resumed(index, hidden_files, states)

    def _restore_layer(self, folder: Path, layer: nn.Module, prefix: str, run: RunContext) -> LayerState:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "weights.safetensors"))
        layer.load_state_dict({k[len("layer."):]: v for k, v in tensors.items() if k.startswith("layer.")}, strict=True)
        for fqn, entry in state["quantized"].items():
            run.results.records[fqn] = restore_record(entry, lambda part: tensors[f"quantized.{fqn}.{part}"])
        for fqn in state["masks"]:
            run.handoff.masks[fqn] = tensors[f"mask.{fqn}"]
        for fqn, described in state["bit_plan"].items():
            run.handoff.bit_plan[fqn] = format_from_description(described)
        self._reinstall_activation_quant(layer, prefix, state["activation_quant"], run)
        self._reinstall_kv_cache(layer, prefix, state.get("kv_cache", {}), run)
        run.results.fallbacks.extend(state["fallbacks"])
        # older checkpoints: no damage, no parts
        return LayerState(state["modules"], state["seconds"], state.get("damage", {}), state.get("parts", {}))

    @staticmethod
    def _reinstall_activation_quant(layer: nn.Module, prefix: str, settings: dict[str, Any], run: RunContext) -> None:
        # Activation quantization lives in forward hooks, which a state dict does not carry.
        modules = dict(layer.named_modules(prefix=prefix))
        for fqn, saved in settings.items():  # the calibrated scales too: a resumed run does not re-calibrate
            cfg, calibrated = config_of(saved)
            install_activation_quant(fqn, modules[fqn], cfg, run.results.activation_quant, calibrated)

    @staticmethod
    def _reinstall_kv_cache(layer: nn.Module, prefix: str, settings: dict[str, Any], run: RunContext) -> None:
        if not settings:
            return
        modules = dict(layer.named_modules(prefix=prefix))
        for fqn, saved in settings.items():
            install_kv_cache(fqn, modules[fqn], saved, run.results.kv_cache)

    def save(
        self,
        sweep: Path,
        index: int,
        layer: nn.Module,
        prefix: str,
        run: RunContext,
        layer_state: LayerState,
        fallbacks: list[dict[str, Any]],
        next_hidden: Iterable[torch.Tensor] | None,
    ) -> None:
        """Write layer `index` of `sweep` atomically, then drop the previous layer's (now stale) inputs.

        `next_hidden` yields the next layer's input per calibration batch; each is written before the next is read.
        """
        final = sweep / f"layer-{index:04d}"
        staging = sweep / f".layer-{index:04d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        owned = f"{prefix}."
        tensors = {f"layer.{k}": v for k, v in layer.state_dict().items()}
        records: dict[str, dict[str, Any]] = {}  # fqn -> the entry that rebuilds its record from the tensors
        for fqn, record in run.results.records.items():
            if fqn.startswith(owned):
                parts, records[fqn] = saved_form(record)
                tensors.update({f"quantized.{fqn}.{part}": tensor for part, tensor in parts.items()})
        masks = [fqn for fqn in run.handoff.masks if fqn.startswith(owned)]
        tensors.update({f"mask.{fqn}": run.handoff.masks[fqn] for fqn in masks})
        save_file(_contiguous_copy(tensors), str(staging / "weights.safetensors"))
        if next_hidden is not None:
            (staging / INPUTS).mkdir()
            for batch, hidden in enumerate(next_hidden):
                save_file(_contiguous_copy({"hidden": hidden}), str(staging / INPUTS / f"batch-{batch:05d}.safetensors"))
                del hidden  # freed before the next batch is read
        state = {
            "modules": layer_state.modules,
            "seconds": layer_state.seconds,
            "damage": layer_state.damage,
            "parts": layer_state.parts,
            "quantized": records,
            "masks": masks,
            "bit_plan": {fqn: s.describe() for fqn, s in run.handoff.bit_plan.items() if fqn.startswith(owned)},
            "activation_quant": {fqn: c for fqn, c in run.results.activation_quant.items() if fqn.startswith(owned)},
            "kv_cache": {fqn: c for fqn, c in run.results.kv_cache.items() if fqn.startswith(owned)},
            "fallbacks": fallbacks,
        }
        (staging / "state.json").write_text(json.dumps(state), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the layer counts as finished only once this rename happened
        shutil.rmtree(sweep / f"layer-{index - 1:04d}" / INPUTS, ignore_errors=True)
        self.layers_saved += 1
        _inject_fault(self.layers_saved - 1)


def read_hidden(path: Path) -> torch.Tensor:
    """One calibration batch's hidden states from a layer checkpoint (see `Checkpointer.save`)."""
    return load_file(str(path))["hidden"]


def _inject_fault(layer_count: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, _, name = spec.partition(":")
    if int(at) == layer_count:
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))
