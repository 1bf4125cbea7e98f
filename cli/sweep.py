"""`compress sweep`: run a grid of recipe variants locally, on Ray, or as a SLURM array."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from compress.cli.common import err_console, exit_codes, sigterm_as_interrupt
from compress.recipe.errors import ExitCode, UserError

if TYPE_CHECKING:
    from compress.app.sweep import Status, Sweep

EPILOG = (
    "Examples:\n\n"
    "  compress sweep scripts/sweep-demo.yaml                       # trials one after another\n\n"
    "  compress sweep grid.yaml --dry-run                            # list the trials and which are finished\n\n"
    "  compress sweep grid.yaml --parallel 2                         # two trials at once, one process each\n\n"
    "  compress sweep grid.yaml --backend ray --address auto         # an existing Ray cluster\n\n"
    "  compress sweep grid.yaml --backend slurm --submit             # write the sbatch array script and submit it\n\n"
    "  compress sweep grid.yaml --compare                            # only rebuild compare.md/json and pareto.png\n\n"
    "A re-launched sweep skips the trials that already finished. Exit codes: 0 every trial ok, 1 a trial failed "
    "(named on stderr and in compare.md) or an internal error, 2 a problem in the sweep file or an option."
)
BACKENDS = ("local", "ray", "slurm")
INTERRUPTED = ("interrupted: finished trials are kept; launch the same command again to continue (finished trials "
               "are skipped, an interrupted one resumes from its checkpoints)")


def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML: base recipe, grid of --set keys to lists, models.")],
    backend: Annotated[Optional[str], typer.Option("--backend", "-b", help="local, ray or slurm (default: the file's `backend`).")] = None,
    parallel: Annotated[Optional[int], typer.Option("--parallel", "-j", min=1, help="local: trials at once (default: the file's `parallel`).")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="ray: address of an existing cluster (default: start Ray here).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sweep folder (default: the file's `output`).")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="slurm: submit the script with sbatch (default: only write and print it).")] = False,
    only: Annotated[Optional[int], typer.Option("--only", help="Run just this trial index (what each SLURM array task does).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Run nothing; rebuild the comparison from the finished trials.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list the trials with their state; run nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (comparison rows, plan, job).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Trials compute their baselines and token ids afresh; neither read nor write the cache ($COMPRESS_CACHE_DIR, default ~/.cache/compress).")] = False,
) -> None:
    """Run a sweep of recipe variants and compare them (size vs. metrics, Pareto plot)."""
    from compress.app import sweep as sweeps

    with exit_codes(verbose, as_json, on_interrupt=INTERRUPTED), sigterm_as_interrupt():
        spec = sweeps.load_sweep(sweep_file, output=output, use_cache=not no_cache)
        chosen = backend or spec.config.backend
        if chosen not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {chosen!r}")
        if only is not None:
            _run_one(spec, only, as_json)
        elif dry_run:
            _show_plan(spec, as_json)
        elif chosen == "slurm" and not compare:
            _slurm(spec, submit, as_json)
        else:
            statuses = {} if compare else _launch(spec, chosen, parallel, address)
            _compare(spec, statuses, as_json)


def _run_one(spec: Sweep, index: int, as_json: bool) -> None:
    from compress.app import sweep as sweeps

    if not 0 <= index < len(spec.trials):
        raise UserError(f"--only {index}: the sweep has trials 0..{len(spec.trials) - 1}")
    result = sweeps.run_loaded_trial(spec, spec.trials[index])
    _print_status(result)
    if as_json:
        from compress.report.summary import finite_or_null

        typer.echo(json.dumps(finite_or_null(result), allow_nan=False))
    if result["status"] == "failed":
        err_console.print(result.get("traceback", ""), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(ExitCode.INTERNAL_ERROR)


def _show_plan(spec: Sweep, as_json: bool) -> None:
    plan: list[dict[str, Any]] = [{"index": t.index, "id": t.id, "state": spec.state(t), "model": t.model, "params": t.params(),
             "run_dir": str(spec.trial_dir(t))} for t in spec.trials]
    if as_json:
        typer.echo(json.dumps({"sweep": str(spec.source), "recipe": str(spec.recipe), "output": str(spec.output),
                               "trials": plan}, indent=2))
        return
    for row in plan:
        overrides = " ".join(f"{k}={v}" for k, v in row["params"].items())
        typer.echo(f"{row['index']:>3}  {row['id']:<40} {row['state']:<8} {overrides}")
    err_console.print(f"{len(plan)} trials -> {spec.output}; {sum(r['state'] == 'finished' for r in plan)} finished",
                      highlight=False, soft_wrap=True)


def _print_status(status: Status) -> None:
    outcome = status["status"]
    if outcome == "ok":
        resumed = ", resumed from its checkpoints" if status.get("resumed") else ""
        line = f"{status['id']}: ok ({status.get('seconds', 0):.1f} s{resumed})"
    elif outcome == "skipped":
        line = f"{status['id']}: skipped ({status.get('busy') or 'finished before'})"
    else:
        line = f"{status['id']}: FAILED: {status.get('error')}" + (f" (log: {status['log']})" if status.get("log") else "")
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def _launch(spec: Sweep, backend: str, parallel: int | None, address: str | None) -> dict[str, Status]:
    from compress.app import sweep as sweeps

    todo = sweeps.pending(spec)
    stale = [t for t in todo if spec.state(t) == "stale"]
    err_console.print(f"sweep: {len(spec.trials)} trials, {len(spec.trials) - len(todo)} finished before (skipped), "
                      f"{len(todo)} to run{f' ({len(stale)} finished with another recipe)' if stale else ''} "
                      f"-> {spec.output}", highlight=False, soft_wrap=True)
    statuses: dict[str, Status] = {}
    for trial in spec.trials:
        if trial not in todo:
            statuses[trial.id] = {"id": trial.id, "index": trial.index, "status": "skipped"}
            _print_status(statuses[trial.id])
    if backend == "ray":
        results = sweeps.run_ray(spec, address, on_result=_print_status)
    else:
        results = sweeps.run_local(spec, parallel or spec.config.parallel, on_result=_print_status)
    statuses.update({r["id"]: r for r in results})
    return statuses


def _compare(spec: Sweep, statuses: dict[str, Status], as_json: bool) -> None:
    from compress.app.sweep_compare import render_compare, write_compare

    rows = write_compare(spec, statuses)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, allow_nan=False))
    else:
        typer.echo(render_compare(rows))
        err_console.print(f"Comparison: {spec.output / 'compare.md'}  (plot: {spec.output / 'pareto.png'})",
                          highlight=False, soft_wrap=True)
    failed = [r["id"] for r in rows if r["status"] == "failed"]
    if failed:
        err_console.print(f"{len(failed)} of {len(rows)} trials failed: {', '.join(failed)}. Fix and re-launch; "
                          "finished trials are skipped.", highlight=False, soft_wrap=True)
        raise typer.Exit(ExitCode.INTERNAL_ERROR)


def _slurm(spec: Sweep, submit: bool, as_json: bool) -> None:
    from compress.app import sweep as sweeps

    todo = [t.index for t in sweeps.pending(spec)]
    if not todo:
        err_console.print(f"all {len(spec.trials)} trials are finished; nothing to submit. "
                          f"Comparison: compress sweep {spec.source} --compare", highlight=False, soft_wrap=True)
        if as_json:
            typer.echo(json.dumps({"script": None, "array": None, "trials": [], "job_id": None}))
        return
    script = sweeps.slurm_script(spec, todo)
    (spec.output / "logs").mkdir(parents=True, exist_ok=True)
    path = spec.output / "sweep.sbatch"
    path.write_text(script, encoding="utf-8")
    job_id = sweeps.submit_slurm(path) if submit else None
    summary: dict[str, Any] = {"script": str(path), "array": sweeps.array_spec(todo, spec.config.slurm.max_parallel),
                               "trials": [spec.trials[i].id for i in todo], "job_id": job_id}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    elif job_id is None:
        typer.echo(script)
    else:
        typer.echo(job_id)
    skipped = len(spec.trials) - len(todo)
    what = f"submitted job {job_id}" if job_id else f"wrote {path}; submit with: sbatch {path}"
    err_console.print(f"{what}: array {summary['array']} ({len(todo)} trials, {skipped} finished before), "
                      f"logs in {spec.output / 'logs'}; afterwards: compress sweep {spec.source} --compare",
                      highlight=False, soft_wrap=True)
