"""Bit plan files: `bit_plan.yaml` as `allocate` writes it and as a user may hand-edit it.

    # comments are free
    model.layers.0.self_attn.q_proj: 4       # an exact module name
    "*.down_proj": 3                           # a glob on the name (or its last parts), or "re:<regex>"
    model.layers.1.mlp.up_proj: nvfp4          # an element-float format: fp8, fp8-tensor, fp8-block, nvfp4, mxfp4
    model.layers.1.mlp.down_proj: "gguf:q6_k"  # a GGUF block type (gguf:q4_0 ... gguf:q6_k)

Precedence: an exact module name wins; otherwise the first pattern in file order that matches. Modules that no
entry names keep the quantizer's own format. Group size and symmetry of integer widths always come from the
quantizer's config; an element-float format brings its own scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import yaml

from compress.recipe.errors import UserError
from compress.quant.config import PLAN_LABELS
from compress.quant.modules import matches
from compress.recipe.registry import did_you_mean

MIN_BITS, MAX_BITS = 2, 8

PlanEntry = int | str
"""What a plan gives a module: an integer width, or an element-float format by name (PLAN_LABELS: element floats, `gguf:q4_k` and the other GGUF types)."""


def valid_entry(value: object) -> bool:
    if isinstance(value, str):
        return value in PLAN_LABELS
    return isinstance(value, int) and not isinstance(value, bool) and MIN_BITS <= value <= MAX_BITS


def read_plan(path: str | Path) -> dict[str, PlanEntry]:
    """Module name or pattern -> bits (or float format), in file order. Raises UserError naming the file and entry."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"bit plan not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: a bit plan is a mapping of module name (or pattern) to bits, e.g. "
                        "`model.layers.0.mlp.down_proj: 4`")
    plan: dict[str, PlanEntry] = {}
    for name, bits in data.items():
        if not valid_entry(bits):
            raise UserError(f"{path}: {name}: bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r} (or "
                            f"name a format: {', '.join(PLAN_LABELS)})")
        plan[str(name)] = bits
    return plan


def bits_for(fqn: str, plan: dict[str, PlanEntry]) -> PlanEntry | None:
    if fqn in plan:
        return plan[fqn]
    return next((bits for pattern, bits in plan.items() if _is_pattern(pattern) and matches(fqn, pattern)), None)


def _is_pattern(name: str) -> bool:
    return name.startswith("re:") or any(ch in name for ch in "*?[")


def check_plan_names(plan: dict[str, PlanEntry], modules: Iterable[str], source: str) -> None:
    """Every exact name in the plan must be a quantizable module: a typo would otherwise be silently ignored."""
    known = list(modules)
    known_set = set(known)
    for name in plan:
        if _is_pattern(name) or name in known_set:
            continue
        if not any(matches(fqn, name) for fqn in known):  # "down_proj" alone is a suffix match, not a typo
            raise UserError(f"{source}: '{name}' names no quantizable module.{did_you_mean(name, known)[:400]}")


def dump_plan(bits: dict[str, PlanEntry], header: Iterable[str] = ()) -> str:
    """The plan as YAML, module order kept, with `# ` header lines (budget, estimator) on top."""
    lines = [f"# {line}" for line in header]
    lines += [f"{name}: {value}" for name, value in bits.items()]
    return "\n".join(lines) + "\n"
