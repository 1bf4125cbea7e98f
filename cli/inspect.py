"""`compress inspect`: what a checkpoint holds, module by module, and what it costs on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from compress.cli.common import err_console, exit_codes

EPILOG = (
    "Examples:\n\n"
    "  compress inspect compress-out/demo-0101/export-compressed-tensors\n\n"
    "  compress inspect models/demo-w4-gptq --json | jq .totals"
)


def _fmt(value: object) -> str:
    return "—" if value is None else str(value)


def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + *.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
) -> None:
    """Per module: format, bits, group size, zero fraction, bytes; totals: parameters, bytes, bits per weight, ratio."""
    with exit_codes(verbose, as_json):
        from compress.export.inspect import inspect_checkpoint

        summary = inspect_checkpoint(checkpoint)
        if as_json:
            from compress.report.summary import finite_or_null

            typer.echo(json.dumps(finite_or_null(summary.to_dict()), indent=2, allow_nan=False))
            return
        from rich.table import Table

        table = Table(title=f"{checkpoint} ({summary.format})")
        with_activations = any(row.activations for row in summary.modules)  # the column only where a runtime uses it
        columns = ("module", "format", "bits", "group", "zeros", "parameters", "bytes") + (
            ("activations",) if with_activations else ())
        for column in columns:
            table.add_column(column, justify="left" if column in ("module", "format", "activations") else "right")
        for row in summary.modules:
            cells = [row.module, row.format, _fmt(row.bits), _fmt(row.group_size), _fmt(row.sparsity),
                     f"{row.parameters:,}", f"{row.bytes:,}"]
            table.add_row(*cells, *([_fmt(row.activations)] if with_activations else []))
        totals = summary.totals
        table.caption = (
            f"{totals['parameters']:,} parameters · {totals['bytes']:,} bytes of tensors: {totals['bits_per_weight']} "
            f"bits/weight whole model, {_fmt(totals['quantized_bits_per_weight'])} in quantized modules · "
            f"{totals['bytes_on_disk']:,} bytes on disk · {totals['compression_ratio']}x vs the original "
            f"({summary.original_dtype}) · overhead {', '.join(f'{k} {v:,}' for k, v in summary.overhead.items())}"
            + (f" · KV cache {summary.kv_cache} (k_scale/v_scale per attention layer)" if summary.kv_cache else "")
        )
        err_console.print(table)
