"""What every evaluator returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalResult:
    metric: str  # "perplexity"
    label: str  # which data set, e.g. "wikitext2" or "eval"
    value: float
    details: dict[str, Any] = field(default_factory=dict)  # protocol, version, token counts
