"""Pieces every weight quantizer shares: its config schema, bit-plan lookup, mask keeping and write-back."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.quant.bit_plan import bits_for
from compress.engine.context import RunContext
from compress.engine.threads import single_threaded
from compress.quant.modules import DEFAULT_IGNORE, set_weight_matrix, weight_matrix
from compress.quant.activation import ActivationQuantConfig
from compress.quant.primitives import PerChannel, PerGroup, QuantSpec
from compress.quant.records import WeightRecord
from compress.recipe.registry import ModulePatterns, StrictConfig


class WeightQuantConfig(StrictConfig):
    """Uniform integer weight quantization settings shared by rtn, gptq and awq.

    group_size: input columns per scale; `null` or -1 means one scale per output channel. A width the group
    size does not divide gets a shorter last group. plan: a bit plan file (see compress/quant/bit_plan.py) whose
    entries override `bits` per module; it wins over a plan from an earlier `allocate` pass.
    """

    path_fields: ClassVar[tuple[str, ...]] = ("plan",)  # resolved against the recipe's folder at load

    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, le=1_048_576)
    symmetric: bool = True
    ignore: ModulePatterns = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    activations: ActivationQuantConfig | None = None
    plan: str | None = None

    @field_validator("group_size")
    @classmethod
    def _per_channel_spelling(cls, value: int | None) -> int | None:
        if value is None or value == -1:
            return None
        if value < 1:
            raise ValueError("group_size must be a positive number of columns, or null / -1 for per-channel")
        return value

    def spec(self, bits: int | None = None) -> QuantSpec:
        granularity = PerChannel() if self.group_size is None else PerGroup(self.group_size)
        return QuantSpec(self.bits if bits is None else bits, self.symmetric, granularity)


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
