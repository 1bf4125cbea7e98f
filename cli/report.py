"""`compress report RUN_DIR` re-renders a run's pages; `compress compare RUN_DIR...` puts several runs side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from compress.cli.common import err_console, exit_codes
from compress.recipe.errors import UserError

REPORT_EPILOG = "Example:\n\n  compress report compress-out/demo      # rewrites report.md and report.html from report.json"
COMPARE_EPILOG = (
    "Examples:\n\n"
    "  compress compare out/w4 out/w3 out/w8a8\n\n"
    "  compress compare out/* --html compare.html --json"
)


def read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"no report.json in {run_dir} (give the folder a `compress run` wrote)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or "schema_version" not in report:
        raise UserError(f"{path} is not a compress report (no schema_version)")
    return report


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `compress run`.")],
) -> None:
    """Re-render report.md and report.html of a run from its report.json."""
    with exit_codes():
        from compress.report.html import write_html_report
        from compress.report.summary import render_markdown

        data = read_report(run_dir)
        (run_dir / "report.md").write_text(render_markdown(data), encoding="utf-8")
        write_html_report(data, run_dir / "report.html")
        err_console.print(f"Report: {run_dir / 'report.html'}", highlight=False)


def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders written by `compress run`.")],
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write the comparison as an HTML page here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON on stdout.")] = False,
) -> None:
    """One table of several runs: size, bits per weight, each metric, time (and perplexity against size in --html)."""
    with exit_codes(as_json=as_json):
        from compress.report.html import compare_rows, render_compare_html

        runs = [(str(path), read_report(path)) for path in run_dirs]
        header, rows = compare_rows(runs)
        if as_json:
            from compress.report.summary import finite_or_null

            typer.echo(json.dumps(finite_or_null([dict(zip(header, row)) for row in rows]), indent=2, allow_nan=False))
        else:
            from rich.table import Table

            table = Table(title="compress: runs compared")
            for column in header:
                table.add_column(column, justify="left" if column == "run" else "right")
            for row in rows:
                table.add_row(*row)
            err_console.print(table)
        if html is not None:
            html.write_text(render_compare_html(runs), encoding="utf-8")
            err_console.print(f"Comparison: {html}", highlight=False)
