"""`compress eval`: score a model without compressing it."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.common import err_console, exit_codes

EPILOG = (
    "Examples:\n\n"
    "  compress eval recipes/demo/model --perplexity recipes/demo/eval.txt\n\n"
    "  compress eval meta-llama/Llama-3.2-1B --perplexity wikitext2 --seq-len 2048 --json"
)


def evaluate(
    model: Annotated[str, typer.Argument(help="Model folder or hub id.")],
    perplexity: Annotated[list[str], typer.Option("--perplexity", "-p", help="Text to score: .txt, .jsonl (text field), or wikitext2 / c4. Repeatable.")],
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per window.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (*.bin) weights.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
) -> None:
    """Measure perplexity of a model (GPTQ protocol: non-overlapping windows of --seq-len tokens)."""
    with exit_codes(verbose):
        from compress.context import RunContext
        from compress.errors import UserError
        from compress.model_io import DTYPES, load_model
        from evaluators.perplexity import PerplexityConfig, evaluate_perplexity

        if dtype != "auto" and dtype not in DTYPES:
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
        from compress.progress import Reporter

        reporter = Reporter(err_console, enabled=not quiet and not as_json)
        with reporter.status(f"loading {model}"):
            handle = load_model(model, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        run = RunContext(device=handle.device, reporter=reporter)
        results = [
            evaluate_perplexity(handle, PerplexityConfig(dataset=ref, seq_len=seq_len, batch_size=batch_size), run)
            for ref in perplexity
        ]
        if as_json:
            payload = {"model": model, "perplexity": {r.label: {"value": r.value, "protocol": r.details} for r in results}}
            typer.echo(json.dumps(payload, indent=2))
        elif not quiet:
            table = Table(title=f"perplexity: {model}")
            table.add_column("dataset")
            table.add_column("perplexity", justify="right")
            table.add_column("windows", justify="right")
            for r in results:
                table.add_row(r.label, f"{r.value:.4f}", str(r.details["windows"]))
            err_console.print(table)
