"""Bench: RTN and GPTQ at real vocabulary shapes, eager and `lazy: true`: wall time per phase, peak RSS, and whether
the compressed-tensors export reloaded by plain transformers measures what the run measured.

The models are tests/real_shapes.py's random-weight fixtures in bf16 safetensors: a Llama-3-shaped model (128,256-token
vocabulary, untied head, GQA, llama3 rope scaling) and a tied-embedding Qwen-style model (151,936 tokens). Widths are
small (hidden 64, 2 decoder layers) so the vocabulary-wide tensors (embeddings, head, logits) dominate, which is
what breaks tools at scale. Each run is `compress run` in a child process (its peak RSS is its own ru_maxrss) with
GPTQ or RTN, perplexity on recipes/demo/eval.txt, zero-shot on the first documents of recipes/demo/cloze.jsonl and
`export: {format: compressed-tensors}`. The export is then loaded with `AutoModelForCausalLM.from_pretrained` in
this process and its perplexity, by the same protocol, compared with the run's own `compressed` perplexity.

    python bench/real_shapes.py                  # writes bench/results/real_shapes.md
    python bench/real_shapes.py --shapes llama3 --methods gptq --modes eager

A lazy run's export is also compared, tensor for tensor, with the eager run's of the same model and method (run
just before it), and for the tied model the reload must give lm_head the embedding's storage (tied, stored once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASSES = {"rtn": "rtn: {bits: 4, group_size: 32}", "gptq": "gptq: {bits: 4, group_size: 32}"}
PHASES = ("load", "baseline_eval", "passes", "save", "eval", "total")


def recipe_text(model: Path, method: str, lazy: bool, args: argparse.Namespace) -> str:
    demo = REPO / "recipes" / "demo"
    return (
        f"model: {model}\ndevice: cpu\nlazy: {str(lazy).lower()}\n"
        f"calibration: {{dataset: {demo / 'calib.txt'}, samples: {args.samples}, seq_len: {args.seq_len}, seed: 0}}\n"
        f"passes:\n  - {PASSES[method]}\n"
        "evaluate:\n"
        f"  perplexity: [{{dataset: {demo / 'eval.txt'}, seq_len: {args.seq_len}, max_windows: {args.windows}}}]\n"
        f"  zero_shot: {{tasks: [{demo / 'cloze.jsonl'}], limit: {args.docs}}}\n"
        "export: {format: compressed-tensors}\n"
    )


def run_one(model: Path, shape: str, method: str, mode: str, work: Path, args: argparse.Namespace,
            eager_export: Path | None = None) -> dict:
    """One `compress run`; its output folder stays (the caller removes it) so a lazy row can be compared with it."""
    name = f"{shape}-{method}-{mode}"
    recipe = work / f"{name}.yaml"
    recipe.write_text(recipe_text(model, method, mode == "lazy", args), encoding="utf-8")
    out = work / f"out-{name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "compress.cli.main", "run", str(recipe), "--output", str(out), "--quiet"],
                          env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row: dict = {"shape": shape, "method": method, "mode": mode, "wall_s": round(time.time() - start, 1),
                 "exit": proc.returncode}
    if proc.returncode != 0:
        row["refused"] = " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        return row
    report = json.loads((out / "report.json").read_text())
    row.update(timings=report["timings"], peak_rss_bytes=report["peak_memory"]["cpu_rss_bytes"],
               ppl=report["metrics"]["perplexity"]["eval"],
               acc=report["metrics"]["acc"]["cloze"]["compressed"])
    export = Path(report["export"]["path"])
    row["export_path"] = str(export)
    row.update(reload_check(export, row["ppl"]["compressed"], args))
    if eager_export is not None:
        row["same_export_as_eager"] = same_tensors(export, eager_export)
    return row


def reload_check(export: Path, run_ppl: float, args: argparse.Namespace) -> dict:
    """Perplexity of the export loaded by plain transformers, by the run's protocol, against the run's number."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.engine.data import load_text, tokenize_text
    from compress.evaluators.perplexity import perplexity_of

    start = time.time()
    model, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    ids = tokenize_text(AutoTokenizer.from_pretrained(export), load_text(str(REPO / "recipes/demo/eval.txt")))
    reloaded, _ = perplexity_of(model.eval(), ids, args.seq_len, 8, torch.device("cpu"), max_windows=args.windows)
    complete = not info["missing_keys"] and not info["unexpected_keys"]
    tied_ok = not model.config.tie_word_embeddings or (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    return {"reload_s": round(time.time() - start, 1), "reloaded_ppl": reloaded,
            "reload_matched": complete and tied_ok and abs(reloaded / run_ppl - 1) < 1e-3}


def same_tensors(folder: Path, other: Path) -> bool:
    """Whether two safetensors folders hold the same names with bit-identical tensors (one tensor pair at a time)."""
    from safetensors import safe_open

    from compress.engine.lazy import checkpoint_files

    where, there = checkpoint_files(folder), checkpoint_files(other)
    if set(where) != set(there):
        return False
    for name in sorted(where):
        with safe_open(str(where[name]), "pt") as a, safe_open(str(there[name]), "pt") as b:
            if not torch.equal(a.get_tensor(name), b.get_tensor(name)):
                return False
    return True


def stored_parameters(model: Path) -> int:
    """Parameters in the checkpoint's safetensors (a tied head is stored once)."""
    import math

    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def render(rows: list[dict], sizes: dict[str, int], args: argparse.Namespace) -> str:
    import transformers

    load = os.getloadavg()
    lines = [
        "## Real vocabulary shapes: RTN and GPTQ, eager and lazy, export reloaded",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared with other jobs: times are noisy); run niced",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        "- models (tests/real_shapes.py, random weights, bf16 on disk, computed in float32 on CPU): "
        + "; ".join(f"`{shape}` {size / 1e6:.1f} M parameters" for shape, size in sizes.items())
        + ". llama3: 128,256-token vocabulary, untied head, 8 query / 2 kv heads, llama3 rope scaling to 131,072 "
          "positions; qwen-tied: 151,936 tokens, tied embeddings, 32,768 positions; both hidden 64, 2 decoder layers",
        f"- each run: `compress run` in a child process, 4-bit groups of 32, {args.samples} calibration windows of "
        f"{args.seq_len} tokens, perplexity on {args.windows} windows of recipes/demo/eval.txt, zero-shot on "
        f"{args.docs} documents of recipes/demo/cloze.jsonl, `export: {{format: compressed-tensors}}`",
        "- peak RSS: the run's ru_maxrss (report.json `peak_memory.cpu_rss_bytes`); phases: report.json `timings` (s)",
        "- reload: the export loaded with `AutoModelForCausalLM.from_pretrained` (no missing or unexpected tensors; "
        "for the tied model, lm_head sharing the embedding's storage) and its perplexity by the same protocol within "
        "0.1% of the run's `compressed` perplexity",
        "- lazy = eager export: the lazy run's compressed-tensors export bit-identical, tensor for tensor, to the eager "
        "run's of the same model and method",
        "",
        "| model | method | mode | load | baseline eval | passes | save | eval | total | wall | peak RSS | ppl baseline → compressed | reloaded ppl | reload matched | lazy = eager export |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['shape']} | {row['method']} | {row['mode']} "
        if "refused" in row:
            lines.append(head + f"| refused (exit {row['exit']}): {row['refused']} ||||||||||||")
            continue
        t = row["timings"]
        phases = " | ".join(f"{t[p]:.1f}" if p in t else "–" for p in PHASES)
        same = {True: "yes", False: "NO", None: "–"}[row.get("same_export_as_eager")]
        lines.append(head + f"| {phases} | {row['wall_s']:.0f} s | {mib(row['peak_rss_bytes'])} "
                     f"| {row['ppl']['baseline']:.1f} → {row['ppl']['compressed']:.1f} | {row['reloaded_ppl']:.1f} "
                     f"| {'yes' if row['reload_matched'] else 'NO'} | {same} |")
    lines += ["", "Random weights spread the probability over the whole vocabulary, so perplexities near the vocabulary "
              "size are expected; what matters is that the reload measures the same number as the run. The export "
              "keeps the checkpoint's bf16 (`dtype: auto`), so its scales are rounded to bf16: hence the small "
              "difference allowed. A lazy run scores the layers it wrote, rounded to bf16, and an eager run its float32 "
              "dequantized weights, so their `compressed` perplexities differ slightly while their exports are "
              "identical. The evaluators hold at most `logit_chunk_mb` (default 256 MiB) of vocabulary-wide "
              "logits at a time (compress/engine/vocab_head.py); before that bound these runs peaked at 6.4-7.5 GiB.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3,qwen-tied")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--modes", default="eager,lazy")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--docs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/compress-bench-real-shapes"))
    parser.add_argument("--output", type=Path, default=REPO / "bench/results/real_shapes.md")
    args = parser.parse_args()
    from tests.real_shapes import save_real_shape_model

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    rows, sizes = [], {}
    try:
        for shape in args.shapes.split(","):
            model = save_real_shape_model(args.workdir / shape, shape)
            sizes[shape] = stored_parameters(model)
            for method in args.methods.split(","):
                eager_export = None
                for mode in args.modes.split(","):
                    row = run_one(model, shape, method, mode, args.workdir, args,
                                  eager_export if mode == "lazy" else None)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if mode == "eager" and "refused" not in row:
                        eager_export = Path(row["export_path"])
                for mode in args.modes.split(","):
                    shutil.rmtree(args.workdir / f"out-{shape}-{method}-{mode}", ignore_errors=True)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(rows, sizes, args), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
