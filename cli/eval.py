"""`compress eval`: score a model (any local HF checkpoint or hub id) without compressing it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from compress.cli.common import err_console, exit_codes, sigterm_as_interrupt

if TYPE_CHECKING:
    from rich.table import Table

EPILOG = (
    "Examples:\n\n"
    "  compress eval recipes/demo/model --perplexity recipes/demo/eval.txt\n\n"
    "  compress eval out/w4/model --zero-shot piqa,arc_easy --perplexity wikitext2 --data-dir ../shared/data\n\n"
    "  compress eval recipes/demo/model --zero-shot recipes/demo/cloze.jsonl --limit 200 --json\n\n"
    "  compress eval meta-llama/Llama-3.2-1B --perplexity wikitext2,c4 --seq-len 2048 --stride 512"
)
INTERRUPTED = "interrupted: the evaluation stopped before it finished"


def _split(values: list[str] | None) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def evaluate(
    model: Annotated[str, typer.Argument(help="Model folder or hub id.")],
    perplexity: Annotated[Optional[list[str]], typer.Option("--perplexity", "-p", help="Text to score: .txt, .jsonl (text field), or wikitext2 / c4. Repeatable or comma-separated.")] = None,
    zero_shot: Annotated[Optional[list[str]], typer.Option("--zero-shot", "-z", help="Zero-shot tasks: piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, lambada_openai, or a {context, choices, gold} .jsonl. Repeatable or comma-separated.")] = None,
    lm_eval_tasks: Annotated[Optional[list[str]], typer.Option("--lm-eval", help="Tasks run by lm-evaluation-harness itself (needs compress[lm-eval]).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per perplexity window.")] = 512,
    stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="Sliding perplexity windows every N tokens (token_ppl v2); default: disjoint windows (v1).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Score only the first N documents of each zero-shot task.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Local copies of the hub data sets, laid out like ../shared/data (default $COMPRESS_DATA_DIR).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows (perplexity) or inputs (zero-shot) per forward pass.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (*.bin) weights.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    strict_weights: Annotated[bool, typer.Option("--strict-weights/--no-strict-weights", help="Refuse a checkpoint whose tensors do not match its config.json (missing, unexpected or reshaped); --no-strict-weights scores it anyway.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of internal errors.")] = False,
) -> None:
    """Score a model: perplexity (GPTQ protocol) and zero-shot accuracy (lm-evaluation-harness semantics)."""
    with exit_codes(verbose, as_json, on_interrupt=INTERRUPTED), sigterm_as_interrupt():
        from pydantic import ValidationError

        from compress.engine.context import RunContext, RunInputs
        from compress.recipe.errors import UserError
        from compress.engine.model_io import DTYPES, PositionsNeeded, load_model
        from compress.engine.progress import Reporter
        from compress.cli.common import register_builtins
        from compress.recipe.registry import StrictConfig, available_evaluators

        register_builtins()

        if dtype != "auto" and dtype not in DTYPES:
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
        requested: list[tuple[str, dict[str, Any]]] = [
            ("perplexity", {"dataset": ref, "seq_len": seq_len, "batch_size": batch_size, "stride": stride, "data_dir": data_dir})
            for ref in _split(perplexity)
        ]
        if zero_shot:
            requested.append(("zero_shot", {"tasks": _split(zero_shot), "limit": limit, "batch_size": batch_size, "data_dir": data_dir}))
        if lm_eval_tasks:
            requested.append(("lm_eval", {"tasks": _split(lm_eval_tasks), "limit": limit, "batch_size": batch_size, "data_dir": data_dir}))
        if not requested:
            raise UserError("nothing to evaluate: give --perplexity, --zero-shot and/or --lm-eval")
        registry = available_evaluators()
        steps: list[tuple[str, StrictConfig]] = []
        for name, params in requested:  # validate every option before loading the model
            try:
                steps.append((name, registry[name].config.model_validate(params)))
            except ValidationError as exc:
                raise UserError(f"--{name.replace('_', '-')}: " + "; ".join(e["msg"] for e in exc.errors())) from None

        for name, config in steps:  # a missing or malformed task file is reported before the model loads
            if name == "zero_shot":
                from compress.evaluators.zero_shot import ZeroShotConfig, check_task_files

                assert isinstance(config, ZeroShotConfig)
                check_task_files(config)

        reporter = Reporter(err_console, enabled=not quiet and not as_json)
        with reporter.status(f"loading {model}"):
            handle = load_model(model, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                strict_weights=strict_weights,
                                positions=[PositionsNeeded(seq_len, "--seq-len")] if perplexity else [])
        run = RunContext(RunInputs(device=handle.device, reporter=reporter))
        results = []
        for name, config in steps:
            returned = registry[name].apply(handle, config, run)
            results.extend(returned if isinstance(returned, list) else [returned])
        if as_json:
            from compress.report.summary import finite_or_null

            typer.echo(json.dumps(finite_or_null(results_payload(model, results)), indent=2, allow_nan=False))
        elif not quiet:
            err_console.print(results_table(model, results))


def results_payload(model: str, results: list[Any]) -> dict[str, Any]:
    """`{"model": ..., "<metric>": {"<dataset or task>": {"value", "stderr"?, "protocol"}}}`."""
    payload: dict[str, Any] = {"model": model}
    for r in results:
        entry = {"value": r.value, "protocol": r.details}
        if "stderr" in r.details:
            entry["stderr"] = r.details["stderr"]
        payload.setdefault(r.metric, {})[r.label] = entry
    return payload


def results_table(model: str, results: list[Any]) -> Table:
    from rich.table import Table

    table = Table(title=f"compress eval: {model}")
    for column, justify in (("metric", "left"), ("dataset / task", "left"), ("value", "right"), ("± stderr", "right"), ("protocol", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        stderr = r.details.get("stderr")
        protocol = f"{r.details.get('name')} v{r.details.get('version')}"
        count = r.details.get("docs", r.details.get("windows"))
        table.add_row(r.metric, r.label, f"{r.value:.4f}", "" if stderr is None else f"{stderr:.4f}",
                      f"{protocol} ({count} {'docs' if 'docs' in r.details else 'windows'})")
    return table
