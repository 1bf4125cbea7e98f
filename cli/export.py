"""`compress export`: write a finished run's compressed model as a checkpoint that runtimes load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from compress.cli.common import err_console, exit_codes

EPILOG = (
    "Examples:\n\n"
    "  compress export compress-out/demo-0101 --format compressed-tensors\n\n"
    "  compress export RUN_DIR --format gptq --output models/demo-w4-gptq\n\n"
    "  compress export RUN_DIR --format dense --dtype bfloat16 --json\n\n"
    "  compress export RUN_DIR --format gguf   # RUN_DIR/export-gguf/model.gguf for llama.cpp"
)


def export(
    run_dir: Annotated[Path, typer.Argument(help="Output folder of `compress run` (it keeps the compressed state).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="compressed-tensors, gptq, dense, bitsandbytes or gguf (llama.cpp).")] = "compressed-tensors",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Checkpoint folder (default RUN_DIR/export-FORMAT).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (the source checkpoint's), float16, bfloat16 or float32.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing checkpoint folder if compress wrote it; never the run being exported.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the export summary as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
) -> None:
    """Save a compressed run as a compressed-tensors, GPTQ, dense, bitsandbytes or GGUF checkpoint (atomically)."""
    with exit_codes(verbose, as_json):
        from compress.recipe.errors import UserError
        from compress.export import export_run
        from compress.recipe.export_config import FORMATS

        if fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        if dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise UserError(f"--dtype must be auto, float16, bfloat16 or float32; got {dtype!r}")
        target = output or run_dir / f"export-{fmt}"
        summary = export_run(run_dir, fmt, target, dtype=dtype, overwrite=overwrite)
        if as_json:
            typer.echo(json.dumps(summary, indent=2, allow_nan=False))
        elif not quiet:
            err_console.print(f"wrote {summary['format']} checkpoint to {summary['path']} ({summary['bytes']:,} bytes)")
