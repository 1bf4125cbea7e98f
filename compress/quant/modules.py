"""Finding the weight matrices a pass works on, and reading/writing them in (out, in) layout.

GPT-2 stores its projections as `transformers.pytorch_utils.Conv1D` with the weight transposed
(in, out); every algorithm here sees (out_features, in_features), so the transpose lives only here.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable, cast

import torch
from torch import nn

try:  # Conv1D is GPT-2's linear layer; keep working if a future transformers moves it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

from compress.quant.config import DEFAULT_IGNORE  # noqa: E402,F401  (defined without torch, for the configs)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view for Conv1D, so treat it as read-only."""
    weight = cast(torch.Tensor, module.weight).data
    return weight.t() if isinstance(module, Conv1D) else weight


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an (out_features, in_features) matrix back in the module's own layout and dtype."""
    target = cast(torch.Tensor, module.weight).data
    target.copy_(w.t() if isinstance(module, Conv1D) else w)


def matches(fqn: str, pattern: str) -> bool:
    """`re:<regex>` searches the fully qualified name; otherwise a glob on the name or on its last parts.

    "lm_head", "*.mlp.down_proj", "down_proj" and "re:layers\\.0\\." all work as users expect.
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], fqn) is not None
    return fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(fqn, "*." + pattern)


def select(names: Iterable[str], ignore: Iterable[str]) -> list[str]:
    patterns = list(ignore)
    return [name for name in names if not any(matches(name, p) for p in patterns)]


def find_linears(root: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Every linear layer under `root`, keyed by fully qualified name in forward-definition order."""
    return {
        f"{prefix}.{name}" if prefix else name: module
        for name, module in root.named_modules()
        if name and is_linear(module)
    }
