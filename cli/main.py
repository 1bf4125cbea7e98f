"""Root of the `compress` CLI: one module per command, wired together here."""

from __future__ import annotations

import json
import sys

import typer

from compress.cli import eval as eval_cmd
from compress.cli import export as export_cmd
from compress.cli import inspect as inspect_cmd
from compress.cli import recipes as recipes_cmd
from compress.cli import report as report_cmd
from compress.cli import run as run_cmd
from compress.cli import sensitivity as sensitivity_cmd
from compress.cli import sweep as sweep_cmd

app = typer.Typer(
    name="compress",
    help="Make large language models smaller and keep them good.\n\n"
    "Run a YAML recipe of pruning and quantization passes on a Hugging Face causal LM, "
    "score it against its own baseline, and write a report.",
    epilog="Examples:\n\n"
    "  compress run recipes/demo.yaml\n\n"
    "  compress run my.yaml --set passes[0].rtn.bits=3 --output out/w3 --json\n\n"
    "  compress recipes list",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("run", epilog=run_cmd.EPILOG)(run_cmd.run)
app.command("eval", epilog=eval_cmd.EPILOG)(eval_cmd.evaluate)
app.command("validate", epilog=recipes_cmd.VALIDATE_EPILOG)(recipes_cmd.validate)
app.command("export", epilog=export_cmd.EPILOG)(export_cmd.export)
app.command("inspect", epilog=inspect_cmd.EPILOG)(inspect_cmd.inspect)
app.command("sensitivity", epilog=sensitivity_cmd.EPILOG)(sensitivity_cmd.sensitivity)
app.command("report", epilog=report_cmd.REPORT_EPILOG)(report_cmd.report)
app.command("compare", epilog=report_cmd.COMPARE_EPILOG)(report_cmd.compare)
app.add_typer(recipes_cmd.app, name="recipes")
app.command("sweep", epilog=sweep_cmd.EPILOG)(sweep_cmd.sweep)


# typer 0.29 vendors click (typer._click) and older versions use click itself: take the base of every usage error
# from a public class rather than from either private path.
CLICK_EXCEPTION: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    if "--json" in sys.argv[1:]:
        sys.exit(main_with_json_errors(sys.argv[1:]))
    app()


def main_with_json_errors(args: list[str]) -> int:
    """`app` for a script that asked for --json: a bad option or argument, which click rejects before any command
    runs, also leaves the error object on stdout (the commands print their own), never an empty stdout."""
    from typer import rich_utils

    from compress.cli.common import Failure
    from compress.recipe.errors import ExitCode

    try:
        return typer.main.get_command(app).main(args, standalone_mode=False) or 0
    except CLICK_EXCEPTION as exc:
        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]  # the message click would print, on stderr
        code: int = getattr(exc, "exit_code", ExitCode.USER_ERROR)
        kind = "user_error" if code == ExitCode.USER_ERROR else "internal_error"
        message: str = getattr(exc, "format_message", lambda: str(exc))()
        typer.echo(json.dumps(Failure(ExitCode(code), kind, message).to_json(), indent=2))
        return code


if __name__ == "__main__":
    main()
