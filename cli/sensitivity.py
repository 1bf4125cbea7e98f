"""`compress sensitivity`: compute and save the per-module bit-width costs of a recipe's `allocate` pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from compress.cli.common import err_console, exit_codes, load_recipe, sigterm_as_interrupt
from compress.recipes import resolve_recipe_path

EPILOG = (
    "Examples:\n\n"
    "  compress sensitivity recipes/mixed-precision.yaml --output sens.json\n\n"
    "  compress sensitivity mixed-precision --set passes[0].allocate.sensitivity=fisher --json\n\n"
    "  compress run mixed-precision --set passes[0].allocate.sensitivity_file=$PWD/sens.json "
    "--set passes[0].allocate.budget.avg_bits=3.5"
)


def sensitivity(
    recipe: Annotated[str, typer.Argument(help="Recipe with an `allocate` pass (file, or a shipped recipe's name).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON file to write.")] = Path("sensitivity.json"),
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model folder or hub id; overrides the recipe.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe field: key.path=value. Repeatable.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (*.bin) weights.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
) -> None:
    """Compute the sensitivities an `allocate` pass would use, save them as JSON, quantize nothing.

    Reuse them across budgets with `allocate: {sensitivity_file: FILE}`.
    """
    with exit_codes(verbose, as_json), sigterm_as_interrupt():
        parsed = load_recipe(resolve_recipe_path(recipe), overrides=set_ or [], model=model)
        from compress.app.sensitivity import recipe_sensitivities  # heavy imports only when running
        from compress.engine.progress import Reporter

        reporter = Reporter(err_console, enabled=not quiet and not as_json)
        with reporter.status("estimating sensitivities"):
            document = recipe_sensitivities(parsed, allow_pickle=allow_pickle, reporter=reporter)
        from compress.report.summary import finite_or_null

        text = json.dumps(finite_or_null(document), indent=2, allow_nan=False) + "\n"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        if as_json:
            typer.echo(text, nl=False)
        elif not quiet:
            err_console.print(f"{document['estimator']}: {len(document['units'])} units in "
                              f"{document['seconds']:.1f} s -> {output}", highlight=False)
