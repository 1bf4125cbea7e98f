"""State that one run owns and passes share: calibration data, bit plans, masks and quantization records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from compress.engine.activations import OffloadSettings
from compress.engine.checkpoint import Checkpointer
from compress.engine.progress import SILENT, Reporter
from compress.quant.primitives import QuantSpec
from compress.quant.records import WeightRecord


@dataclass
class RunContext:
    """Owned by the caller of a run; nothing here is global.

    - `calibration`: (samples, seq_len) token windows, or None when no pass needs inputs.
    - `bit_plan`: module fqn -> QuantSpec, written by allocation passes and read by quantizers.
    - `masks`: module fqn -> bool tensor (out, in), True where a weight survived pruning; quantizers keep zeros at zero.
    - `layer_sparsity`: decoder-layer prefix -> sparsity, written by a sparsity allocation pass (OWL) and read by
      the pruning passes, as `bit_plan` is by the quantizers.
    - `quantized`: module fqn -> its weight record (compress/quant/records.py: codes, scales, ...), kept for export.
    - `activation_quant`: module fqn -> activation quantization settings installed as forward hooks.
    - `fallbacks`: every place a pass degraded (e.g. a Cholesky failure), reported, never silent.
    - `cache`: values computed once per run and read again, e.g. an evaluation text's token ids, which the
      baseline and the compressed evaluation share.
    - `report_sections`: whole-run results a pass adds to report.json under its own key (e.g. "allocation":
      the bit plan, sensitivities and Pareto frontier), beyond the per-module entries every pass returns.
    - `run_files`: files a pass wants in the run directory, relative name -> text (e.g. "bit_plan.yaml");
      written into the staging folder, so they appear only with a complete run.
    - `next_quantizer`: while a model-scope pass runs, the config of the first quantize pass after it (an
      allocation pass takes the group size, symmetry and ignore list its plan must fit from there).
    - `checkpoint`: saves each finished decoder layer so an interrupted run can `--resume` (None: no checkpoints).
    - `offload`: where a sweep keeps its calibration activations (`calibration.offload`; compress/engine/activations.py).
      The default keeps them on the compute device; the runner passes the recipe's choice.
    """

    device: torch.device
    calibration: torch.Tensor | None = None
    calibration_batch_size: int = 8
    bit_plan: dict[str, QuantSpec] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    quantized: dict[str, WeightRecord] = field(default_factory=dict)
    activation_quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    reporter: Reporter = SILENT
    cache: dict[Any, Any] = field(default_factory=dict)
    report_sections: dict[str, Any] = field(default_factory=dict)
    run_files: dict[str, str] = field(default_factory=dict)
    next_quantizer: Any = None
    checkpoint: Checkpointer | None = None
    offload: OffloadSettings = field(default_factory=OffloadSettings)
