"""The baseline evaluation, reused from the user's cache when this model was scored the same way before.

An entry is keyed by everything its numbers depend on (`entry_material`): the digest of every model file, how the
model was loaded (dtype, device, weight strictness), the evaluator and its config as run, what it scored (the
text's or the documents' digest, `EvaluatorDef.cache_inputs`), the digest of the code that loads and scores a model,
and the torch / transformers / tokenizers versions. Change any of them and the baseline is computed afresh. The
torch thread count is not in it: evaluation gives the same bits at any count (compress/engine/threads.py; checked by
tests/core/test_baseline_cache.py), so a sweep's one-thread trials reuse a two-thread run's baseline.

An evaluator without `cache_inputs` (lm_eval) is always computed. A cache entry that cannot be read back is a
warning and a recomputation (compress/engine/cache.py), never a number.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.engine.cache import Cache, key_of
from compress.engine.context import RunContext
from compress.engine.digest import model_files_digests, model_folder
from compress.engine.model_io import ModelHandle
from compress.recipe.registry import EvalResult
from compress.recipe.schema import EvalStep

BASELINE_KIND = "baseline-eval"
ENTRY_FORMAT = "baseline_eval/1"  # changes when an entry's layout or key material does
# Packages whose code turns the same weights and text into other numbers (python, numpy and the rest do not).
NUMERIC_PACKAGES = ("transformers", "tokenizers", "safetensors", "accelerate")


@dataclass(frozen=True)
class Scored:
    """One evaluation step's results, and whether they came from the cache."""

    results: list[EvalResult]
    from_cache: bool


def evaluate_step(handle: ModelHandle, step: EvalStep, run: RunContext) -> list[EvalResult]:
    """Run one evaluator; each result carries the settings it ran with (max_windows, limit) in `details`."""
    returned = step.definition.apply(handle, step.config, run)
    settings = step.config.model_dump(mode="json")
    return [dataclasses.replace(result, details={**result.details, "settings": settings})
            for result in (returned if isinstance(returned, list) else [returned])]  # a suite returns one per task


def model_material(handle: ModelHandle, cache: Cache, load_settings: dict[str, Any]) -> dict[str, Any] | None:
    """The model as a baseline depends on it: its files' digests and how they were loaded; None when it has no
    folder on disk to digest (then nothing is cached)."""
    folder = model_folder(handle.name)
    if folder is None:
        return None
    parameter = next(handle.model.parameters())
    device = handle.device
    return {
        "files_sha256": model_files_digests(folder, cache),
        "load": {**load_settings, "loaded_dtype": str(parameter.dtype), "device": device.type,
                 # two GPU models round differently; the CPU's kernels are the same on any x86 machine torch runs on
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }


@functools.cache
def evaluation_code_sha256() -> str:
    """SHA-256 of the source of every module a baseline runs through (loading, data, the vocabulary head, the
    evaluators), so a changed line there computes baselines afresh rather than trusting a declared version."""
    import compress
    import compress.engine
    import compress.evaluators
    import compress.quant
    import compress.recipe

    digest = hashlib.sha256(compress.__version__.encode())
    for package in (compress.engine, compress.evaluators, compress.quant, compress.recipe):
        root = Path(package.__path__[0])
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def numeric_versions() -> dict[str, str]:
    from importlib import metadata

    found = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for package in NUMERIC_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def entry_material(handle: ModelHandle, step: EvalStep, run: RunContext,
                   model: dict[str, Any]) -> dict[str, Any] | None:
    """Everything `step`'s baseline depends on (see the module docstring); None when it must not be cached."""
    inputs_for = step.definition.inputs_for_cache
    inputs = inputs_for(handle, step.config, run) if inputs_for is not None else None
    if inputs is None:
        return None
    return {"format": ENTRY_FORMAT, "model": model, "evaluator": step.name,
            "config": step.config.model_dump(mode="json"), "inputs": inputs, "code_sha256": evaluation_code_sha256(),
            "versions": numeric_versions()}


def results_entry(results: list[EvalResult]) -> dict[str, Any]:
    return {"results": [{"metric": r.metric, "label": r.label, "value": r.value, "details": r.details}
                        for r in results]}


def results_from_entry(value: dict[str, Any]) -> list[EvalResult] | None:
    """The results an entry holds, or None when it does not hold well-formed ones."""
    rows = value.get("results")
    if not isinstance(rows, list) or not rows:
        return None
    results = []
    for row in rows:
        number = row.get("value") if isinstance(row, dict) else None
        if (not isinstance(number, (int, float)) or isinstance(number, bool) or not isinstance(row.get("metric"), str)
                or not isinstance(row.get("label"), str) or not isinstance(row.get("details"), dict)):
            return None
        results.append(EvalResult(row["metric"], row["label"], float(number), row["details"]))
    return results


def baseline_step(handle: ModelHandle, step: EvalStep, run: RunContext, cache: Cache | None,
                  model: dict[str, Any] | None) -> Scored:
    """`step`'s baseline: from the cache when an entry for exactly these inputs is there, else computed (and stored).

    The entry is locked while it is computed, so a second process asking for it (the next trial of a parallel
    sweep) waits and reads it instead of computing it again.
    """
    material = entry_material(handle, step, run, model) if cache is not None and model is not None else None
    if cache is None or material is None:
        return Scored(evaluate_step(handle, step, run), from_cache=False)
    key = key_of(material)
    with cache.locked(BASELINE_KIND, key):
        stored = cache.read_json(BASELINE_KIND, key, material)
        if stored is not None:
            results = results_from_entry(stored)
            if results is not None:
                return Scored(results, from_cache=True)
            cache.warn(f"cache entry {cache.path(BASELINE_KIND, key, 'json')} holds no well-formed results; "
                       "ignoring it (it is recomputed and rewritten)")
        results = evaluate_step(handle, step, run)
        cache.write_json(BASELINE_KIND, key, material, results_entry(results))
    return Scored(results, from_cache=False)


def evaluate_baseline(handle: ModelHandle, steps: tuple[EvalStep, ...], run: RunContext, cache: Cache | None,
                      load_settings: dict[str, Any]) -> list[Scored]:
    """Every evaluation step on the model before any pass, each from the cache when it can be (`baseline_step`)."""
    model = model_material(handle, cache, load_settings) if cache is not None and steps else None
    return [baseline_step(handle, step, run, cache, model) for step in steps]

