"""Running a validated recipe: load, measure the baseline, apply the passes, measure again, report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, cast

import torch

import compress.app.builtins  # noqa: F401  (registers the built-in passes and evaluators)
from compress.engine.activations import OffloadSettings
from compress.engine.checkpoint import Checkpointer, checkpoint_dir_for, model_files_fingerprint, recipe_fingerprint
from compress.app.baseline import Scored, evaluate_baseline, evaluate_step
from compress.engine.cache import Cache, default_cache_dir
from compress.engine.context import RunCache, RunContext, RunInputs
from compress.engine.continuations import (
    Continuation,
    continuation_report,
    default_prompts,
    greedy_continuations,
    top1_agreement,
)
from compress.engine.data import load_text, sample_windows
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.recipe.errors import UserError
from compress.export import finish_streamed_export, refuse_unpackable_layers, save_run_outputs
from compress.export.streaming import StreamingCompressedTensors
from compress.engine.model_io import ModelHandle, PositionsNeeded, load_model
from compress.engine.output import DiskFull, atomic_output, stopped_by_disk
from compress.engine.progress import SILENT, Reporter
from compress.engine.threads import parallelism
from compress.app.output_places import OutputPlaces, preflight_places
from compress.recipe.schema import EvalStep, PassStep, Recipe, ReportConfig, dump_yaml
from compress.report.html import write_html_report
from compress.report.summary import (
    REPORT_SCHEMA_VERSION,
    damage_section,
    loaded_size,
    model_size,
    peak_memory,
    finite_or_null,
    render_markdown,
    summarize_modules,
    versions,
)
from compress.recipe.registry import EvalResult, StrictConfig

log = logging.getLogger("compress")


def plan_stages(steps: tuple[PassStep, ...]) -> list[list[PassStep]]:
    """Group consecutive layer passes into one sweep; a model pass stands alone.

    `[sparsegpt, gptq, hawq, rtn]` becomes `[[sparsegpt, gptq], [hawq], [rtn]]`: pruning and quantizing a layer
    happen back to back before its outputs feed the next layer, as in SparseGPT's joint mode.
    """
    stages: list[list[PassStep]] = []
    for step in steps:
        if step.definition.scope == "layer" and stages and stages[-1][0].definition.scope == "layer":
            stages[-1].append(step)
        else:
            stages.append([step])
    return stages


def next_quantizer(steps: tuple[PassStep, ...], step: PassStep) -> StrictConfig | None:
    """The config of the first quantize pass after `step`: a model pass's fourth argument (see PassDef)."""
    return next((s.config for s in steps if s.index > step.index and s.kind == "quantize"), None)


def run_passes(handle: ModelHandle, steps: tuple[PassStep, ...], run: RunContext) -> tuple[list[dict[str, Any]], float]:
    """Apply every pass; returns one report entry per pass and the seconds spent propagating activations.

    Each calibrated sweep's output errors against the uncompressed layers go to `run.results.report_sections`
    under `damage` (see `damage_section`).
    """
    entries: dict[int, dict[str, Any]] = {}
    propagation = 0.0
    sweeps: list[tuple[list[str], dict[str, dict[str, Any]]]] = []
    for stage in plan_stages(steps):
        if stage[0].definition.scope == "model":
            step = stage[0]
            start = time.perf_counter()
            modules = step.definition.apply(handle, step.config, run, next_quantizer(steps, step))
            entries[step.index] = _pass_entry(step, time.perf_counter() - start, modules)
            continue
        sweep = run_sweep(
            handle,
            [SweepStep(s.label, s.definition.apply, s.config, s.needs_calibration) for s in stage],
            run,
        )
        propagation += sweep.propagation_seconds
        for step in stage:
            entries[step.index] = _pass_entry(step, sweep.seconds[step.label], sweep.modules[step.label],
                                              sweep.parts[step.label])
        if sweep.damage:
            sweeps.append(([s.label for s in stage], sweep.damage))
        log.info("sweep %s done in %.2fs (+%.2fs propagation)", [s.label for s in stage],
                 sum(sweep.seconds.values()), sweep.propagation_seconds)
    if sweeps:
        run.results.report_sections["damage"] = damage_section(sweeps)
    return [entries[i] for i in sorted(entries)], propagation


def _pass_entry(step: PassStep, seconds: float, modules: dict[str, Any],
                parts: dict[str, float] | None = None) -> dict[str, Any]:
    entry = {
        "name": step.name,
        "params": step.config.settings_as_run(),
        "seconds": round(seconds, 4),
        "summary": summarize_modules(modules),
        "modules": modules,
    }
    if parts:  # e.g. GPTQ: statistics (the Hessians' forwards) and solve; the rest of `seconds` is the pass's own
        entry["seconds_by_part"] = {part: round(value, 4) for part, value in parts.items()}
    return entry


def evaluate_all(handle: ModelHandle, steps: tuple[EvalStep, ...], run: RunContext) -> list[EvalResult]:
    results = [result for step in steps for result in evaluate_step(handle, step, run)]
    _log_results(results)
    return results


def _log_results(results: list[EvalResult], source: str = "") -> None:
    for result in results:
        log.info("%s[%s] = %.4f%s", result.metric, result.label, result.value, source)


def result_labels(results: list[EvalResult]) -> list[tuple[str, str]]:
    """(metric, label) of each result as report.json keys it: a second file with the same stem gets `_2`."""
    keys: list[tuple[str, str]] = []
    for result in results:
        label, suffix = result.label, 2
        while (result.metric, label) in keys:
            label, suffix = f"{result.label}_{suffix}", suffix + 1
        keys.append((result.metric, label))
    return keys


def merge_metrics(baseline: list[EvalResult], compressed: list[EvalResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """`{"perplexity": {"eval": {"baseline": x, "compressed": y, "protocol": {...}}}}`, plus `baseline_stderr` and
    `compressed_stderr` for a score that has a standard error (zero-shot accuracies); the same whether the
    baseline was computed or read from the cache (report.json `cache` says which)."""
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for (metric, label), before, after in zip(result_labels(baseline), baseline, compressed):
        entry = metrics.setdefault(metric, {})[label] = {"baseline": before.value, "compressed": after.value,
                                                         "protocol": after.details}
        for side, result in (("baseline", before), ("compressed", after)):  # zero-shot scores carry theirs
            if isinstance(result.details.get("stderr"), (int, float)):
                entry[f"{side}_stderr"] = result.details["stderr"]
    return metrics



def report_prompts(recipe: Recipe) -> tuple[list[str], str] | None:
    """The prompts report.html continues, and where they came from: `report.prompts`, else the first sentences of
    the calibration text, else of the first evaluation text; None when they are off or there is no text."""
    settings = recipe.report or ReportConfig()
    if not settings.continuations:
        return None
    if settings.prompts:
        return list(settings.prompts), "report.prompts in the recipe"
    datasets = [("calibration text", recipe.calibration.dataset, None)] if recipe.calibration is not None else []
    datasets += [("evaluation text", dataset, getattr(step.config, "data_dir", None)) for step in recipe.evaluations
                 if isinstance(dataset := getattr(step.config, "dataset", None), str)]
    for source, dataset, data_dir in datasets:
        prompts = default_prompts(load_text(dataset, data_dir))
        if prompts:
            return prompts, f"the first sentences of the {source} ({dataset})"
    return None


@dataclasses.dataclass
class _Said:
    """What the baseline said before the passes (token ids only), and how it was asked."""

    continuations: list[Continuation]
    source: str
    new_tokens: int


def _baseline_continuations(handle: ModelHandle, recipe: Recipe) -> _Said | None:
    found = report_prompts(recipe)
    if found is None:
        return None
    prompts, source = found
    new_tokens = (recipe.report or ReportConfig()).new_tokens
    return _Said(greedy_continuations(handle, prompts, new_tokens), source, new_tokens)


def _compare_continuations(handle: ModelHandle, said: _Said) -> dict[str, Any]:
    """report.json `continuations`: the compressed model's own continuations and its top-1 agreement with the baseline's."""
    compressed = greedy_continuations(handle, [c.prompt for c in said.continuations], said.new_tokens)
    agreement = top1_agreement(handle, said.continuations)
    return continuation_report(handle, said.continuations, compressed, agreement, said.source, said.new_tokens)


def cache_for(use_cache: bool, reporter: Reporter) -> Cache | None:
    """The user's cache (compress/engine/cache.py), or None with --no-cache."""
    return Cache(default_cache_dir(), warn=reporter.note) if use_cache else None


def _baseline(handle: ModelHandle, recipe: Recipe, run: RunContext, allow_pickle: bool) -> list[Scored]:
    load_settings = {"dtype": recipe.dtype, "lazy": recipe.lazy, "strict_weights": recipe.strict_weights,
                     "trust_remote_code": recipe.trust_remote_code, "allow_pickle": allow_pickle}
    scored = evaluate_baseline(handle, recipe.evaluations, run, run.cache.store, load_settings)
    for each in scored:
        _log_results(each.results, " (baseline from the cache)" if each.from_cache else "")
    return scored


def _cache_section(run: RunContext, baseline: list[Scored]) -> dict[str, Any]:
    """report.json `cache`: where the cache is, what this run took from it, and per metric whether its baseline did."""
    store = run.cache.store
    flags = [scored.from_cache for scored in baseline for _ in scored.results]
    per_metric: dict[str, dict[str, bool]] = {}
    for (metric, label), cached in zip(result_labels([r for s in baseline for r in s.results]), flags):
        per_metric.setdefault(metric, {})[label] = cached
    return {"dir": str(store.folder) if store is not None else None,
            "baseline_steps_from_cache": sum(s.from_cache for s in baseline),
            "baseline_steps_computed": sum(not s.from_cache for s in baseline),
            "token_ids_from_cache": run.cache.token_ids_from_store,
            "baseline_from_cache": per_metric}


def calibration_windows(handle: ModelHandle, recipe: Recipe, cache: RunCache | None = None) -> torch.Tensor | None:
    """The recipe's calibration windows; with the run's `cache`, an evaluation of the same file reuses the ids."""
    if not recipe.needs_calibration or recipe.calibration is None:
        return None
    cal = recipe.calibration
    token_ids = (cache or RunCache()).token_ids((cal.dataset, None), handle.tokenizer)
    return sample_windows(token_ids, cal.samples, cal.seq_len, cal.seed)


@contextlib.contextmanager
def _expert_accounting(handle: ModelHandle, recipe: Recipe, run: RunContext) -> Iterator[None]:
    """MoE models: route calibration tokens to all experts when asked; report tokens per expert, flag rare ones."""
    from compress.engine import distributed, moe

    cal = recipe.calibration
    if run.inputs.calibration is None or cal is None:
        yield
        return
    batches = -(-run.inputs.calibration.shape[0] // run.inputs.calibration_batch_size)
    with moe.calibrating(handle.model, route_all=cal.route_all_experts, batches=batches) as stats:
        yield
    if stats.modules:
        section, flagged = moe.expert_report(
            stats, route_all=cal.route_all_experts, calibration_tokens=distributed.sum_over_ranks(run.inputs.calibration.numel()),
            top_k=getattr(handle.model.config, "num_experts_per_tok", None), min_tokens=cal.min_expert_tokens)
        run.results.report_sections["experts"] = section
        run.results.fallbacks.extend(flagged)


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def _check_data_parallel(recipe: Recipe) -> None:
    """Under torchrun every rank calibrates on its own share of the windows; only some passes sum across ranks."""
    alone = [step.label for step in recipe.passes if step.needs_calibration and not step.definition.data_parallel]
    if alone:
        from compress.engine import distributed
        from compress.recipe.registry import available_passes

        supported = sorted(name for name, d in available_passes().items() if d.needs_calibration and d.data_parallel)
        raise UserError(
            f"{', '.join(alone)} cannot calibrate data-parallel (each of the {distributed.world_size()} processes "
            f"would see only its share of the windows); run it in one process, or use {', '.join(supported)}"
        )


def run_recipe(
    recipe: Recipe,
    output: Path,
    *,
    allow_pickle: bool = False,
    overwrite: bool = False,
    reporter: Reporter = SILENT,
    resume: bool = False,
    checkpoints: bool = True,
    use_cache: bool = True,
    process_started: float | None = None,
    _worker: bool = False,
) -> dict[str, Any]:
    """Execute a recipe and write report.json, report.md, report.html, recipe.yaml and run.log into `output`.

    `output` appears only when everything succeeded (see `atomic_output`). With `checkpoints`, each finished
    decoder layer is saved beside it (compress/engine/checkpoint.py), so an interrupted run continues with `resume`.
    With `use_cache`, the baseline metrics and token ids come from the user's cache when an earlier run computed
    them from the same inputs (compress/app/baseline.py), and go into it otherwise. `process_started` (a
    `time.perf_counter()` reading of when the process began; the CLI passes it) adds a `startup` phase to the
    report's timings and makes `total` the whole process's.
    """
    if recipe.model is None:
        raise UserError("no model given: set `model:` in the recipe or pass --model")
    if not _worker and (elsewhere := _run_on_other_rank(recipe, allow_pickle, use_cache)) is not None:
        return elsewhere
    places = OutputPlaces.of(recipe, output, overwrite)
    places.check_nesting()  # before the locks, which create the folders they live in
    with places.held():
        _preflight(recipe, places, checkpoints)
        checkpointer = None
        try:
            checkpointer = _checkpointer(recipe, output, checkpoints, resume)
            return _run_held(recipe, places, checkpointer, allow_pickle=allow_pickle, reporter=reporter, resume=resume,
                             cache=cache_for(use_cache, reporter), process_started=process_started)
        except Exception as exc:
            problem = stopped_by_disk(exc)
            if problem is None:
                raise
            raise DiskFull(problem, output, checkpointer.folder if checkpointer else None) from None


def _run_held(recipe: Recipe, places: OutputPlaces, checkpointer: Checkpointer | None, *, allow_pickle: bool,
              reporter: Reporter, resume: bool, cache: Cache | None, process_started: float | None) -> dict[str, Any]:
    """`run_recipe` once its output paths are locked and checked."""
    output = places.output
    clock = _Stopwatch(process_started)
    seed = recipe.calibration.seed if recipe.calibration is not None else 0
    torch.manual_seed(seed)  # passes that draw random numbers repeat exactly, which --resume relies on
    with _checkpoint_lifetime(checkpointer), \
            atomic_output(output, overwrite=places.overwrite, inputs=places.inputs) as staging, \
            _log_to(staging / "run.log"), contextlib.ExitStack() as export_scope:
        log.info("recipe %s, model %s, seed %d%s", recipe.source, recipe.model, seed, " (resuming)" if resume else "")
        with clock.phase("load"):
            handle, run = _load(recipe, allow_pickle, reporter, checkpointer, staging, clock, RunCache(cache))
        loaded = loaded_size(handle.model, handle.checkpoint_dtype, by_part=True)  # the baseline: before any pass changes the model
        refuse_unpackable_layers(handle.layers, handle.layers_prefix, recipe.export)
        outputs = _run_outputs(handle, recipe, run, staging, export_scope, places)
        with clock.phase("baseline_eval"):
            baseline = _baseline(handle, recipe, run, allow_pickle)
        with clock.phase("continuations"):  # before the passes: only the token ids are kept
            said = _baseline_continuations(handle, recipe)
        passes, passes_cuda_peak = _apply_passes(handle, recipe, run, clock)
        outputs.finish_model(handle, clock)
        with clock.phase("eval"):
            compressed = evaluate_all(handle, recipe.evaluations, run)
        with clock.phase("continuations"):
            if said is not None:
                run.results.report_sections["continuations"] = _compare_continuations(handle, said)
        clock.stop()
        report = _report(recipe, output, handle, run, seed=seed, resume=resume, passes=passes,
                         metrics=merge_metrics([r for scored in baseline for r in scored.results], compressed), clock=clock, passes_cuda_peak=passes_cuda_peak,
                         loaded=loaded, cache=_cache_section(run, baseline))
        with clock.phase("export"):  # the run state and the export, which carries the report written so far
            export = outputs.save(handle, run, recipe, report, staging, places)
        clock.stop()
        report["timings"] = clock.rounded()
        if export is not None:
            report["export"] = export
        _write_run_folder(staging, output, recipe, run, report, clock)
    return report


def _run_on_other_rank(recipe: Recipe, allow_pickle: bool, use_cache: bool) -> dict[str, Any] | None:
    """Under torchrun, a rank other than 0 runs in a scratch folder it deletes; None on rank 0 or alone.

    Every rank calibrates on its share of the windows; only rank 0 keeps a run folder.
    """
    from compress.engine import distributed

    if not distributed.init_from_env() or distributed.rank() == 0:
        return None
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=f"compress-rank{distributed.rank()}-"))
    # Rank 0 alone exports: two ranks writing (and locking) one export.path would collide.
    alone = dataclasses.replace(recipe, export=None)
    try:
        return run_recipe(alone, scratch / "run", allow_pickle=allow_pickle, reporter=SILENT, _worker=True, checkpoints=False,
                          use_cache=use_cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _preflight(recipe: Recipe, places: OutputPlaces, checkpoints: bool) -> None:
    """Refuse what would fail later, before the model loads: passes that cannot calibrate data-parallel, and any
    written path that is in the way, unwritable, an input, or out of room (compress/app/output_places.py)."""
    from compress.engine import distributed

    if distributed.is_distributed():
        _check_data_parallel(recipe)
    preflight_places(places, needed_bytes=_disk_needed(cast(str, recipe.model), checkpoints))


def _checkpointer(recipe: Recipe, output: Path, checkpoints: bool, resume: bool) -> Checkpointer | None:
    # A lazy model's finished layers go straight to the output shards; layer checkpoints (and --resume) cover eager runs.
    if not checkpoints or not recipe.passes or recipe.lazy:
        return None
    return Checkpointer(checkpoint_dir_for(output), recipe_fingerprint(recipe.to_dict()), resume=resume,
                        model_files=model_files_fingerprint(recipe.model))


class _Stopwatch:
    """Seconds per phase of a run, in the order they ran (report.json `timings`), and the total since creation."""

    def __init__(self, process_started: float | None = None) -> None:
        # With the process's start (a perf_counter reading; the CLI's), `startup` holds what came before the run
        # (interpreter, imports, recipe, output checks) and `total` counts from the process's start.
        now = time.perf_counter()
        self.started = now if process_started is None else min(process_started, now)
        self.seconds: dict[str, float] = {} if process_started is None else {"startup": now - self.started}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def stop(self) -> None:
        self.seconds["total"] = time.perf_counter() - self.started

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def _load(recipe: Recipe, allow_pickle: bool, reporter: Reporter, checkpointer: Checkpointer | None,
          staging: Path, clock: _Stopwatch, cache: RunCache) -> tuple[ModelHandle, RunContext]:
    """The model, and the run that reads its calibration windows (this rank's share of them under torchrun)."""
    from compress.engine import distributed

    with reporter.status(f"loading {recipe.model}"):
        handle = _load_model(recipe, allow_pickle, staging)
        handle.max_memory = recipe.max_memory
        inputs = RunInputs(device=handle.device, reporter=reporter, checkpoint=checkpointer,
                           offload=_offload_settings(recipe, staging))
        with clock.phase("calibration_data"):  # reading, tokenizing and sampling the windows; inside `load`
            inputs.calibration = calibration_windows(handle, recipe, cache)
    if recipe.calibration is not None:
        inputs.calibration_batch_size = recipe.calibration.batch_size
    if inputs.calibration is not None:  # all windows when not distributed
        inputs.calibration = distributed.shard_windows(inputs.calibration, inputs.calibration_batch_size)
    run = RunContext(inputs, cache=cache)
    run.results.fallbacks.extend(handle.load_notes)  # tensors `strict_weights: false` let through
    return handle, run


def _load_model(recipe: Recipe, allow_pickle: bool, staging: Path) -> ModelHandle:
    """In host memory, or (`lazy: true`) on `meta` with each finished layer written to <output>/model."""
    model = cast(str, recipe.model)
    if recipe.lazy:
        from compress.engine.lazy import load_lazy

        return load_lazy(model, dtype=recipe.dtype, device=recipe.device, trust_remote_code=recipe.trust_remote_code,
                         save_to=staging / "model", strict_weights=recipe.strict_weights,
                         positions=positions_needed(recipe))
    return load_model(model, dtype=recipe.dtype, device=recipe.device, allow_pickle=allow_pickle,
                      trust_remote_code=recipe.trust_remote_code, strict_weights=recipe.strict_weights,
                      positions=positions_needed(recipe), local_candidate=recipe.model_local)


SEQUENCE_FIELDS = ("seq_len", "max_length")  # evaluator settings that set how many positions a forward uses


def positions_needed(recipe: Recipe) -> list[PositionsNeeded]:
    """Every sequence length the run will feed the model, with its place in the recipe (checked against the config)."""
    needs = []
    if recipe.needs_calibration and recipe.calibration is not None:
        needs.append(PositionsNeeded(recipe.calibration.seq_len, recipe.where(("calibration", "seq_len"))))
    for step in recipe.evaluations:
        for name in SEQUENCE_FIELDS:
            tokens = getattr(step.config, name, None)
            if isinstance(tokens, int):
                needs.append(PositionsNeeded(tokens, recipe.where(step.loc + (name,))))
    return needs


def _apply_passes(handle: ModelHandle, recipe: Recipe, run: RunContext,
                  clock: _Stopwatch) -> tuple[list[dict[str, Any]], int | None]:
    """Every pass, timed; returns their report entries and the CUDA peak they reached (None on the CPU).

    The peak is measured from here so the report can show that compression peaks at one layer, not the model.
    """
    on_cuda = handle.device.type == "cuda"
    with clock.phase("passes"):
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(handle.device)
        with _expert_accounting(handle, recipe, run):
            passes, propagation = run_passes(handle, recipe.passes, run)
    cuda_peak = torch.cuda.max_memory_allocated(handle.device) if on_cuda else None
    clock.seconds["propagation"] = propagation
    return passes, cuda_peak


class _SavedAtTheEnd:
    """Outputs of a model held in memory: its state (RUN_DIR/state) and the export are saved from it at the end."""

    def finish_model(self, handle: ModelHandle, clock: _Stopwatch) -> None:
        """Nothing to complete: no layer was written as it finished."""

    def save(self, handle: ModelHandle, run: RunContext, recipe: Recipe, report: dict[str, Any], staging: Path,
             places: OutputPlaces) -> dict[str, Any] | None:
        return save_run_outputs(handle, run, recipe.export, report, staging, places.output,
                                overwrite=places.overwrite, inputs=places.inputs, label=places.export_label)


class _WrittenLayerByLayer:
    """Outputs of a model whose layers were written as they finished (`lazy: true`): the layers are in
    <output>/model already and their codes were not kept, so an `export:` was packed layer by layer too
    (compress/export/streaming.py); its folder appears, like the run folder, only when the whole run succeeds."""

    def __init__(self, streaming: StreamingCompressedTensors | None):
        self.streaming = streaming
        self.details: dict[str, Any] = {}

    def finish_model(self, handle: ModelHandle, clock: _Stopwatch) -> None:
        """Add what is outside the layers (embeddings, config, index) to the model folder and to the export."""
        with clock.phase("save"):
            handle.finish_saving()
            if self.streaming is not None:
                self.details = self.streaming.finish(handle, handle.outside_tensors())

    def save(self, handle: ModelHandle, run: RunContext, recipe: Recipe, report: dict[str, Any], staging: Path,
             places: OutputPlaces) -> dict[str, Any] | None:
        if self.streaming is None or recipe.export is None:
            return None
        return finish_streamed_export(self.streaming.writer.folder, recipe.export, report, self.details, places.output)


def _run_outputs(handle: ModelHandle, recipe: Recipe, run: RunContext, staging: Path,
                 scope: contextlib.ExitStack, places: OutputPlaces) -> _SavedAtTheEnd | _WrittenLayerByLayer:
    if not handle.weights.saves_layers_as_they_finish:
        return _SavedAtTheEnd()
    if recipe.export is None:
        return _WrittenLayerByLayer(None)
    from compress.engine.model_io import DTYPES

    target = Path(recipe.export.path) if recipe.export.path else staging / f"export-{recipe.export.format}"
    folder = scope.enter_context(atomic_output(target, overwrite=places.overwrite, inputs=places.inputs,
                                               label=places.export_label, kind="export"))
    dtype = handle.checkpoint_dtype if recipe.export.dtype == "auto" else DTYPES[recipe.export.dtype]
    streaming = StreamingCompressedTensors(folder, dtype, run)
    handle.weights.on_layer_written = streaming.write_layer
    return _WrittenLayerByLayer(streaming)


def _report(recipe: Recipe, output: Path, handle: ModelHandle, run: RunContext, *, seed: int, resume: bool,
            passes: list[dict[str, Any]], metrics: dict[str, Any], clock: _Stopwatch,
            passes_cuda_peak: int | None, loaded: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    """report.json (compress/report/report.schema.json), less the `export` entry, which comes after saving.

    `loaded` is the model's size as loaded (`loaded_size`), the baseline its compressed size is set against.
    """
    memory = peak_memory(handle.device)
    if passes_cuda_peak is not None:
        memory["cuda_passes_bytes"] = passes_cuda_peak
    results = run.results
    size = model_size(handle.model, results.records, handle.checkpoint_dtype, baseline=loaded)
    return finite_or_null({
        "schema_version": REPORT_SCHEMA_VERSION,
        "status": "ok",
        "seed": seed,
        "resumed": resume,
        "recipe": recipe.to_dict(),
        "recipe_file": str(recipe.source) if recipe.source else None,
        "model": _model_section(recipe, handle, size),
        "passes": passes,
        "metrics": metrics,
        "size": size,
        "weights_sha256": handle.weights_digest(),
        **results.report_sections,
        "activation_quantization": results.activation_quant,
        "kv_cache": results.kv_cache,
        "fallbacks": results.fallbacks,
        "timings": clock.rounded(),
        "peak_memory_bytes": memory.get("cuda_allocated_bytes", memory["cpu_rss_bytes"]),
        "peak_memory": memory,
        "versions": versions(),
        "parallelism": parallelism(),
        "cache": cache,
        "output": str(output.resolve()),
    })


def _model_section(recipe: Recipe, handle: ModelHandle, size: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": recipe.model,
        "architecture": type(handle.model).__name__,
        "parameters": size["parameters"],  # weights, not the bytes bitsandbytes packs them into
        "decoder_layers": len(handle.layers),
        "device": str(handle.device),
        "dtype": str(next(handle.model.parameters()).dtype).replace("torch.", ""),
    }


def _write_run_folder(staging: Path, output: Path, recipe: Recipe, run: RunContext, report: dict[str, Any],
                      clock: _Stopwatch) -> None:
    """The passes' run files, report.md, recipe.yaml, report.html, then report.json into the staging folder.

    report.json goes last so that its `timings` count the writing of the others (`report`); the pages show the
    timings known when they were drawn.
    """
    for name, text in run.results.run_files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text, encoding="utf-8")
    with clock.phase("report"):
        (staging / "report.md").write_text(render_markdown(report), encoding="utf-8")
        (staging / "recipe.yaml").write_text(dump_yaml(recipe.to_dict()), encoding="utf-8")
        try:
            write_html_report(report, staging / "report.html")
        except Exception as exc:  # a plotting problem must not throw away hours of compression
            log.warning("report.html not written (%s: %s); run `compress report %s` to retry", type(exc).__name__, exc,
                        output)
    clock.stop()
    report["timings"] = clock.rounded()
    (staging / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _checkpoint_lifetime(checkpointer: Checkpointer | None) -> Iterator[None]:
    """Keep layer checkpoints only for a run that was interrupted (Ctrl-C here; SIGKILL never gets this far).

    A finished run needs them no more, and a run that failed will be run again with a changed recipe, which
    could not resume from them anyway.
    """
    try:
        yield
    except Exception as exc:
        # A full disk is the exception: the same recipe resumes once there is room, so its finished layers stay.
        if checkpointer is not None and stopped_by_disk(exc) is None:
            checkpointer.remove()
        raise
    if checkpointer is not None:
        checkpointer.remove()


def _offload_settings(recipe: Recipe, staging: Path) -> OffloadSettings:
    """The recipe's `calibration.offload`; disk offload writes beside the output unless `offload_dir` says otherwise.

    The staging folder is on the disk the user chose for the results, where /tmp may be a small RAM disk.
    """
    cal = recipe.calibration
    if cal is None:
        return OffloadSettings()
    return OffloadSettings(cal.offload, Path(cal.offload_dir) if cal.offload_dir else staging)


def _disk_needed(model: str, checkpoints: bool) -> int:
    """Room a run needs beside its output: the report, plus about the model's weights when checkpointing."""
    # exists(): a dangling symlink is refused by the loader, with its name, not here with an OSError
    weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors") if f.exists()) if Path(model).is_dir() else 0
    return 16 * 2**20 + (weights if checkpoints else 0)
