"""The recipe's `export:` section and the check that the chosen format can hold the recipe's scheme.

    export: {format: compressed-tensors, path: out/model-w4}     # path relative to the recipe's folder
    export: {format: gptq}                                       # default path: RUN_DIR/export-gptq

The check runs at recipe load, before any model or calibration data is touched. It knows what passes declare they
store (`register_pass(..., stores=...)`, the words of compress/recipe/storage.py) and, for GPTQ, the settings its
writer would refuse (bits, activations, a mixed plan, N:M); it does not look at pass names. The authority is the
writer at export time, which checks every weight record before writing anything (compress/export/common.py
`writable_records`): a pass that declares nothing, or a record a declared pass did not foresee, is refused there.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from compress.recipe.registry import StrictConfig
from compress.recipe.storage import BITSANDBYTES_MODULES, formats_holding, unheld

ExportFormat = Literal["compressed-tensors", "gptq", "dense", "bitsandbytes", "gguf"]
FORMATS: tuple[str, ...] = ("compressed-tensors", "gptq", "dense", "bitsandbytes", "gguf")
GPTQ_BITS = (2, 4, 8)  # whole codes per int32 word; 3-bit GPTQ packing straddles words and is not written


class ExportConfig(StrictConfig):
    """Where and how to save the compressed checkpoint at the end of a run.

    format: compressed-tensors (vLLM, transformers), gptq (transformers' GPTQ integration), dense
    (dequantized weights, any runtime), bitsandbytes (only after the `bnb` pass) or gguf (llama.cpp: one
    `model.gguf` in the export folder; quantizers write GGUF codes with `format: "gguf:q4_k"` and the like).
    dtype: precision of unquantized tensors and scales; `auto` keeps the source checkpoint's.
    """

    format: ExportFormat = "compressed-tensors"
    path: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"


def _params(step: Any) -> dict[str, Any]:
    return step.config.model_dump()


def _is_structured_pruning(params: dict[str, Any]) -> bool:
    """A pruning config that asks for an N:M pattern (`pattern: "2:4"` on magnitude, wanda and sparsegpt)."""
    return params.get("pattern") not in (None, "unstructured")


def format_problems(fmt: str, steps: Sequence[Any]) -> list[str]:
    """Why `fmt` cannot hold what the passes `steps` (recipe PassSteps) produce; empty when it can."""
    stores = {id(step): step.definition.stores_of(step.config) for step in steps}
    problems = [_unheld_problem(step.name, part, fmt) for step in steps for part in unheld(stores[id(step)], fmt)]
    if fmt == "bitsandbytes" and not any(BITSANDBYTES_MODULES in stores[id(step)] for step in steps):
        problems.append("format 'bitsandbytes' saves a model quantized by the bnb pass; add `- bnb: {mode: nf4}` or choose compressed-tensors")
    if fmt == "gptq":
        problems.extend(_gptq_problems(steps))
    if fmt == "gguf":
        problems.extend(f"the gguf format holds weights only; '{step.name}' quantizes {what}: drop it, or use "
                        "format compressed-tensors" for step in steps
                        for what in (["activations"] if _params(step).get("activations") else []))
        problems.extend(_gguf_problems(steps))
    if fmt in ("gptq", "bitsandbytes", "gguf"):
        problems.extend(f"the {fmt} format has no KV-cache scales ('{step.name}'): use format compressed-tensors"
                        for step in steps if step.kind == "quantize_cache")
    return problems


def _gguf_problems(steps: Sequence[Any]) -> list[str]:
    """Integer codes the GGUF writer would refuse after the whole run, caught at load: a quantizer whose own format
    is not a GGUF type (unless a plan names the modules' types), or integer allocate candidates."""
    problems = []
    planned = any(step.kind == "allocate" for step in steps)  # a plan (allocate, quantize_plan) names the types
    for step in steps:
        params = _params(step)
        widths = [c for c in params.get("candidates", []) if not (isinstance(c, str) and c.startswith("gguf:"))]
        if step.kind == "allocate" and widths:
            problems.append(f"the gguf format holds GGUF block types only; '{step.name}' may give modules "
                            f"{', '.join(map(str, widths))}, which no GGUF type holds: make every candidate a "
                            'GGUF type ("gguf:q4_k", ...)')
        fmt = str(params.get("format", "gguf:"))  # a quantizer without `format` (bnb) is checked by what it stores
        if step.kind == "quantize" and not fmt.startswith("gguf:") and not planned and not params.get("plan"):
            problems.append(f"the gguf format holds GGUF block types only; '{step.name}' rounds to {fmt} codes: give "
                            f'it format: "gguf:q4_k" (or another type), or use format compressed-tensors')
    return problems


def _unheld_problem(pass_name: str, part: str, fmt: str) -> str:
    holders = " or ".join(repr(holder) for holder in formats_holding(part))
    return f"the {pass_name} pass produces {part}, which only the {holders} format saves (got {fmt!r})"


def _gptq_problems(steps: Sequence[Any]) -> list[str]:
    """Settings the GPTQ writer would refuse at export, caught at load: one weight-only bit width, no N:M."""
    problems = []
    for step in steps:
        if step.kind != "quantize":
            continue
        params = _params(step)
        if params.get("activations"):
            problems.append(f"the GPTQ layout holds weight-only quantization; '{step.name}' also quantizes activations "
                            "(W8A8): use format compressed-tensors")
        if "bits" in params and params["bits"] not in GPTQ_BITS:
            problems.append(f"the GPTQ layout is written for {', '.join(map(str, GPTQ_BITS))} bits; '{step.name}' uses "
                            f"{params['bits']}: use format compressed-tensors")
    if any(s.kind == "allocate" for s in steps):
        problems.append("the GPTQ layout has one bit width for the whole model; a bit allocation pass makes a mixed "
                        "plan: use format compressed-tensors (one config group per bit width)")
    for step in steps:
        if step.kind == "prune" and _is_structured_pruning(_params(step)):
            problems.append(f"the GPTQ layout cannot carry N:M sparsity metadata ('{step.name}'): use format "
                            "compressed-tensors, which marks 2:4 for sparse kernels")
    return problems
