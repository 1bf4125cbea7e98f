"""`compress eval`: score a model (any local HF checkpoint or hub id) without compressing it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from compress.cli.common import err_console, exit_codes, sigterm_as_interrupt

if TYPE_CHECKING:
    from rich.table import Table

EPILOG = (
    "Examples:\n\n"
    "  compress eval recipes/demo/model --perplexity recipes/demo/eval.txt --max-windows 16\n\n"
    "  compress eval out/w4-ct --zero-shot piqa,arc_easy --limit 100 --data-dir ../shared/data -o scores.json\n\n"
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
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", min=1, help="Score only the first N perplexity windows of each data set.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results as JSON to this file, rewritten after each finished data set or task (a stopped eval keeps what finished).")] = None,
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
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Score afresh; neither read nor write the cache of earlier scores and token ids ($COMPRESS_CACHE_DIR, default ~/.cache/compress).")] = False,
) -> None:
    """Score a model: perplexity (GPTQ protocol) and zero-shot accuracy (lm-evaluation-harness semantics)."""
    with exit_codes(verbose, as_json, on_interrupt=INTERRUPTED), sigterm_as_interrupt():
        from pydantic import ValidationError

        from compress.app.baseline import baseline_step, model_material
        from compress.app.runner import cache_for
        from compress.engine.context import RunCache, RunContext, RunInputs
        from compress.recipe.schema import EvalStep
        from compress.recipe.errors import UserError
        from compress.engine.model_io import DTYPES, PositionsNeeded, load_model
        from compress.engine.progress import Reporter
        from compress.cli.common import register_builtins
        from compress.recipe.registry import StrictConfig, available_evaluators

        register_builtins()

        if dtype != "auto" and dtype not in DTYPES:
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
        requested: list[tuple[str, dict[str, Any]]] = [
            ("perplexity", {"dataset": ref, "seq_len": seq_len, "batch_size": batch_size, "stride": stride, "data_dir": data_dir,
                            "max_windows": max_windows})
            for ref in _split(perplexity)
        ]
        # one step per task, so each task's result is shown and saved when it finishes, not after the last one
        requested += [("zero_shot", {"tasks": [task], "limit": limit, "batch_size": batch_size, "data_dir": data_dir})
                      for task in _split(zero_shot)]
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

        ref = model_to_load(model)
        saved = ResultsFile(output, model) if output is not None else None
        reporter = Reporter(err_console, enabled=not quiet and not as_json)
        with reporter.status(f"loading {model}"):
            handle = load_model(ref, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                strict_weights=strict_weights,
                                positions=[PositionsNeeded(seq_len, "--seq-len")] if perplexity else [])
        cache = cache_for(not no_cache, reporter)
        run = RunContext(RunInputs(device=handle.device, reporter=reporter), cache=RunCache(cache))
        # the same key as a run's baseline, so `compress eval` of a model and a recipe's baseline share entries
        load_settings = {"dtype": dtype, "lazy": False, "strict_weights": strict_weights,
                         "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        model_key = model_material(handle, cache, load_settings) if cache is not None else None
        results: list[Any] = []
        for index, (name, config) in enumerate(steps):
            scored = baseline_step(handle, EvalStep(name, registry[name], config), run, cache, model_key)
            finished = [dataclasses.replace(r, details={**r.details, "from_cache": scored.from_cache})
                        for r in scored.results]
            results.extend(finished)
            if saved is not None:
                saved.write(results, pending=len(steps) - index - 1)
            if not quiet and not as_json:
                for result in finished:  # shown as it finishes: an eval stopped later keeps it on screen
                    source = " (from the cache)" if scored.from_cache else ""
                    err_console.print(f"done: {result.metric} {result.label} = {result.value:.4f}{source}")
        if as_json:
            from compress.report.summary import finite_or_null

            typer.echo(json.dumps(finite_or_null(results_payload(model, results)), indent=2, allow_nan=False))
        elif not quiet:
            err_console.print(results_table(model, results))


def results_payload(model: str, results: list[Any]) -> dict[str, Any]:
    """`{"model": ..., "<metric>": {"<dataset or task>": {"value", "stderr"?, "from_cache"?, "protocol"}}}`."""
    payload: dict[str, Any] = {"model": model}
    for r in results:
        entry = {"value": r.value, "protocol": {k: v for k, v in r.details.items() if k != "from_cache"}}
        if "stderr" in r.details:
            entry["stderr"] = r.details["stderr"]
        if "from_cache" in r.details:  # read from the cache of earlier scores, not computed now
            entry["from_cache"] = r.details["from_cache"]
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


def model_to_load(model: str) -> str:
    """`model` as load_model should get it: an absolute folder or a hub id.

    A path that is not a model folder is exit 2 naming it; a compress run folder (or a path inside one that is not
    there, such as `out/w4/model`) gets what to pass instead, since an ordinary run writes no model folder.
    """
    from compress.recipe.errors import UserError
    from compress.recipe.model_ref import ModelRefError, resolve_model_ref

    try:
        resolved = resolve_model_ref(model, Path.cwd())
    except ModelRefError as exc:
        hint = run_folder_hint(Path(model).expanduser().absolute())
        raise UserError(f"no model folder at {Path(model).expanduser().absolute()}: {hint}" if hint else str(exc)) from None
    if resolved.folder is not None and not (resolved.folder / "config.json").is_file():
        hint = run_folder_hint(resolved.folder)
        if hint:
            raise UserError(f"no model folder at {resolved.folder}: {hint}")
    return resolved.resolved


def run_folder_hint(path: Path) -> str:
    """"" unless `path` is, or lies inside, a compress run folder; then what to evaluate instead."""
    from compress.engine.output import is_earlier_output

    run_dir = next((folder for folder in (path, *path.parents) if folder.is_dir()), None)
    if run_dir is None or not (run_dir / "report.json").is_file() or not is_earlier_output(run_dir):
        return ""
    exports = sorted(str(sub) for sub in run_dir.iterdir() if _is_model_output(sub))
    if exports:
        return f"{run_dir} is a compress run folder; its model is in {' or '.join(exports)}: pass that"
    return (f"{run_dir} is a compress run folder, and an ordinary run writes no model folder. Export it first "
            f"(`compress export {run_dir} --format compressed-tensors --output {run_dir}-ct`, then "
            f"`compress eval {run_dir}-ct ...`), or add `export:` to the recipe")


def _is_model_output(folder: Path) -> bool:
    """An export inside a run folder (marked kind "export"), or a lazy run's `model/`; not the run's own `state/`."""
    from compress.engine.output import MARKER

    if not (folder / "config.json").is_file():
        return False
    if folder.name == "model":
        return True
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind") == "export"
    except (OSError, ValueError, AttributeError):
        return False


class ResultsFile:
    """`compress eval --output`: the results so far, rewritten atomically after each finished step.

    An existing file is replaced only when it is an earlier `compress eval` result, so a typo cannot clobber a
    recipe or a report.
    """

    WRITER = "compress eval"

    def __init__(self, path: Path, model: str) -> None:
        from compress.recipe.errors import UserError

        self.path, self.model = path, model
        if path.is_dir():
            raise UserError(f"--output {path} is a folder; give a file name such as {path / 'scores.json'}")
        if path.exists() and not self._is_earlier_result(path):
            raise UserError(f"--output {path} exists and is not an earlier `compress eval` result; "
                            "choose another file or remove it")
        if not path.parent.is_dir():
            raise UserError(f"--output {path}: folder {path.parent} does not exist")

    @classmethod
    def _is_earlier_result(cls, path: Path) -> bool:
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("written_by") == cls.WRITER
        except (OSError, ValueError, AttributeError):
            return False

    def write(self, results: list[Any], *, pending: int) -> None:
        from compress.report.summary import finite_or_null

        payload = {"written_by": self.WRITER, "complete": pending == 0, "pending_steps": pending,
                   **results_payload(self.model, results)}
        from compress.engine.output import replace_atomically

        replace_atomically(self.path, json.dumps(finite_or_null(payload), indent=2, allow_nan=False) + "\n")
