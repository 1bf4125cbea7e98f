"""Pruning benchmark against llm-compressor: SparseGPT and Wanda at 50% unstructured and 2:4, same model, same
calibration windows, same perplexity protocol; plus our magnitude baseline, joint 2:4 + GPTQ W4, and the structured
passes (which the peer does not have) with their parameter counts and forward time.

    python bench/pruning.py                       # writes bench/results/pruning.md
    python bench/pruning.py --quick               # 16 samples, 8 eval windows

Run it with the bench venv (`.venv-bench/bin/python`, llm-compressor installed, our package on
PYTHONPATH) to get the peer's columns; without llm-compressor those cells say so. Seconds are wall time of the
compression call only (our `run_passes`, the peer's `oneshot`), one run each.
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
from typing import Annotated, Any, Callable

import torch
import typer
from rich.console import Console

from compress.engine.context import RunContext, RunInputs
from compress.engine.data import load_text, sample_windows, tokenize_text
from compress.engine.model_io import load_model
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_passes

from tools import CALIBRATION_BATCH, Outcome, Setup, _describe, _peer_loader, peer_version

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo"
SEQ_LEN = 512
DAMPENING_FRAC, BLOCK_SIZE = 0.01, 128

console = Console(stderr=True)
app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@dataclass(frozen=True)
class PruneScheme:
    """ours: our `passes:` list as YAML flow text; peer: builds llm-compressor modifiers, or None (ours only)."""

    title: str
    ours: str
    peer: Callable[[], list[Any]] | None


# The peer names a pruned module "<target>.<child>", so its ignore needs a regex for lm_head (plain "lm_head"
# lets it prune lm_head and, through tied weights, the embeddings; its own warning says to use this).
PEER_IGNORE = ["re:.*lm_head"]


def _peer(kind: str, structure: str) -> Callable[[], list[Any]]:
    def build() -> list[Any]:
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        if kind == "sparsegpt":
            return [SparseGPTModifier(sparsity=0.5, mask_structure=structure, ignore=PEER_IGNORE,
                                      dampening_frac=DAMPENING_FRAC, block_size=BLOCK_SIZE)]
        return [WandaPruningModifier(sparsity=0.5, mask_structure=structure, ignore=PEER_IGNORE)]

    return build


SCHEMES = [
    PruneScheme("SparseGPT 50%", "[sparsegpt: {sparsity: 0.5}]", _peer("sparsegpt", "0:0")),
    PruneScheme("SparseGPT 2:4", "[sparsegpt: {pattern: '2:4'}]", _peer("sparsegpt", "2:4")),
    PruneScheme("Wanda 50%", "[wanda: {sparsity: 0.5}]", _peer("wanda", "0:0")),
    PruneScheme("Wanda 2:4", "[wanda: {pattern: '2:4'}]", _peer("wanda", "2:4")),
    PruneScheme("magnitude 50%", "[magnitude: {sparsity: 0.5}]", None),
    PruneScheme("magnitude 2:4", "[magnitude: {pattern: '2:4'}]", None),
    PruneScheme("SparseGPT 2:4 + GPTQ W4 g128", "[sparsegpt: {pattern: '2:4'}, gptq: {bits: 4, group_size: 128}]", None),
    PruneScheme("OWL 50% + Wanda", "[owl: {sparsity: 0.5}, wanda: {sparsity: 0.5}]", None),
    PruneScheme("layer_drop 1 of 4 layers", "[layer_drop: {count: 1}]", None),
    PruneScheme("width_prune 50% heads + 25% MLP, compensated",
                "[width_prune: {attention_ratio: 0.5, mlp_ratio: 0.25, compensate: true}]", None),
]


def linear_sparsity(model: torch.nn.Module) -> float:
    """Share of exact zeros over the Linear weights inside the decoder layers (lm_head is not pruned)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


@torch.no_grad()
def forward_ms(model: torch.nn.Module, setup: Setup, repeats: int = 5) -> float:
    """Best-of-`repeats` milliseconds for one forward of 8 x 512 tokens (structured pruning should shrink it)."""
    batch = setup.eval_ids[: 8 * SEQ_LEN].reshape(8, SEQ_LEN)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch, use_cache=False)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def run_ours(scheme: PruneScheme, setup: Setup) -> Outcome:
    text = f"calibration: {{dataset: calib.txt, samples: {len(setup.calibration)}, seq_len: {SEQ_LEN}}}\n"
    recipe = parse_recipe(text + f"passes: {scheme.ours}\n", filename=f"<bench {scheme.title}>", base_dir=DEMO)
    handle = setup.load()
    run = RunContext(RunInputs(device=handle.device, calibration=setup.calibration, calibration_batch_size=CALIBRATION_BATCH))
    start = time.perf_counter()
    run_passes(handle, recipe.passes, run)
    seconds = time.perf_counter() - start
    checks = {"sparsity": round(linear_sparsity(handle.model), 4), "parameters": handle.parameter_count(),
              "forward_ms": round(forward_ms(handle.model, setup), 1), "fallbacks": len(run.results.fallbacks)}
    return Outcome(setup.perplexity(handle.model), seconds, checks=checks)


def run_peer(scheme: PruneScheme, setup: Setup) -> Outcome:
    if scheme.peer is None:
        return Outcome(error="no such method in the peer")
    try:
        from llmcompressor import oneshot
    except Exception as exc:
        return Outcome(error=f"llmcompressor not importable: {type(exc).__name__}")
    handle = setup.load()
    try:
        recipe = scheme.peer()
        start = time.perf_counter()
        model = oneshot(model=handle.model, tokenizer=handle.tokenizer, recipe=recipe,
                        dataset=_peer_loader(setup.calibration), num_calibration_samples=len(setup.calibration),
                        max_seq_length=SEQ_LEN)
        seconds = time.perf_counter() - start
    except Exception as exc:  # a refusal is a result to report
        return Outcome(error=_describe(exc))
    checks = {"sparsity": round(linear_sparsity(model), 4)}
    return Outcome(setup.perplexity(model), seconds, checks=checks)


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _row(scheme: PruneScheme, ours: Outcome, peer: Outcome, baseline: float, base_params: int) -> str:
    ppl = ours.perplexity
    change = "—" if ppl is None else f"{(ppl / baseline - 1) * 100:+.1f}%"
    peer_ppl = _fmt(peer.perplexity, 3) if not peer.error else (peer.error if scheme.peer is None else f"failed: {peer.error}")
    params = ours.checks.get("parameters", base_params)
    cells = [scheme.title, _fmt(ppl, 3), change, peer_ppl, _fmt(ours.seconds, 1), _fmt(peer.seconds, 1),
             f"{ours.checks.get('sparsity', 0):.3f}", _fmt(peer.checks.get("sparsity"), 3) if peer.checks else "—",
             f"{params:,} ({params / base_params:.0%})", f"{ours.checks.get('forward_ms', 0):.0f}"]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


@app.command()
def main(
    samples: Annotated[int, typer.Option(help="calibration windows of 512 tokens, shared by both tools")] = 128,
    quick: Annotated[bool, typer.Option(help="smoke run: 16 samples, 8 eval windows")] = False,
    output: Annotated[Path, typer.Option(help="Markdown section to write")] = REPO / "bench" / "results" / "pruning.md",
    only: Annotated[str, typer.Option(help="comma-separated scheme titles (prefix match); empty = all")] = "",
    eval_windows: Annotated[int, typer.Option(help="score only the first N eval windows; 0 = all")] = 0,
) -> None:
    if quick:
        samples, eval_windows = min(samples, 16), 8
    load_before = os.getloadavg()
    handle = load_model(str(DEMO / "model"), dtype="float32", device="cpu")
    setup = Setup(DEMO / "model",
                  sample_windows(tokenize_text(handle.tokenizer, load_text(str(DEMO / "calib.txt"))), samples, SEQ_LEN, 0),
                  tokenize_text(handle.tokenizer, load_text(str(DEMO / "eval.txt"))), SEQ_LEN, eval_windows or None)
    baseline, base_params, base_ms = setup.perplexity(handle.model), handle.parameter_count(), forward_ms(handle.model, setup)
    del handle
    console.print(f"fp32 baseline perplexity {baseline:.4f}, {base_params:,} parameters, forward {base_ms:.0f} ms")
    wanted = [s for s in SCHEMES if not only or any(s.title.startswith(p.strip()) for p in only.split(","))]
    rows = []
    for scheme in wanted:
        with console.status(f"{scheme.title}: ours"):
            ours = run_ours(scheme, setup)
        with console.status(f"{scheme.title}: llm-compressor"):
            peer = run_peer(scheme, setup)
        rows.append(_row(scheme, ours, peer, baseline, base_params))
        console.print(rows[-1])
        # Rewritten after every row, so a long run interrupted half-way still leaves its finished rows.
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(_markdown(rows, baseline, base_params, base_ms, samples, eval_windows, load_before),
                          encoding="utf-8")
    console.print(f"wrote {output}")


def _markdown(rows: list[str], baseline: float, base_params: int, base_ms: float, samples: int, eval_windows: int,
              load_before: tuple[float, float, float]) -> str:
    load_after = os.getloadavg()
    from importlib.metadata import version

    lines = [
        "## Pruning: compress vs. llm-compressor",
        "",
        "Generated by `bench/pruning.py`; do not edit by hand.",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- machine: `nproc` = {os.cpu_count()}, no GPU, torch threads = {torch.get_num_threads()}; load average (1 min) "
        f"at start / end: {load_before[0]:.1f} / {load_after[0]:.1f}"
        + (" — **shared with other jobs, so seconds are noisy**" if max(load_before[0], load_after[0]) > 2 else ""),
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers {version('transformers')}, "
        f"llmcompressor {peer_version() or 'not installed'}",
        f"- model: `recipes/demo/model` (Llama, 4 layers, hidden 256, {base_params:,} parameters), fp32 on CPU; "
        f"fp32 perplexity {baseline:.3f}, forward of 8 x 512 tokens {base_ms:.0f} ms",
        f"- calibration: {samples} windows of {SEQ_LEN} tokens from `recipes/demo/calib.txt` (`sample_windows`, seed 0), "
        "the same token tensors for both tools, batches of 8",
        "- evaluation: token_ppl v1 on `recipes/demo/eval.txt`" + (f", first {eval_windows} windows of 512 tokens" if eval_windows else ", all windows"),
        "- settings: lm_head (tied to the embeddings) dense in both (the peer needs `ignore: ['re:.*lm_head']`); SparseGPT dampening 0.01, block 128; the peer's mask_structure '0:0' "
        "(unstructured) or '2:4'. sparsity = share of exact zeros in the decoder layers' Linear weights.",
        "- seconds: wall time of the compression call only (our `run_passes`, the peer's `oneshot`), one run each; "
        "forward ms: best of 5 forwards of 8 x 512 tokens of the compressed model (ours)",
        "",
        "| scheme | our ppl | vs fp | peer ppl | our s | peer s | our sparsity | peer sparsity | parameters | forward ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Differences that remain with matched settings: the peer selects SparseGPT's unstructured mask with a "
        "threshold (`<=`, ties may prune a few more), ours with an exact top-k per block; both run the sublayers of a "
        "decoder layer on one calibration forward and feed the next layer the pruned layer's outputs.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
