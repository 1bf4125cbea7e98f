"""Our GGUF files against llama.cpp's own quantization, at the file sizes of Q4_K_M, Q3_K_M and Q2_K.

    python bench/llama_cpp_quantize.py                       # writes bench/results/gguf.md (needs scripts/llama_cpp.sh's build)
    python bench/llama_cpp_quantize.py --targets Q4_K_M --samples 32

llama.cpp side: the model as an F16 GGUF (our writer; the demo checkpoint is float16, so nothing is rounded), an
importance matrix from the calibration text (`llama-imatrix -c 512`), then `llama-quantize --imatrix` at each
type. Our side, from the same checkpoint and the same calibration text: `allocate` (per-module GGUF types
q2_k ... q6_k by Hessian-trace sensitivity, ILP) under a byte budget equal to what llama.cpp's file spends on the
decoder linears, `gptq` onto each module's GGUF grid, `quantize_embeddings` giving the tied table Q6_K as
llama-quantize does, `export: {format: gguf}`. Both files are scored by the same `llama-perplexity` on the whole
evaluation text (its protocol: 512-token chunks, the second half of each scored), so quality is llama.cpp's own
number for each file; the size column is the file on disk.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.export.test_gguf_llama_cpp import BIN, llama_cpp_perplexity, run_tool  # noqa: E402

DEMO = REPO / "recipes" / "demo"
OUTPUT = REPO / "bench" / "results" / "gguf.md"
TARGETS = ("Q4_K_M", "Q3_K_M", "Q2_K")
SHIPPED = {"Q4_K_M": REPO / "recipes" / "gguf-q4_k_m.yaml", "Q3_K_M": REPO / "recipes" / "gguf-q3_k_m.yaml"}
CANDIDATES = ["gguf:q2_k", "gguf:q3_k", "gguf:q4_k", "gguf:q5_k", "gguf:q6_k"]
SEQ_LEN = 512

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def f16_gguf(model: Path, folder: Path) -> Path:
    """The unquantized model as llama-quantize's input (float16: the demo checkpoint's own precision)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.export import CompressedModel, export_checkpoint

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    export_checkpoint(CompressedModel(loaded, AutoTokenizer.from_pretrained(model), torch.float16, {}), "gguf", folder)
    return folder / "model.gguf"


def linear_bytes(path: Path) -> tuple[int, int]:
    """Bytes and weights of the decoder linears (blk.*, 2-D) in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


def tensor_types(path: Path) -> str:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


def ours(model: Path, budget_bytes: int, folder: Path, samples: int) -> tuple[Path, float, dict[str, Any]]:
    """Our file at `budget_bytes` of decoder linears; returns it, the run's seconds and its report."""
    import json

    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""model: {model}
calibration: {{dataset: {DEMO / 'calib.txt'}, samples: {samples}, seq_len: {SEQ_LEN}, seed: 0}}
passes:
  - allocate:
      granularity: module
      candidates: {json.dumps(CANDIDATES)}
      sensitivity: hessian_trace
      solver: ilp
      budget: {{bytes: {budget_bytes}}}
      samples: 2
      max_probes: 8
  - gptq: {{format: "gguf:q4_k"}}
  - quantize_embeddings: {{head: "gguf:q6_k"}}
export: {{format: gguf}}
""", encoding="utf-8")
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "compress"), "run", str(recipe), "--output", str(folder / "run"),
                    "--quiet"], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    report = json.loads((folder / "run" / "report.json").read_text(encoding="utf-8"))
    return folder / "run" / "export-gguf" / "model.gguf", seconds, report


def shipped(recipe: Path, model: Path, folder: Path) -> tuple[Path, float]:
    """The shipped recipe as a user runs it (`--model`), its budget in bits per weight rather than bytes."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "compress"), "run", str(recipe), "--model", str(model),
                    "--output", str(folder / "shipped"), "--quiet"], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return folder / "shipped" / "export-gguf" / "model.gguf", time.perf_counter() - start


def theirs(source: Path, imatrix: Path, target: str, folder: Path) -> Path:
    out = folder / f"llama-{target}.gguf"
    run_tool("llama-quantize", "--imatrix", str(imatrix), str(source), str(out), target, str(os.cpu_count() or 2))
    return out


@app.command()
def main(
    targets: Annotated[Optional[list[str]], typer.Option(help="llama.cpp types to match (default: all three)")] = None,
    samples: Annotated[int, typer.Option(help="calibration windows of 512 tokens, ours and llama-imatrix's")] = 128,
    model: Annotated[Path, typer.Option(help="a Llama / Mistral / Qwen model folder")] = DEMO / "model",
    eval_text: Annotated[Path, typer.Option(help="text llama-perplexity scores")] = DEMO / "eval.txt",
    output: Annotated[Path, typer.Option()] = OUTPUT,
) -> None:
    if BIN is None:
        raise typer.BadParameter("no llama.cpp build: run scripts/llama_cpp.sh first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-gguf-") as scratch:
        work = Path(scratch)
        source = f16_gguf(model, work / "f16")
        imatrix = work / "imatrix.gguf"
        start = time.perf_counter()
        run_tool("llama-imatrix", "-m", str(source), "-f", str(DEMO / "calib.txt"), "-o", str(imatrix), "-c",
                 str(SEQ_LEN), "--chunks", str(samples), "-t", str(os.cpu_count() or 2), "--no-ppl")
        imatrix_seconds = time.perf_counter() - start
        f16_ppl = llama_cpp_perplexity(source, eval_text, None)
        for target in targets or TARGETS:
            start = time.perf_counter()
            reference = theirs(source, imatrix, target, work)
            their_seconds = time.perf_counter() - start + imatrix_seconds
            budget, weights = linear_bytes(reference)
            folder = work / target
            folder.mkdir()
            mine, my_seconds, _report = ours(model, budget, folder, samples)
            runs = [("llama-quantize + imatrix", reference, their_seconds),
                    ("compress, budget = llama.cpp's linear bytes", mine, my_seconds)]
            if target in SHIPPED:
                runs.append((f"compress, recipes/{SHIPPED[target].name} (with evaluation)",
                             *shipped(SHIPPED[target], model, folder)))
            for tool, path, seconds in runs:
                used, _ = linear_bytes(path)
                rows.append({"target": target, "tool": tool, "file": path.stat().st_size,
                             "linear_bits": 8 * used / weights, "ppl": llama_cpp_perplexity(path, eval_text, None),
                             "types": tensor_types(path), "seconds": seconds, "load": load_average()})
            print(*rows[-len(runs):], sep="\n", flush=True)
    write(output, rows, f16_ppl, samples, model)


def write(output: Path, rows: list[dict[str, Any]], f16_ppl: float, samples: int, model: Path) -> None:
    import gguf

    lines = [
        "## GGUF: our files against llama-quantize with an importance matrix",
        "",
        f"Run {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), llama.cpp from llama-cpp-python "
        f"0.3.36 (scripts/llama_cpp.sh), gguf {gguf.__version__ if hasattr(gguf, '__version__') else 'installed'}; "
        f"model {model.relative_to(REPO) if model.is_relative_to(REPO) else model}. Calibration: {samples} windows "
        f"of {SEQ_LEN} tokens of recipes/demo/calib.txt for both (llama-imatrix `-c 512 --chunks {samples}`: all 103 "
        "chunks of the text at 128). Perplexity: llama-perplexity on all of "
        "recipes/demo/eval.txt for every file (n_ctx 512, second half of each chunk scored); the F16 file scores "
        f"{f16_ppl:.4f}. Our budget is the bytes llama.cpp's file spends on the decoder linears; `file` is the whole "
        "file on disk (same metadata, token_embd Q6_K in both). The shipped recipes' rows are the recipes as users "
        "run them, whose budget is in bits per weight (below llama.cpp's on Llama-shaped models). Seconds: the whole `compress run` process (load, "
        "calibration, allocation, GPTQ, export; no evaluation) against llama-imatrix + llama-quantize.",
        "",
        "| size of | tool | file bytes | vs llama.cpp | bits/weight (linears) | llama.cpp ppl | vs F16 | tensor types | seconds | load |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    by_target: dict[str, int] = {}
    for row in rows:
        by_target.setdefault(row["target"], row["file"])
        lines.append(f"| {row['target']} | {row['tool']} | {row['file']:,} | {row['file'] / by_target[row['target']]:.3f} "
                     f"| {row['linear_bits']:.3f} | {row['ppl']:.4f} | {100 * (row['ppl'] / f16_ppl - 1):+.2f}% "
                     f"| {row['types']} | {row['seconds']:.1f} | {row['load']} |")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    app()
