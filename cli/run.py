"""`compress run`: execute a recipe."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from compress.cli.common import NOT_WRITTEN, Interrupted, err_console, exit_codes, load_recipe, sigterm_as_interrupt
from compress.recipe.errors import UserError
from compress.recipes import resolve_recipe_path

if TYPE_CHECKING:  # the rest is imported where it is used: `compress --help` and `validate` stay light
    from compress.engine.output import DiskFull
    from compress.recipe.schema import Recipe

EPILOG = (
    "Examples:\n\n"
    "  compress run recipes/demo.yaml\n\n"
    "  compress run demo --set passes[0].rtn.bits=3 --output out/demo-w3\n\n"
    "  compress run my.yaml --model meta-llama/Llama-3.2-1B --json > report.json\n\n"
    "  compress run my.yaml --output out/big --resume      # continue an interrupted run\n\n"
    "Exit codes: 0 success, 2 user error (bad recipe, missing file, bad option), 1 internal error, 130 interrupted."
)


def resume_command(recipe: str, target: Path, set_: list[str], model: str | None) -> str:
    """The exact command that continues this run (the same recipe, overrides and output, plus --resume)."""
    words = ["compress", "run", recipe, "--output", str(target)]
    for assignment in set_:
        words += ["--set", assignment]
    if model is not None:
        words += ["--model", model]
    return shlex.join(words + ["--resume"])


def interrupted_message(recipe: str, target: Path, set_: list[str], model: str | None) -> str:
    from compress.engine.checkpoint import checkpoint_dir_for

    checkpoints = checkpoint_dir_for(target)
    if not checkpoints.exists():
        return NOT_WRITTEN
    return (f"interrupted: finished layers are saved in {checkpoints}.\n"
            f"Resume with: {resume_command(recipe, target, set_, model)}")


def disk_full_message(exc: DiskFull, recipe: str, target: Path, set_: list[str], model: str | None) -> str:
    if exc.checkpoints is None:
        return str(exc)
    return f"{exc}\nResume with: {resume_command(recipe, target, set_, model)}"


def default_output(recipe_path: Path) -> Path:
    return Path("compress-out") / f"{recipe_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def describe_plan(recipe: Recipe) -> dict:
    from compress.app.runner import plan_stages

    return {
        "recipe": recipe.to_dict(),
        "stages": [
            {"scope": stage[0].definition.scope, "passes": [step.label for step in stage]}
            for stage in plan_stages(recipe.passes)
        ],
    }


def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or the name of a shipped recipe (see `compress recipes list`).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model folder or hub id; overrides `model:` in the recipe.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for report.json, report.md, recipe.yaml and run.log. Default: compress-out/<recipe>-<time>.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe field: key.path=value (YAML value), e.g. passes[0].rtn.bits=3. Repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show the plan; load no model.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output folder (and export.path) if it is an earlier compress output; never an input.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (*.bin) weights, which can run code. Only for sources you trust.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (nothing else on stdout).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run with the same recipe and --output from its last finished decoder layer.")] = False,
    checkpoints: Annotated[bool, typer.Option("--checkpoints/--no-checkpoints", help="Save each finished decoder layer beside the output so an interrupted run can --resume.")] = True,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Compute the baseline metrics and token ids afresh; neither read nor write the cache ($COMPRESS_CACHE_DIR, default ~/.cache/compress).")] = False,
) -> None:
    """Run a compression recipe: baseline, passes, evaluation, report."""
    with exit_codes(verbose, as_json):
        recipe_path = resolve_recipe_path(recipe)
        parsed = load_recipe(recipe_path, overrides=set_ or [], model=model)
        if dry_run:
            plan = describe_plan(parsed)
            if as_json:
                typer.echo(json.dumps(plan, indent=2))
            elif not quiet:
                from compress.recipe.schema import dump_yaml

                err_console.print(f"[green]valid[/]: {recipe_path}")
                typer.echo(dump_yaml(plan))
            return
        target = output or default_output(recipe_path)
        from compress.app.runner import run_recipe  # heavy imports (transformers) only when running
        from compress.engine.output import DiskFull
        from compress.engine.progress import Reporter

        reporter = Reporter(err_console, enabled=not quiet and not as_json)
        try:
            with sigterm_as_interrupt():
                report = run_recipe(parsed, target, allow_pickle=allow_pickle, overwrite=overwrite, reporter=reporter,
                                    resume=resume, checkpoints=checkpoints, use_cache=not no_cache,
                                    process_started=process_started())
        except KeyboardInterrupt:
            raise Interrupted(interrupted_message(recipe, target, set_ or [], model)) from None
        except DiskFull as exc:
            raise UserError(disk_full_message(exc, recipe, target, set_ or [], model)) from None
        if as_json:
            typer.echo(json.dumps(report, indent=2, allow_nan=False))  # the runner made it strict (finite_or_null)
        elif not quiet:
            from compress.report.summary import summary_table

            err_console.print(summary_table(report))
            err_console.print(f"Report: {target / 'report.md'}  (JSON: {target / 'report.json'})", highlight=False)


def process_started() -> float | None:
    """When this process began, as a `time.perf_counter()` reading (from Linux's /proc; None where there is none).

    The report's `startup` phase (interpreter, imports, recipe) is then part of the run's timings.
    """
    import os

    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22, starttime: clock ticks after boot (fields 1-2 precede ")")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age = max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    return time.perf_counter() - age
