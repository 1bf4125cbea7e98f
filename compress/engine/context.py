"""State that one run owns and its passes share, in four parts with one direction each.

- `RunInputs`: what every pass reads and none writes (device, calibration windows, reporter, checkpointing).
- `Handoff`: what a pass hands the passes after it (bit plan, pruning masks, per-layer sparsity).
- `RunResults`: what the run collects for report.json, the run folder and the export.
- `RunCache`: values computed once per run and read again (an evaluation text's token ids, a plan file).

`RunContext` holds the four, so every pass still takes one `run: RunContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from compress.engine.activations import OffloadSettings
from compress.engine.checkpoint import Checkpointer
from compress.engine.progress import SILENT, Reporter
from compress.quant.bit_plan import PlanEntry, read_plan
from compress.quant.float_records import WeightFormat
from compress.quant.records import WeightRecord

T = TypeVar("T")


@dataclass
class RunInputs:
    """What a pass reads; the caller sets it up before the first pass and no pass writes it.

    - `device`: where the layer being processed (and evaluation) runs.
    - `calibration`: (samples, seq_len) token windows, or None when no pass needs inputs; under torchrun, this
      rank's share of them (compress/engine/distributed.py).
    - `calibration_batch_size`: windows per forward pass while calibrating.
    - `reporter`: progress bars and notes (compress/engine/progress.py); silent by default.
    - `checkpoint`: saves each finished decoder layer so an interrupted run can `--resume` (None: no checkpoints).
    - `offload`: where a sweep keeps its calibration activations (`calibration.offload`;
      compress/engine/activations.py). The default keeps them on the compute device; the runner passes the
      recipe's choice.
    """

    device: torch.device
    calibration: torch.Tensor | None = None
    calibration_batch_size: int = 8
    reporter: Reporter = SILENT
    checkpoint: Checkpointer | None = None
    offload: OffloadSettings = field(default_factory=OffloadSettings)


@dataclass
class Handoff:
    """What a pass hands the passes after it; each channel has one kind of writer and one kind of reader.

    - `bit_plan`: module fqn -> QuantSpec or FloatSpec (compress/quant/float_records.py), written by allocation
      passes (allocate, quantize_plan) and read by the quantizers.
    - `masks`: module fqn -> bool tensor (out, in), True where a weight survived pruning; written by pruning
      passes, read by quantizers (which keep pruned weights at exactly zero) and by the export.
    - `layer_sparsity`: decoder-layer prefix -> sparsity, written by a sparsity allocation pass (OWL) and read
      by the pruning passes, as `bit_plan` is by the quantizers.
    """

    bit_plan: dict[str, WeightFormat] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResults:
    """What the run collects: report.json, the run folder and the export are made from it.

    - `records`: module fqn -> the weight record of a quantized linear (compress/quant/records.py), kept for export
      (a lazy run keeps only their shapes once a layer is written).
    - `activation_quant`: module fqn -> activation quantization settings installed as forward hooks (with the
      calibrated scales of static formats, compress/quant/activation.py).
    - `kv_cache`: attention module fqn -> its quantized KV cache's settings and scales (compressors/kv_cache.py).
    - `fallbacks`: every place a pass degraded (e.g. a Cholesky failure), reported, never silent.
    - `report_sections`: whole-run results a pass adds to report.json under its own key (e.g. "allocation":
      the bit plan, sensitivities and Pareto frontier), beyond the per-module entries every pass returns.
    - `run_files`: files a pass wants in the run directory, relative name -> text (e.g. "bit_plan.yaml");
      written into the staging folder, so they appear only with a complete run.
    """

    records: dict[str, WeightRecord] = field(default_factory=dict)
    activation_quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv_cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    report_sections: dict[str, Any] = field(default_factory=dict)
    run_files: dict[str, str] = field(default_factory=dict)


class RunCache:
    """Values computed once per run and read again: the baseline and the compressed evaluation read the same
    text and score the same documents, and every module of a quantizer reads the same plan file."""

    def __init__(self) -> None:
        self._token_ids: dict[str, torch.Tensor] = {}
        self._plans: dict[str, dict[str, PlanEntry]] = {}
        self._task_docs: dict[tuple[str, str, int | None], Any] = {}

    def token_ids(self, dataset: str, tokenize: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The token ids of evaluation text `dataset`, from `tokenize()` the first time it is asked for."""
        if dataset not in self._token_ids:
            self._token_ids[dataset] = tokenize()
        return self._token_ids[dataset]

    def bit_plan_file(self, path: str | Path) -> dict[str, PlanEntry]:
        """The bit plan file at `path` (module name or pattern -> bits), read once."""
        key = str(path)
        if key not in self._plans:
            self._plans[key] = read_plan(path)
        return self._plans[key]

    def task_docs(self, task: str, data_dir: str, limit: int | None, load: Callable[[], T]) -> T:
        """The documents of a zero-shot task (read from `data_dir`, at most `limit`), from `load()` the first time."""
        key = (task, data_dir, limit)
        if key not in self._task_docs:
            self._task_docs[key] = load()
        docs: T = self._task_docs[key]
        return docs


@dataclass
class RunContext:
    """Owned by the caller of a run; nothing here is global. See the module docstring for the four parts."""

    inputs: RunInputs
    handoff: Handoff = field(default_factory=Handoff)
    results: RunResults = field(default_factory=RunResults)
    cache: RunCache = field(default_factory=RunCache)
