"""Serving formats on the demo model: FP8 (dynamic, static, block), NVFP4 and MXFP4, each with and without an FP8
KV cache, beside llm-compressor's presets (FP8_DYNAMIC, FP8, FP8_BLOCK, NVFP4A16, NVFP4, MXFP4A16 and its FP8
`kv_cache_scheme`) on the same calibration windows, scored by the same perplexity.

    python bench/serving_formats.py                              # what `make bench` runs
    python bench/serving_formats.py --samples 16 --max-windows 8 # smoke run

The protocol is bench/run.py's (bench/tools.py `Setup`): one fp32 model per run, freshly loaded, the same token
windows for both tools. Only perplexity is compared here (no timing goal). A peer run that refuses or fails is a
result, recorded with its message. The peer is checked for really computing quantized: its quantized linears and
its attention modules with a calibrated `k_scale`, and its logits' distance from the fp32 model's.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import torch
import typer

from compress.engine.data import load_text, sample_windows, tokenize_text
from compress.engine.model_io import load_model

from schemes import Scheme
from tools import Outcome, Setup, _describe, _peer_loader, _probe_logits, peer_version, run_ours

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo"
SEQ_LEN = 512
WITHIN = 0.005  # FP8 W8A8 dynamic must stay within 0.5% of fp32

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)

KV = "{kv_cache: {format: fp8, strategy: tensor}}"


@dataclass(frozen=True)
class Row:
    """One format: our passes (YAML flow list), the peer preset it matches (None: no peer row), whether it calibrates."""

    title: str
    ours: str
    preset: str | None
    calibrated: bool


BASE_ROWS = [
    Row("FP8 W8A8 dynamic (weights per channel, activations per token)",
        "[{rtn: {format: fp8, activations: {format: fp8, per: token}}}]", "FP8_DYNAMIC", False),
    Row("FP8 W8A8 static (weights and activations per tensor, min-max)",
        "[{rtn: {format: fp8, strategy: tensor, activations: {format: fp8, per: tensor, static: true}}}]", "FP8", True),
    Row("FP8 W8A8 static, MSE observer",
        "[{rtn: {format: fp8, strategy: tensor, activations: {format: fp8, per: tensor, static: true, observer: mse}}}]",
        None, True),
    Row("FP8 block (128x128 weights, activations per 128-group)",
        "[{rtn: {format: fp8, strategy: block, activations: {format: fp8, per: group}}}]", "FP8_BLOCK", False),
    Row("NVFP4 W4A16", "[{rtn: {format: nvfp4}}]", "NVFP4A16", False),
    Row("NVFP4 W4A4", "[{rtn: {format: nvfp4, activations: {format: nvfp4}}}]", "NVFP4", True),
    Row("MXFP4 W4A16", "[{rtn: {format: mxfp4}}]", "MXFP4A16", False),
]


def with_kv(row: Row) -> Row:
    return Row(f"{row.title} + FP8 KV cache", row.ours[:-1] + f", {KV}]", row.preset, True)


ROWS = [r for row in BASE_ROWS for r in (row, with_kv(row))]
PEER_KV = {"FP8_DYNAMIC", "NVFP4"}  # the peer's KV-cache rows (the presets issue 18 names)


def _peer_recipe(preset: str, kv_cache: bool) -> Callable[[], list[Any]]:
    def build() -> list[Any]:
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.quantization import QuantizationModifier

        kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True) if kv_cache else None
        return [QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"], kv_cache_scheme=kv)]

    return build


@torch.no_grad()
def _peer_checks(model: torch.nn.Module, reference: torch.Tensor, setup: Setup) -> dict[str, object]:
    quantized = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale"))
    kv_scaled = sum(1 for m in model.modules() if hasattr(m, "k_scale") and float(m.k_scale.float().max()) != 1.0)
    logits = model(setup.eval_ids[: setup.seq_len][None], use_cache=False).logits
    return {"quantized_linears": quantized, "attention_with_calibrated_k_scale": kv_scaled,
            "logits_max_abs_diff": round(float((logits - reference).abs().max()), 4)}


def run_peer_preset(preset: str, kv_cache: bool, setup: Setup) -> Outcome:
    try:
        from llmcompressor import oneshot
    except Exception as exc:
        return Outcome(error=f"llmcompressor not importable: {type(exc).__name__}: {exc}")
    handle = setup.load()
    reference = _probe_logits(handle.model, setup)
    kwargs = {"dataset": _peer_loader(setup.calibration), "num_calibration_samples": len(setup.calibration),
              "max_seq_length": setup.seq_len}
    try:
        start = time.perf_counter()
        model = oneshot(model=handle.model, tokenizer=handle.tokenizer, recipe=_peer_recipe(preset, kv_cache)(), **kwargs)
        seconds = time.perf_counter() - start
        checks = _peer_checks(model, reference, setup)
        return Outcome(setup.perplexity(model), seconds, checks=checks)
    except Exception as exc:  # a refusal (e.g. a format the CPU cannot run) is a result to report
        return Outcome(error=_describe(exc))


def run_our_row(row: Row, setup: Setup) -> Outcome:
    try:
        return run_ours(Scheme(row.title, row.title, row.ours, lambda: [], row.calibrated), setup)
    except Exception as exc:
        return Outcome(error=_describe(exc))


@app.command()
def main(
    samples: Annotated[int, typer.Option(help="calibration windows of 512 tokens, shared by both tools")] = 128,
    max_windows: Annotated[Optional[int], typer.Option(help="evaluation windows (default: all)")] = None,
    output: Annotated[Path, typer.Option(help="the Markdown section to write")] = REPO / "bench" / "results" / "serving_formats.md",
    peer: Annotated[bool, typer.Option(help="also run llm-compressor's presets")] = True,
    only: Annotated[str, typer.Option(help="run only the rows whose title contains this")] = "",
) -> None:
    load_before = os.getloadavg()
    handle = load_model(str(DEMO / "model"), dtype="float32", device="cpu")
    setup = Setup(model_dir=DEMO / "model",
                  calibration=sample_windows(tokenize_text(handle.tokenizer, load_text(str(DEMO / "calib.txt"))), samples,
                                             SEQ_LEN, seed=0),
                  eval_ids=tokenize_text(handle.tokenizer, load_text(str(DEMO / "eval.txt"))),
                  seq_len=SEQ_LEN, max_eval_windows=max_windows)
    baseline = setup.perplexity(handle.model)
    del handle
    print(f"fp32 baseline {baseline:.4f}", file=sys.stderr)
    results: list[tuple[Row, Outcome, Outcome | None]] = []
    for row in (r for r in ROWS if only in r.title):
        ours = run_our_row(row, setup)
        kv = row.title.endswith("KV cache")
        theirs = None
        if peer and row.preset is not None and (not kv or row.preset in PEER_KV):
            theirs = run_peer_preset(row.preset, kv, setup)
        results.append((row, ours, theirs))
        print(row.title, _cell(ours, baseline), "|", _cell(theirs, baseline) if theirs else "-", file=sys.stderr)
    output.write_text(markdown(results, baseline, samples, max_windows, load_before, os.getloadavg()), encoding="utf-8")
    print(f"wrote {output}", file=sys.stderr)


def _cell(outcome: Outcome | None, baseline: float) -> str:
    if outcome is None:
        return "—"
    if outcome.error or outcome.perplexity is None:
        return f"refused/failed: {outcome.error}"
    return f"{outcome.perplexity:.3f} ({100 * (outcome.perplexity / baseline - 1):+.2f}%)"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def markdown(results: list[tuple[Row, Outcome, Outcome | None]], baseline: float, samples: int,
             max_windows: int | None, load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    dynamic = results[0][1]
    verdict = ("—" if dynamic.perplexity is None else
               f"{'within' if dynamic.perplexity <= baseline * (1 + WITHIN) else 'NOT within'} {100 * WITHIN:.1f}% of fp32")
    lines = [
        "## Serving formats: FP8, NVFP4, MXFP4 and the FP8 KV cache",
        "",
        "Generated by `bench/serving_formats.py` (`make bench`). Re-run it to refresh this section; do not edit by hand.",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- machine: `nproc` = {os.cpu_count()}, no GPU, torch threads = {torch.get_num_threads()}; load average (1 min) "
        f"at start / end: {load_before[0]:.1f} / {load_after[0]:.1f}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers {_version('transformers')}, "
        f"llmcompressor {peer_version() or 'not installed'}, compressed-tensors {_version('compressed-tensors')}",
        "- model: `recipes/demo/model` (Llama, 4 layers, hidden 256), fp32 on CPU; everything is fake-quantized in "
        "the forward (weights on their grid, activations and the KV cache quantized in every forward)",
        f"- calibration: {samples} windows of {SEQ_LEN} tokens from `recipes/demo/calib.txt` (`sample_windows`, seed 0), "
        "the same tensors for both tools; static scales, NVFP4's global scales and the KV-cache scales come from them",
        f"- evaluation: `perplexity_of` (token_ppl v1, {SEQ_LEN}-token windows) on `recipes/demo/eval.txt`, "
        + ("all windows" if max_windows is None else f"first {max_windows} windows") + f"; fp32 baseline {baseline:.3f}",
        f"- ours: `rtn` onto each grid, then `kv_cache: {{format: fp8, strategy: tensor}}` (min-max) for the KV rows; "
        f"peer: `QuantizationModifier(scheme=<preset>, ignore=[lm_head])`, with `kv_cache_scheme` (FP8, per tensor, "
        "static) for its KV rows",
        f"- FP8 W8A8 dynamic: {verdict}",
        "",
        "| format | ours (vs fp32) | llm-compressor preset | peer (vs fp32) |",
        "|---|---:|---|---:|",
    ]
    for row, ours, theirs in results:
        preset = row.preset + (" + kv_cache_scheme" if row.title.endswith("KV cache") else "") if theirs else "—"
        lines.append(f"| {row.title} | {_cell(ours, baseline)} | {preset} | {_cell(theirs, baseline)} |".replace("\n", " "))
    lines += ["", "Peer checks (the scored peer model computes quantized):", ""]
    for row, _ours, theirs in results:
        if theirs is not None and theirs.checks:
            lines.append(f"- {row.title}: " + ", ".join(f"{k} {v}" for k, v in theirs.checks.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
