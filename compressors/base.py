"""Pieces every weight quantizer shares: its config schema, bit-plan lookup, mask keeping and write-back."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from compress.quant.bit_plan import bits_for
from compress.engine.context import RunContext
from compress.engine.threads import single_threaded
from compress.quant.float_records import FloatSpec, WeightFormat
from compress.quant.gguf_records import GGUFSpec, check_gguf_columns
from compress.quant.lookup_records import LookupSpec
from compress.quant.modules import set_weight_matrix, weight_matrix
from compress.quant.primitives import QuantSpec
from compress.quant.records import WeightRecord
from compress.recipe.errors import UserError
from compress.compressors.configs import WeightQuantConfig  # noqa: F401  (re-exported; defined without torch)


def spec_for(fqn: str, cfg: WeightQuantConfig, run: RunContext) -> WeightFormat:
    """The pass's own `plan` file, else the bit plan written by an allocation pass, else the pass's defaults."""
    if cfg.plan is not None:
        return cfg.spec(bits_for(fqn, run.cache.bit_plan_file(cfg.plan)))
    return run.handoff.bit_plan.get(fqn, cfg.spec())


def integer_spec_for(fqn: str, module: torch.nn.Module, cfg: WeightQuantConfig, run: RunContext,
                     pass_name: str) -> QuantSpec | GGUFSpec:
    """`checked_spec` for a pass that rounds onto integer grids only, uniform or a GGUF type's (awq): a plan naming
    an element-float format for `fqn` is refused."""
    spec = checked_spec(fqn, module, cfg, run)
    if isinstance(spec, LookupSpec):
        raise UserError(f"{pass_name}: the bit plan gives {fqn} the lookup-table format {spec.label}, and {pass_name} "
                        "rounds to integer codes only; use rtn or gptq after the plan")
    if isinstance(spec, FloatSpec):
        raise UserError(f"{pass_name}: the bit plan gives {fqn} the element-float format {spec.label}, and {pass_name} "
                        "rounds to integer codes only; use rtn or gptq after the plan")
    return spec


def checked_spec(fqn: str, module: torch.nn.Module, cfg: WeightQuantConfig, run: RunContext) -> WeightFormat:
    """`spec_for`, after checking that `fqn` can take it: NVFP4 / MXFP4 scale whole groups of 16 / 32 input columns,
    and an element-float format (from a plan too) takes no integer activations (float ones: FP8 W8A8, NVFP4 W4A4)."""
    spec = spec_for(fqn, cfg, run)
    if isinstance(spec, LookupSpec):
        if cfg.activations is not None:
            raise UserError(f"the bit plan gives {fqn} the lookup-table format {spec.label}, which is weight-only; "
                            "drop `activations` or the entry")
        return spec
    if isinstance(spec, GGUFSpec):  # a GGUF type's blocks cover whole columns (a plan may name it for any module)
        check_gguf_columns(fqn, weight_matrix(module).shape[1], spec)
        if cfg.activations is not None:
            raise UserError(f"the bit plan gives {fqn} the GGUF type {spec.label}, which is weight-only; drop "
                            "`activations` or the GGUF entry")
        return spec
    if not isinstance(spec, FloatSpec):
        return spec
    columns = weight_matrix(module).shape[1]
    if spec.group_size and columns % spec.group_size:
        raise UserError(f"{spec.format} scales groups of {spec.group_size} input columns, and {fqn} has {columns}: "
                        "add it to the pass's `ignore`, or use fp8 for it")
    if cfg.activations is not None and cfg.activations.format == "int":
        raise UserError(f"the bit plan gives {fqn} the element-float format {spec.label}, which is weight-only here; "
                        "`activations` (integer fake quantization) pairs with integer widths: drop it or the format")
    return spec


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
