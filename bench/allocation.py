"""Mixed-precision bit allocation on the demo model: perplexity against average bits, per sensitivity estimator.

    python bench/allocation.py                                   # writes bench/results/allocation.md
    python bench/allocation.py --samples 16 --eval-windows 20    # quicker
    python bench/allocation.py ... 2> progress.log; python bench/allocation.py ... --resume-log progress.log
                                                                 # an interrupted run goes on where it stopped

For each estimator (hessian_trace, fisher, delta_loss, io_similarity) the sensitivities are computed once and
saved (as `compress sensitivity` does), then reused for every budget (2.5, 3.0, 3.5, 4.0 average bits, scales
included) with the `ilp` solver, each followed by GPTQ g128 on a fresh model. Uniform GPTQ at 2, 3 and 4 bits
(same group size, same calibration windows) is the baseline. No peer (llm-compressor, GPTQModel, ModelOpt) picks
per-layer widths for LLMs from sensitivities under a size budget, so there is no peer column.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compress.engine.context import RunContext, RunInputs  # noqa: E402
from compress.engine.data import load_text, sample_windows, tokenize_text  # noqa: E402
from compress.engine.model_io import ModelHandle, load_model  # noqa: E402
from compress.recipe.schema import parse_recipe  # noqa: E402
from compress.app.runner import run_passes  # noqa: E402
from compress.compressors.allocate import AllocateConfig, compute_sensitivities  # noqa: E402
from compress.compressors.gptq import GPTQConfig  # noqa: E402
from compress.evaluators.perplexity import perplexity_of  # noqa: E402

DEMO = REPO / "recipes" / "demo"
SEQ_LEN = 512
GROUP_SIZE = 128
ESTIMATORS = ("hessian_trace", "fisher", "io_similarity", "delta_loss")
BUDGETS = (2.5, 3.0, 3.5, 4.0)
UNIFORM_BITS = (2, 3, 4)

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def load() -> ModelHandle:
    return load_model(str(DEMO / "model"), dtype="float32", device="cpu")


def quantize_and_score(passes: str, calibration: torch.Tensor, eval_ids: torch.Tensor,
                       eval_windows: int | None) -> dict[str, Any]:
    recipe = parse_recipe(f"calibration: {{dataset: calib.txt, samples: {len(calibration)}, seq_len: {SEQ_LEN}}}\n"
                          f"passes: {passes}\n", filename="<bench allocation>", base_dir=DEMO)
    handle = load()
    run = RunContext(RunInputs(device=handle.device, calibration=calibration, calibration_batch_size=8))
    start = time.perf_counter()
    run_passes(handle, recipe.passes, run)
    seconds = time.perf_counter() - start
    params = sum(q.codes.numel() for q in run.results.records.values())
    bits = sum(q.storage_bits().total for q in run.results.records.values())
    ppl, _ = perplexity_of(handle.model, eval_ids, SEQ_LEN, 8, torch.device("cpu"), eval_windows)
    return {"perplexity": ppl, "avg_bits": bits / params, "bytes": bits // 8, "seconds": seconds,
            "allocation": run.results.report_sections.get("allocation")}


PROGRESS = re.compile(r"^(?:uniform W(?P<bits>\d)|(?P<est>\w+) @ (?P<budget>[\d.]+)): (?P<ppl>[\d.]+) at (?P<avg>[\d.]+)"
                      r"(?: in (?P<seconds>[\d.]+) s)?$")


def read_progress(path: Path | None) -> tuple[dict[int, dict[str, Any]], dict[str, dict[float, dict[str, Any]]]]:
    """Results already printed by a run with the same settings (its stderr), so it need not be repeated."""
    uniform: dict[int, dict[str, Any]] = {}
    mixed: dict[str, dict[float, dict[str, Any]]] = {}
    for line in (path.read_text().splitlines() if path else []):
        match = PROGRESS.match(line.strip())
        if not match:
            continue
        result = {"perplexity": float(match["ppl"]), "avg_bits": float(match["avg"]),
                  "seconds": float(match["seconds"]) if match["seconds"] else None}
        if match["bits"]:
            uniform[int(match["bits"])] = result
        else:
            mixed.setdefault(match["est"], {})[float(match["budget"])] = result
    return uniform, mixed


@app.command()
def main(
    samples: Annotated[int, typer.Option(help="calibration windows of 512 tokens for GPTQ")] = 32,
    sensitivity_samples: Annotated[int, typer.Option(help="windows the sensitivity estimators use")] = 4,
    max_probes: Annotated[int, typer.Option(help="Hutchinson probes per decoder layer at most")] = 16,
    eval_windows: Annotated[int, typer.Option(help="evaluation windows (0: all 103)")] = 0,
    estimators: Annotated[str, typer.Option(help="comma-separated subset")] = ",".join(ESTIMATORS),
    output: Annotated[Path, typer.Option(help="markdown file to write")] = REPO / "bench" / "results" / "allocation.md",
    resume_log: Annotated[Optional[Path], typer.Option(help="stderr of an interrupted run with the same settings")] = None,
) -> None:
    load_before = os.getloadavg()
    started = time.perf_counter()
    handle = load()
    calibration = sample_windows(tokenize_text(handle.tokenizer, load_text(str(DEMO / "calib.txt"))), samples, SEQ_LEN, 0)
    eval_ids = tokenize_text(handle.tokenizer, load_text(str(DEMO / "eval.txt")))
    windows = eval_windows or None
    fp, counts = perplexity_of(handle.model, eval_ids, SEQ_LEN, 8, torch.device("cpu"), windows)
    gptq = f"{{gptq: {{bits: 4, group_size: {GROUP_SIZE}}}}}"

    uniform, mixed = read_progress(resume_log)
    sensitivity_seconds: dict[str, float] = {}

    def write() -> None:
        text = render(fp, counts, uniform, mixed, sensitivity_seconds, samples, sensitivity_samples, max_probes,
                      load_before, time.perf_counter() - started)
        if resume_log is not None:
            text += (f"\nRows without seconds were measured by an earlier, interrupted run with the same settings "
                     f"(its progress log: {resume_log.name}); totals and load above are of the resumed run.\n")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")

    for bits in UNIFORM_BITS:
        if bits in uniform:
            continue
        uniform[bits] = quantize_and_score(f"[{{gptq: {{bits: {bits}, group_size: {GROUP_SIZE}}}}}]", calibration,
                                           eval_ids, windows)
        result = uniform[bits]
        print(f"uniform W{bits}: {result['perplexity']:.3f} at {result['avg_bits']:.4f} in {result['seconds']:.1f} s",
              file=sys.stderr)
        write()

    with tempfile.TemporaryDirectory() as tmp:
        for estimator in [e.strip() for e in estimators.split(",") if e.strip()]:
            if all(b in mixed.get(estimator, {}) for b in BUDGETS):
                continue
            cfg = AllocateConfig(sensitivity=estimator, budget={"avg_bits": 3.0}, samples=sensitivity_samples,  # type: ignore[arg-type]
                                 max_probes=max_probes)
            run = RunContext(RunInputs(device=handle.device, calibration=calibration, calibration_batch_size=8))
            document = compute_sensitivities(handle, cfg, GPTQConfig(bits=4, group_size=GROUP_SIZE), run)
            sensitivity_seconds[estimator] = document["seconds"]
            path = Path(tmp) / f"{estimator}.json"
            path.write_text(json.dumps(document))
            mixed.setdefault(estimator, {})
            for budget in BUDGETS:
                if budget in mixed[estimator]:
                    continue
                passes = (f"[{{allocate: {{sensitivity: {estimator}, sensitivity_file: {path}, "
                          f"budget: {{avg_bits: {budget}}}}}}}, {gptq}]")
                mixed[estimator][budget] = quantize_and_score(passes, calibration, eval_ids, windows)
                result = mixed[estimator][budget]
                print(f"{estimator} @ {budget}: {result['perplexity']:.3f} at {result['avg_bits']:.4f} in "
                      f"{result['seconds']:.1f} s", file=sys.stderr)
                write()
    write()
    print(output.read_text())


def render(fp: float, counts: dict[str, int], uniform: dict[int, dict[str, Any]],
           mixed: dict[str, dict[float, dict[str, Any]]], sensitivity_seconds: dict[str, float], samples: int,
           sensitivity_samples: int, max_probes: int, load_before: tuple[float, float, float], total: float) -> str:
    import transformers

    load_after = os.getloadavg()
    lines = [
        "## Mixed-precision bit allocation (demo model)",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, python {platform.python_version()}",
        f"- load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (the machine is shared: seconds are "
        f"noisy); total {total:.0f} s; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- GPTQ g{GROUP_SIZE} symmetric, {samples} calibration windows x {SEQ_LEN} tokens (seed 0); sensitivities on "
        f"the first {sensitivity_samples} windows (Hutchinson: at most {max_probes} probes per layer, tol 0.01), "
        f"solver `ilp`, candidates 2/3/4/8 bits",
        f"- perplexity: token_ppl v1 on recipes/demo/eval.txt, {counts['windows']} windows of {SEQ_LEN}; fp {fp:.3f}",
        "- average bits count codes + 16-bit scales per group of 128 (uniform W3 g128 is 3.125, not 3.0), over the "
        "quantized linears; the allocator's budget is the same quantity and is never exceeded",
        "- no peer column: llm-compressor, GPTQModel and ModelOpt have no sensitivity-driven bit allocation for LLMs",
        "",
        "Perplexity (and average bits actually used) at each budget:",
        "",
        "| scheme | " + " | ".join(f"budget {b}" for b in BUDGETS) + " | sensitivity s |",
        "|---|" + "---:|" * (len(BUDGETS) + 1),
    ]
    for estimator, row in mixed.items():
        cells = [f"{row[b]['perplexity']:.3f} ({row[b]['avg_bits']:.3f})" if b in row else "not run" for b in BUDGETS]
        spent = sensitivity_seconds.get(estimator)
        lines.append(f"| {estimator} + ilp, then GPTQ | " + " | ".join(cells) + f" | {_seconds(spent)} |")
    lines += ["", "Uniform GPTQ, same group size and calibration:", "", "| scheme | avg bits | perplexity | seconds |",
              "|---|---:|---:|---:|"]
    for bits, result in sorted(uniform.items()):
        lines.append(f"| GPTQ W{bits} g{GROUP_SIZE} | {result['avg_bits']:.3f} | {result['perplexity']:.3f} | "
                     f"{_seconds(result['seconds'])} |")
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    app()
