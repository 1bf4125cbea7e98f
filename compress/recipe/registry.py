"""Registries keyed by the names recipes use: passes (`rtn`, `gptq`, ...) and evaluators (`perplexity`).

A new algorithm is one module plus one decorator:

    @register_pass("rtn", RTNConfig, scope="layer", kind="quantize")
    def run_rtn(layer: LayerContext, cfg: RTNConfig) -> dict[str, dict]: ...

or, to keep its torch code unimported until a run needs it, a declaration naming the implementation:

    declare_pass("rtn", RTNConfig, "compress.compressors.rtn:run_rtn", scope="layer", kind="quantize")

Registration is explicit (no package scanning). Built-in passes live in `compress.compressors`, built-in
evaluators in `compress.evaluators`; `compress.app.builtins` declares them with their configs (from modules that
do not import torch) when imported, so this module (the bottom layer) never imports a plugin until a recipe runs
one, and `compress validate` checks a recipe without importing torch.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

Scope = Literal["layer", "model"]

PassKind = Literal["restructure", "rotate", "quantize", "quantize_embeddings", "prune", "allocate", "allocate_sparsity",
                   "transform", "compensate", "quantize_cache"]
"""What a pass does, which recipe checks and the runner read (compress/recipe/schema.py, export_config.py):

- "restructure": removes whole decoder layers, heads or channels, so module names or shapes change (layer_drop,
  width_prune).
- "rotate": rotates every weight by orthogonal matrices, leaving what the model computes unchanged (rotate); comes
  first with restructuring, since pruning masks, sparsities, scales and bit plans made before it fit other weights.
- "quantize": rounds weights to integer codes (rtn, gptq, awq, bnb); the first one after a model pass is that
  pass's `next_quantizer`, and an export format must match it.
- "quantize_embeddings": rounds the embedding table and the output head (quantize_embeddings), which no layer
  quantizer touches; at most one, in the quantizer's phase.
- "prune": zeroes weights, keeping shapes (magnitude, wanda, sparsegpt).
- "allocate": writes the bit plan a later quantizer follows (allocate, quantize_plan); needs a quantize pass after it.
- "allocate_sparsity": writes the per-layer sparsity later pruning follows (owl); needs a prune pass after it.
- "transform": rescales weights, leaving what the model computes unchanged (smoothquant, awq with quantize: false);
  must come before any quantizer.
- "compensate": adds a correction to the quantizer's records, fitted to its error (lorc: low-rank factors); comes
  right after a layer quantizer, in its sweep, and the export writes base and correction together.
- "quantize_cache": calibrates the scales of a quantized KV cache (kv_cache) on the keys and values of the finished
  weights, so it comes after everything that changes them.

A config may say it acts as another kind than its pass's usual one (`acts_as`, e.g. AWQ that only folds scales).
"""

PASS_ORDER: tuple[tuple[PassKind, ...], ...] = (
    ("restructure", "rotate"),
    ("allocate_sparsity", "prune", "transform", "allocate"),
    ("quantize", "quantize_embeddings"),
    ("compensate",),
    ("quantize_cache",),
)
"""The phases a recipe's passes go through, in this order (any order within a phase). Anything else is refused at load,
because it would export something other than what was evaluated:

- restructuring first: it renumbers layers and narrows linears, so pruning masks, per-layer sparsities and bit plans
  made before it would name the wrong modules or have the wrong shapes;
- one quantizer, last: it keeps each module's integer codes (its weight records) and the exporter writes those codes.
  A pass after it would change the weights that are evaluated but not the codes that are exported (`[rtn, magnitude]`
  reported a 50%-sparse model and saved ~15% zeros); a second quantizer re-rounds rounded weights and replaces the
  first one's records. Per-module bit widths come from one quantizer's bit plan (`allocate`, `plan:`).
- the KV cache after the weights: its scales are calibrated on the keys and values the final weights produce.
"""
MAX_PER_PHASE: dict[PassKind, int] = {"quantize": 1, "quantize_embeddings": 1, "compensate": 1, "quantize_cache": 1}

INT_CEILING = 2**31 - 1
"""The largest integer a config field without its own upper bound accepts: far above any count, size or length
a setting means, and small enough that no torch or tokenizer call overflows on it."""


def _ceiling_applies(field: FieldInfo) -> bool:
    """Fields with their own upper bound keep it; raw `Any` data (a recipe's pass list) is checked by its own configs."""
    return not any(hasattr(rule, "le") or hasattr(rule, "lt") for rule in field.metadata) and not _holds_any(field.annotation)


def _holds_any(annotation: Any) -> bool:
    return annotation is Any or any(_holds_any(arg) for arg in typing.get_args(annotation))


def _first_oversized_int(value: Any) -> int | None:
    """The first integer in `value` (or its lists and dicts) above INT_CEILING in size; nested configs check themselves."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) > INT_CEILING else None
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    if isinstance(items, (list, tuple)):
        return next((found for item in items if (found := _first_oversized_int(item)) is not None), None)
    return None


class StrictConfig(BaseModel):
    """Base of every pass and evaluator config: unknown keys are errors and configs are immutable.

    Types are strict, so YAML's spellings do not change meaning silently: `"yes"` is not a boolean, `true` is not
    an integer, `4.0` is not an integer (an integer is still a valid float: `alpha: 1`). Floats are finite, and an
    integer field without its own upper bound takes at most INT_CEILING.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def settings_as_run(self) -> dict[str, Any]:
        """The settings the report shows for this step (JSON): all of them, unless a config knows some do not apply."""
        return self.model_dump(mode="json")

    @field_validator("*")
    @classmethod
    def _bounded_integers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _ceiling_applies(field):
            return value
        oversized = _first_oversized_int(value)
        if oversized is not None:
            raise ValueError(f"expected at most {INT_CEILING:,} (no setting needs more)")
        return value


def module_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot select modules, or None. The syntax is compress/quant/modules.py `matches`: `re:<regex>`
    searches the module's full name, anything else is a glob."""
    try:
        if pattern.startswith("re:"):
            re.compile(pattern[3:])
        else:
            fnmatch.fnmatchcase("probe", pattern)  # globs compile to regexes too; a broken one would fail every match
    except re.error as exc:
        kind = "regular expression" if pattern.startswith("re:") else "glob"
        return f"{pattern[:80]!r} is not a valid {kind}: {exc}"
    return None


def _valid_module_patterns(patterns: list[str]) -> list[str]:
    problems = [problem for pattern in patterns if (problem := module_pattern_problem(pattern))]
    if problems:
        raise ValueError("; ".join(problems))
    return patterns


ModulePatterns = Annotated[list[str], AfterValidator(_valid_module_patterns)]
"""A config field listing module-name patterns (`ignore: [lm_head, "re:layers\\.0\\."]`), checked when the recipe loads."""


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
    implementation: Implementation  # the function, or where to import it from ("module:function")
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
    def apply(self) -> Callable[..., dict[str, Any]]:
        """The pass's function, imported on first use when it was declared by name."""
        return _resolved(self.implementation)

    def kind_of(self, config: StrictConfig) -> PassKind:
        """What the pass does with this config: its kind, unless the config says it acts as another (`acts_as`)."""
        acts_as = getattr(config, "acts_as", None)
        return acts_as if acts_as is not None else self.kind

    def calibrates(self, config: StrictConfig) -> bool:
        """Whether the pass needs calibration windows with this config: always when `needs_calibration`, else when
        the config says so (`calibrates`: rtn with static activation scales)."""
        return self.needs_calibration or bool(getattr(config, "calibrates", False))

    def stores_of(self, config: StrictConfig) -> frozenset[str]:
        """What the pass stores with this config: its declared parts plus any the config adds (`stores`, e.g. rtn
        with format fp8 stores element floats)."""
        return self.stores | frozenset(getattr(config, "stores", frozenset()))

    @property
    def summary(self) -> str:
        doc = (self.apply.__doc__ or self.config.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


Implementation = Callable[..., Any] | str
"""A registered function, or the "module:function" it is imported from when first called."""


def _resolved(implementation: Implementation) -> Callable[..., Any]:
    if not isinstance(implementation, str):
        return implementation
    module, _, function = implementation.partition(":")
    return typing.cast(Callable[..., Any], getattr(importlib.import_module(module), function))


def _where(implementation: Implementation) -> str:
    """Which module holds it, without importing a declared one (for the registered-twice message)."""
    return implementation.partition(":")[0] if isinstance(implementation, str) else implementation.__module__


@dataclass(frozen=True)
class EvalResult:
    """What every evaluator returns."""

    metric: str  # "perplexity"
    label: str  # which data set, e.g. "wikitext2" or "eval"
    value: float
    details: dict[str, Any] = field(default_factory=dict)  # protocol, version, token counts


@dataclass(frozen=True)
class EvaluatorDef:
    """A registered evaluator: `apply(model_handle, cfg, run_ctx) -> EvalResult`.

    `cache_inputs(model_handle, cfg, run_ctx) -> dict | None`, when declared, describes everything besides the model,
    the config and the code that the result depends on (the digest of the text or documents it scores), so a
    baseline can be reused from the cache (compress/app/baseline.py); None from it, or no `cache_inputs`, means the
    result is always computed.
    """

    name: str
    config: type[StrictConfig]
    implementation: Implementation  # the function, or where to import it from ("module:function")
    cache_inputs: Implementation | None = None

    @property
    def apply(self) -> Callable[..., Any]:
        """The evaluator's function, imported on first use when it was declared by name."""
        return _resolved(self.implementation)

    @property
    def inputs_for_cache(self) -> Callable[..., dict[str, Any] | None] | None:
        return None if self.cache_inputs is None else _resolved(self.cache_inputs)

    @property
    def summary(self) -> str:
        doc = (self.apply.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_PASSES: dict[str, PassDef] = {}
_EVALUATORS: dict[str, EvaluatorDef] = {}


def declare_pass(
    name: str,
    config: type[StrictConfig],
    implementation: Implementation,
    *,
    scope: Scope,
    kind: PassKind,
    needs_calibration: bool = False,
    data_parallel: bool = False,
    stores: Iterable[str] = (),
) -> None:
    """Register a pass under the name recipes use. What a recipe is validated against (its config and the facts
    below) is given here; `implementation` may be "module:function", imported when the pass first runs."""
    if name in _PASSES:
        raise ValueError(f"pass {name!r} is registered twice ({_where(_PASSES[name].implementation)} and "
                         f"{_where(implementation)})")
    _PASSES[name] = PassDef(name, config, implementation, scope, needs_calibration, kind, data_parallel, frozenset(stores))


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
    """`declare_pass` as a decorator of the pass's function."""
    def decorate(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        declare_pass(name, config, fn, scope=scope, kind=kind, needs_calibration=needs_calibration,
                     data_parallel=data_parallel, stores=stores)
        return fn

    return decorate


def declare_evaluator(name: str, config: type[StrictConfig], implementation: Implementation, *,
                      cache_inputs: Implementation | None = None) -> None:
    """Register an evaluator; `implementation` (and `cache_inputs`, see EvaluatorDef) may be "module:function",
    imported when it first runs."""
    if name in _EVALUATORS:
        raise ValueError(f"evaluator {name!r} is registered twice")
    _EVALUATORS[name] = EvaluatorDef(name, config, implementation, cache_inputs)


def register_evaluator(name: str, config: type[StrictConfig]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`declare_evaluator` as a decorator of the evaluator's function."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        declare_evaluator(name, config, fn)
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
