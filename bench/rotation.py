"""Rotation before quantization on the demo model: W2 / W3, RTN / GPTQ, plain against rotated.

    python bench/rotation.py                       # writes bench/results/rotation.md, a row as each run finishes
    python bench/rotation.py --samples 16 --eval-windows 20   # quicker

Each row quantizes a fresh copy of the demo model (float32, CPU) with the same group size (g128, symmetric), the
same 128 calibration windows of 512 tokens (seed 0) for GPTQ, and scores token perplexity on disjoint 512-token
windows of recipes/demo/eval.txt. "rotated" runs `rotate: {seed: 0, untie_embeddings: true}` first (the demo
model's head is tied to its embeddings; untying adds one float16 vocabulary x hidden matrix, stated below, outside
the quantized linears, which is what the bits column counts).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import compress.app.builtins  # noqa: E402,F401  (registers the passes)
from compress.engine.context import RunContext, RunInputs  # noqa: E402
from compress.engine.data import load_text, sample_windows, tokenize_text  # noqa: E402
from compress.engine.model_io import ModelHandle, load_model  # noqa: E402
from compress.recipe.schema import parse_recipe  # noqa: E402
from compress.app.runner import run_passes  # noqa: E402
from compress.evaluators.perplexity import perplexity_of  # noqa: E402

DEMO = REPO / "recipes" / "demo"
OUTPUT = REPO / "bench" / "results" / "rotation.md"
SEQ_LEN = 512
GROUP_SIZE = 128
# The schemes (W3 / W2 g128), then per-channel ones, where one scale spans all 256 or 768 input columns and
# an outlier column costs the most.
SCHEMES = ((3, GROUP_SIZE), (2, GROUP_SIZE), (4, None), (3, None))
ROTATE = "{rotate: {seed: 0, untie_embeddings: true}}, "

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def load() -> ModelHandle:
    return load_model(str(DEMO / "model"), dtype="float32", device="cpu")


def score(passes: str, calibration: torch.Tensor, eval_ids: torch.Tensor, windows: int | None) -> dict[str, Any]:
    recipe = parse_recipe(f"calibration: {{dataset: calib.txt, samples: {len(calibration)}, seq_len: {SEQ_LEN}}}\n"
                          f"passes: [{passes}]\n", filename="<bench rotation>", base_dir=DEMO)
    handle = load()
    run = RunContext(RunInputs(device=handle.device, calibration=calibration, calibration_batch_size=8))
    start = time.perf_counter()
    entries, _ = run_passes(handle, recipe.passes, run)
    seconds = time.perf_counter() - start
    params = sum(q.codes.numel() for q in run.results.records.values())
    bits = sum(q.storage_bits().total for q in run.results.records.values())
    ppl, _ = perplexity_of(handle.model, eval_ids, SEQ_LEN, 8, torch.device("cpu"), windows)
    untied = next((e["modules"]["model.layers"]["untied_head_bytes"] for e in entries if e["name"] == "rotate"), 0)
    return {"perplexity": ppl, "avg_bits": bits / params if params else 32.0, "seconds": seconds, "untied": untied}


def header(samples: int, windows: int | None, fp: float) -> list[str]:
    load1, load5, load15 = os.getloadavg()
    return [
        "## Rotation (QuaRot-style) before RTN and GPTQ, demo model",
        "",
        f"- {datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}, load average "
        f"{load1:.2f} / {load5:.2f} / {load15:.2f} at the start (a shared machine: seconds are not comparable)",
        f"- symmetric integer grids (g{GROUP_SIZE}, then per output channel), {samples} calibration windows x {SEQ_LEN} tokens (seed 0) for GPTQ; token "
        f"perplexity on {'all' if windows is None else windows} disjoint {SEQ_LEN}-token windows of "
        "recipes/demo/eval.txt",
        "- rotated: `rotate: {seed: 0, untie_embeddings: true}` first: one random Hadamard rotation of the residual "
        "stream and one per head on the value/output path, fused into the weights after folding the norms' gains",
        f"- float32 model before quantization: perplexity {fp:.4f}; rotated and not quantized it is the same "
        "function (see the first rows)",
        "",
        "| scheme | method | plain ppl | rotated ppl | change | avg bits | plain s | rotated s |",
        "|---|---|---|---|---|---|---|---|",
    ]


@app.command()
def main(
    samples: Annotated[int, typer.Option(help="calibration windows of 512 tokens for GPTQ")] = 128,
    eval_windows: Annotated[Optional[int], typer.Option(help="evaluation windows (default: all)")] = None,
    output: Annotated[Path, typer.Option(help="markdown section to write")] = OUTPUT,
) -> None:
    handle = load()
    calibration = sample_windows(tokenize_text(handle.tokenizer, load_text(str(DEMO / "calib.txt"))), samples,
                                 SEQ_LEN, 0)
    eval_ids = tokenize_text(handle.tokenizer, load_text(str(DEMO / "eval.txt")))
    fp, _ = perplexity_of(handle.model, eval_ids, SEQ_LEN, 8, torch.device("cpu"), eval_windows)
    lines = header(len(calibration), eval_windows, fp)
    rotated_fp = score(ROTATE.rstrip(", "), calibration, eval_ids, eval_windows)
    lines.append(f"| float32 | none | {fp:.4f} | {rotated_fp['perplexity']:.4f} | "
                 f"{100 * (rotated_fp['perplexity'] / fp - 1):+.3f}% | 32 | 0 | {rotated_fp['seconds']:.1f} |")
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for bits, group in SCHEMES:
        for method in ("rtn", "gptq"):
            quantizer = f"{{{method}: {{bits: {bits}, group_size: {group or 'null'}}}}}"
            plain = score(quantizer, calibration, eval_ids, eval_windows)
            rotated = score(ROTATE + quantizer, calibration, eval_ids, eval_windows)
            change = 100 * (rotated["perplexity"] / plain["perplexity"] - 1)
            lines.append(f"| W{bits} {f'g{group}' if group else 'per-channel'} | {method} | {plain['perplexity']:.4f} | "
                         f"{rotated['perplexity']:.4f} | {change:+.2f}% | {plain['avg_bits']:.3f} | "
                         f"{plain['seconds']:.1f} | {rotated['seconds']:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines += ["", f"Untying the demo model's head adds {rotated_fp['untied']:,} bytes (float16 4096 x 256), outside the "
              "quantized linears the bits column counts."]
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    app()
