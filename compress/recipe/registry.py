"""Registries keyed by the names recipes use: passes (`rtn`, `gptq`, ...) and evaluators (`perplexity`).

A new algorithm is one module plus one decorator:

    @register_pass("rtn", RTNConfig, scope="layer")
    def run_rtn(layer: LayerContext, cfg: RTNConfig) -> dict[str, dict]: ...

Registration is explicit (no package scanning). Built-in passes live in `compress.compressors`, built-in
evaluators in `compress.evaluators`; `compress.app.builtins` lists them and registers them when imported, so this
module (the bottom layer) never imports a plugin and `import compress` stays light.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict

Scope = Literal["layer", "model"]

PassKind = Literal["quantize", "prune", "allocate", "allocate_sparsity", "transform"]
"""What a pass does, which recipe checks and the runner read (compress/recipe/schema.py, export_config.py):

- "quantize": rounds weights to integer codes (rtn, gptq, awq, bnb); the first one after a model pass is that
  pass's `next_quantizer`, and an export format must match it.
- "prune": zeroes or removes weights (magnitude, wanda, sparsegpt, layer_drop, width_prune).
- "allocate": writes the bit plan a later quantizer follows (allocate, quantize_plan); needs a quantize pass after it.
- "allocate_sparsity": writes the per-layer sparsity later pruning follows (owl); needs a prune pass after it.
- "transform": rescales weights, leaving what the model computes unchanged (smoothquant); must come before
  any quantizer.
"""


class StrictConfig(BaseModel):
    """Base of every pass and evaluator config: unknown keys are errors and configs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class PassDef:
    """A registered pass.

    scope="layer": `apply(layer_ctx, cfg) -> {module_fqn: result}` runs inside the sequential decoder-layer
    engine, once per layer; consecutive layer passes share one sweep over the model.
    scope="model": `apply(model_handle, cfg, run_ctx, next_quantizer) -> {module_fqn: result}` sees the whole
    model (bit and sparsity allocation, structured pruning, bitsandbytes). `next_quantizer` is the config of the
    first pass of kind "quantize" after this one in the recipe, or None when there is none: an allocation pass
    takes the group size, symmetry and ignore list its plan must fit from there. Every model pass accepts it
    (default None, so a test can call one with three arguments); most ignore it.
    """

    name: str
    config: type[StrictConfig]
    apply: Callable[..., dict[str, Any]]
    scope: Scope
    needs_calibration: bool
    kind: PassKind  # what the pass does to the model, for recipe-level checks (see PassKind)
    # Calibrates correctly when each torchrun rank sees only its share of the windows (its statistics are summed
    # across ranks); a calibrated pass without it would quietly calibrate on a fraction of the data.
    data_parallel: bool = False
    # What the pass leaves in the model that an export format must hold, in compress/recipe/storage.py's words (e.g.
    # "bitsandbytes modules"), so a recipe whose format cannot hold it is refused at load. Optional: the writers
    # check the records themselves at export; a pass storing only what every format holds declares nothing.
    stores: frozenset[str] = frozenset()

    @property
    def summary(self) -> str:
        doc = (self.apply.__doc__ or self.config.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass(frozen=True)
class EvalResult:
    """What every evaluator returns."""

    metric: str  # "perplexity"
    label: str  # which data set, e.g. "wikitext2" or "eval"
    value: float
    details: dict[str, Any] = field(default_factory=dict)  # protocol, version, token counts


@dataclass(frozen=True)
class EvaluatorDef:
    """A registered evaluator: `apply(model_handle, cfg, run_ctx) -> EvalResult`."""

    name: str
    config: type[StrictConfig]
    apply: Callable[..., Any]

    @property
    def summary(self) -> str:
        doc = (self.apply.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_PASSES: dict[str, PassDef] = {}
_EVALUATORS: dict[str, EvaluatorDef] = {}


def register_pass(
    name: str,
    config: type[StrictConfig],
    *,
    scope: Scope,
    kind: PassKind,
    needs_calibration: bool = False,
    data_parallel: bool = False,
    stores: Iterable[str] = (),
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    def decorate(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in _PASSES:
            raise ValueError(f"pass {name!r} is registered twice ({_PASSES[name].apply.__module__} and {fn.__module__})")
        _PASSES[name] = PassDef(name, config, fn, scope, needs_calibration, kind, data_parallel, frozenset(stores))
        return fn

    return decorate


def register_evaluator(name: str, config: type[StrictConfig]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _EVALUATORS:
            raise ValueError(f"evaluator {name!r} is registered twice")
        _EVALUATORS[name] = EvaluatorDef(name, config, fn)
        return fn

    return decorate


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f" Did you mean: {close[0]}?" if close else ""
    return f"{hint} Available: {', '.join(sorted(choices))}"


def available_passes() -> dict[str, PassDef]:
    """Every registered pass. The built-ins register when `compress.app.builtins` is imported (the runner and the
    CLI do); the core never imports a plugin."""
    return dict(_PASSES)


def available_evaluators() -> dict[str, EvaluatorDef]:
    return dict(_EVALUATORS)
