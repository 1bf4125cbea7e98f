"""Pieces every weight quantizer shares: its config schema, bit-plan lookup, mask keeping and write-back."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from compress.quant.bit_plan import bits_for
from compress.engine.context import RunContext
from compress.engine.threads import single_threaded
from compress.quant.modules import set_weight_matrix, weight_matrix
from compress.quant.primitives import QuantSpec
from compress.quant.records import WeightRecord
from compress.compressors.configs import WeightQuantConfig  # noqa: F401  (re-exported; defined without torch)


def spec_for(fqn: str, cfg: WeightQuantConfig, run: RunContext) -> QuantSpec:
    """The pass's own `plan` file, else the bit plan written by an allocation pass, else the pass's defaults."""
    if cfg.plan is not None:
        return cfg.spec(bits_for(fqn, run.cache.bit_plan_file(cfg.plan)))
    return run.handoff.bit_plan.get(fqn, cfg.spec())


Record = TypeVar("Record", bound=WeightRecord)


def keep_pruned_zeros(qweight: Record, mask: torch.Tensor | None) -> Record:
    """The record with pruned weights dequantizing to exactly 0 (how is the record's business: `keep_zeros`)."""
    return qweight if mask is None else qweight.keep_zeros(mask)


def write_back(fqn: str, module: nn.Module, qweight: WeightRecord, run: RunContext) -> dict[str, Any]:
    """Replace the module's weight by the record's dequantized matrix and keep the record (on the CPU) for export.

    Returns the per-module report entry: the record's settings and the relative Frobenius error it introduced.
    """
    original = weight_matrix(module).float().clone()  # .float() aliases float32 weights, which we overwrite
    dequantized = qweight.dequantize().to(original.device)
    set_weight_matrix(module, dequantized)
    run.results.records[fqn] = qweight.to("cpu")
    with single_threaded():  # a whole-matrix norm sums one partial per thread (compress/engine/threads.py)
        error = (dequantized - original).norm() / original.norm().clamp_min(1e-12)
    return {**qweight.describe(), "weight_rel_error": round(error.item(), 6)}
