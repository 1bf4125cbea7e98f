"""`compress sweep`: run a grid of recipe variants locally, on Ray, or as a SLURM array."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import err_console, exit_codes
from compress.errors import UserError

EPILOG = (
    "Examples:\n\n"
    "  compress sweep scripts/sweep-demo.yaml                       # trials one after another\n\n"
    "  compress sweep grid.yaml --parallel 2                         # two trials at once, one process each\n\n"
    "  compress sweep grid.yaml --backend ray --address auto         # an existing Ray cluster\n\n"
    "  compress sweep grid.yaml --backend slurm --submit             # write the sbatch array script and submit it\n\n"
    "  compress sweep grid.yaml --compare                            # only rebuild compare.md/json and pareto.png\n\n"
    "A re-launched sweep skips the trials that already finished."
)


def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML: base recipe, grid of --set keys to lists, models.")],
    backend: Annotated[Optional[str], typer.Option("--backend", "-b", help="local, ray or slurm (default: the file's `backend`).")] = None,
    parallel: Annotated[Optional[int], typer.Option("--parallel", "-j", help="local: trials at once (default: the file's `parallel`).")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="ray: address of an existing cluster (default: start Ray here).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sweep folder (default: the file's `output`).")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="slurm: submit the script with sbatch (default: only write and print it).")] = False,
    only: Annotated[Optional[int], typer.Option("--only", help="Run just this trial index (what each SLURM array task does).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Run nothing; rebuild the comparison from the finished trials.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison rows as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
) -> None:
    """Run a sweep of recipe variants and compare them (size vs. metrics, Pareto plot)."""
    from compress import sweep as sweeps

    with exit_codes(verbose):
        spec = sweeps.load_sweep(sweep_file, output=output)
        chosen = backend or spec.config.backend
        if chosen not in ("local", "ray", "slurm"):
            raise UserError(f"--backend must be local, ray or slurm, got {chosen!r}")
        statuses: list[dict] = []
        if only is not None:
            if not 0 <= only < len(spec.trials):
                raise UserError(f"--only {only}: the sweep has trials 0..{len(spec.trials) - 1}")
            result = sweeps.run_trial(str(spec.source), str(spec.output), only)
            err_console.print(f"{result['id']}: {result['status']}", highlight=False)
            if result["status"] == "failed":
                err_console.print(result.get("traceback", ""), markup=False, highlight=False)
                raise typer.Exit(1)
            return
        if not compare and chosen == "slurm":
            _slurm(spec, submit)
            return
        if not compare:
            skipped = len(spec.trials) - len(sweeps.pending(spec))
            err_console.print(f"sweep: {len(spec.trials)} trials ({skipped} already finished) -> {spec.output}",
                              highlight=False)
            if chosen == "ray":
                statuses = sweeps.run_ray(spec, address)
            else:
                statuses = sweeps.run_local(spec, parallel or spec.config.parallel)
        rows = sweeps.write_compare(spec, {s["id"]: s for s in statuses})
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            typer.echo(sweeps.render_compare(rows))
            err_console.print(f"Comparison: {spec.output / 'compare.md'}  (plot: {spec.output / 'pareto.png'})",
                              highlight=False)
        if any(r["status"] == "failed" for r in rows):
            raise typer.Exit(1)


def _slurm(spec, submit: bool) -> None:
    from compress import sweep as sweeps

    script = sweeps.slurm_script(spec)
    (spec.output / "logs").mkdir(parents=True, exist_ok=True)
    path = spec.output / "sweep.sbatch"
    path.write_text(script, encoding="utf-8")
    if not submit:
        typer.echo(script)
        err_console.print(f"wrote {path}; submit with: sbatch {path}  (then `compress sweep {spec.source} --compare`)",
                          highlight=False)
        return
    if shutil.which("sbatch") is None:
        raise UserError("--submit needs `sbatch` on PATH (run this on the cluster's login node)")
    done = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch failed: {done.stderr.strip()}")
    typer.echo(done.stdout.strip())
