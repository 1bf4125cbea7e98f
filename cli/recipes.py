"""`compress recipes list|show|validate` and `compress validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from compress.cli.common import err_console, exit_codes, failure_of, load_recipe, print_failure
from compress.recipe.errors import RecipeError, UserError
from compress.recipes import portable_text, resolve_recipe_path, shipped_recipes

VALIDATE_EPILOG = (
    "Examples:\n\n"
    "  compress validate my.yaml\n\n"
    "  compress validate my.yaml --set passes[0].gptq.bits=3 --json\n\n"
    "Exit code 0 when valid, 2 with every problem listed (file:line yaml.path: what was expected)."
)

app = typer.Typer(
    help="Shipped recipes: list them, print one, validate any recipe file.",
    epilog="Examples:\n\n  compress recipes list\n\n  compress recipes show gptq-w4 > my.yaml\n\n  compress recipes validate my.yaml",
    no_args_is_help=True,
)


@app.command("list", epilog="Example:\n\n  compress recipes list --json")
def list_recipes(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
) -> None:
    """List the recipes shipped with compress."""
    recipes = shipped_recipes()
    if as_json:
        typer.echo(json.dumps([{"name": r.name, "path": str(r.path), "description": r.description} for r in recipes], indent=2))
        return
    from rich.table import Table

    table = Table(title="shipped recipes (run with: compress run NAME)")
    table.add_column("name")
    table.add_column("description")
    for r in recipes:
        table.add_row(r.name, r.description)
    err_console.print(table)


@app.command("show", epilog="Example:\n\n  compress recipes show demo > my.yaml")
def show(name: Annotated[str, typer.Argument(help="Shipped recipe name or a recipe file.")]) -> None:
    """Print a recipe's YAML (copy it to start your own).

    Relative paths the recipe reads (model, data sets, task files) are printed absolute, so the copy runs from
    any folder; comments and layout are kept.
    """
    with exit_codes():
        typer.echo(portable_text(resolve_recipe_path(name)), nl=False)


@app.command("validate", epilog=VALIDATE_EPILOG)
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped recipe name.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: key.path=value. Repeatable.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model override, as for `compress run`.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also check the run folder `compress run --output` would write.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Check as `compress run --overwrite` would: an earlier compress output may be replaced.")] = False,
) -> None:
    """Check a recipe without loading any model; list every problem with its file line and YAML path.

    The paths a run would write (export.path, calibration.offload_dir, and --output when given) are checked too:
    not in the way, not an input, writable. Nothing is created.
    """
    from compress.app.output_places import OutputPlaces, validate_places

    with exit_codes(as_json=as_json):
        path = resolve_recipe_path(recipe)
        try:
            parsed = load_recipe(path, overrides=set_ or [], model=model)
            validate_places(OutputPlaces.of(parsed, output or Path("."), overwrite), with_output=output is not None)
        except UserError as exc:
            if as_json:
                _print_invalid(path, exc)
            raise
        if as_json:
            typer.echo(json.dumps({"valid": True, "file": str(path), "recipe": parsed.to_dict()}, indent=2))
        else:
            err_console.print(f"[green]valid[/]: {path} ({len(parsed.passes)} passes, {len(parsed.evaluations)} evaluations)")


def _print_invalid(path: Path, exc: UserError) -> NoReturn:
    """The message on stderr and, on stdout, the error object of every command plus validate's own `valid: false`
    with every problem as an issue (an output refusal is one issue without a YAML path)."""
    failure = failure_of(exc)
    issues = failure.issues or [{"path": None, "line": None, "message": str(exc)}]
    print_failure(failure, as_json=False)
    typer.echo(json.dumps({"valid": False, "file": str(path), "issues": issues, **failure.to_json()}, indent=2))
    raise typer.Exit(failure.exit_code)
