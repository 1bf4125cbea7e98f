"""Root of the `compress` CLI: one module per command, wired together here."""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
