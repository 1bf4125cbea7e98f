"""Element-float weight formats on the demo model: FP8 (per channel, 128x128 blocks), NVFP4 and MXFP4 W4A16, each
rounded by RTN and by GPTQ, against the fp model; each exported as compressed-tensors and reloaded in transformers.

    python bench/serving_weights.py          # writes bench/results/serving_weights.md (and .json)

Every row is `compress run <shipped recipe> [--set ...]` in a subprocess (recipes/fp8-block.yaml, recipes/nvfp4.yaml),
so a number is what that command prints. The in-memory perplexity is the run report's; the reloaded one scores the
exported checkpoint, loaded with plain `AutoModelForCausalLM.from_pretrained` on the CPU, on the same windows (the
demo protocol: demo/eval.txt, seq_len 512, every window). transformers runs FP8 in float32 and decompresses the FP4
layouts into bfloat16 weights only, so those reload in bfloat16.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Row:
    title: str
    recipe: str
    overrides: tuple[str, ...] = ()


GPTQ_FP8 = ("passes[0].gptq.format=fp8",)
RTN_FP4 = ("passes[0].rtn.strategy=null",)
ROWS = [
    Row("FP8 per channel, RTN", "fp8-block", ("passes[0].rtn.strategy=channel",)),
    Row("FP8 per channel, GPTQ", "nvfp4", GPTQ_FP8),
    Row("FP8 128x128 block, RTN (recipes/fp8-block.yaml)", "fp8-block"),
    Row("FP8 128x128 block, GPTQ", "nvfp4", (*GPTQ_FP8, "passes[0].gptq.strategy=block")),
    Row("NVFP4 W4A16, RTN", "fp8-block", ("passes[0].rtn.format=nvfp4", *RTN_FP4)),
    Row("NVFP4 W4A16, GPTQ (recipes/nvfp4.yaml)", "nvfp4"),
    Row("MXFP4 W4A16, RTN", "fp8-block", ("passes[0].rtn.format=mxfp4", *RTN_FP4)),
    Row("MXFP4 W4A16, GPTQ", "nvfp4", ("passes[0].gptq.format=mxfp4",)),
]


def run_row(row: Row, workdir: Path) -> dict[str, Any]:
    output = workdir / row.recipe.replace("/", "_") / str(abs(hash(row.overrides)))
    command = [sys.executable, "-m", "compress.cli.main", "run", row.recipe, "--output", str(output), "--quiet",
               "--no-checkpoints", *[part for value in row.overrides for part in ("--set", value)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env, cwd=workdir)
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    (metric,) = report["metrics"]["perplexity"].values()
    export = output / "export-compressed-tensors"
    return {"baseline": metric["baseline"], "in_memory": metric["compressed"], "windows": metric["protocol"]["windows"],
            "bits_per_weight": report["size"]["quantized_bits_per_weight"], "reloaded": reloaded_perplexity(export),
            "format": json.loads((export / "config.json").read_text())["quantization_config"]["format"],
            "seconds": round(sum(p["seconds"] for p in report["passes"]), 1)}


def reloaded_perplexity(folder: Path) -> dict[str, Any]:
    """The exported checkpoint through plain transformers, scored on the demo protocol's windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.engine.data import load_text, tokenize_text
    from compress.evaluators.perplexity import perplexity_of

    fmt = json.loads((folder / "config.json").read_text())["quantization_config"]["format"]
    dtype = torch.float32 if fmt == "float-quantized" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    ids = tokenize_text(AutoTokenizer.from_pretrained(folder), load_text(str(REPO / "recipes" / "demo" / "eval.txt")))
    value, protocol = perplexity_of(model, ids, seq_len=512, batch_size=8, device=torch.device("cpu"))
    return {"perplexity": value, "dtype": str(dtype).removeprefix("torch."), "windows": protocol["windows"]}


def markdown(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    baseline = next(iter(rows.values()))["baseline"]
    lines = [
        "## Element-float weights (FP8, NVFP4, MXFP4) on the demo model",
        "",
        f"`python bench/serving_weights.py`, {meta['date']}, {meta['machine']} (load {meta['load']}), torch "
        f"{meta['torch']}, compressed-tensors {meta['compressed_tensors']}, transformers {meta['transformers']}.",
        "Demo protocol: demo/eval.txt, seq_len 512, every window; GPTQ on 128 x 512 calibration tokens, true "
        "sequential. Bits per weight: codes plus scales at their stored width (float32 FP8 scales, FP8 / E8M0 "
        "block scales, NVFP4's float32 global scale). Reloaded: the compressed-tensors export loaded with "
        "`AutoModelForCausalLM.from_pretrained` on the CPU (FP8 in float32; NVFP4 / MXFP4 only in bfloat16, as "
        "transformers decompresses them), same windows.",
        "",
        "| weights | bits/weight | perplexity | vs fp | export format | reloaded (dtype) | reload vs in-memory |",
        "|---|---|---|---|---|---|---|",
        f"| fp (the checkpoint, float16 on disk) | 16 | {baseline:.3f} | | | | |",
    ]
    for title, r in rows.items():
        reload = r["reloaded"]
        lines.append(f"| {title} | {r['bits_per_weight']:.3f} | {r['in_memory']:.3f} | "
                     f"{(r['in_memory'] / baseline - 1) * 100:+.2f}% | {r['format']} | "
                     f"{reload['perplexity']:.3f} ({reload['dtype']}) | "
                     f"{(reload['perplexity'] / r['in_memory'] - 1) * 100:+.3f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import compressed_tensors
    import torch
    import transformers

    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        for row in ROWS:
            print(f"{row.title} ...", flush=True)
            rows[row.title] = run_row(row, Path(workdir))
            print(f"  {rows[row.title]}", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load": ", ".join(f"{v:.1f}" for v in os.getloadavg()), "torch": torch.__version__,
            "compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_weights.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "serving_weights.md").write_text(markdown(rows, meta), encoding="utf-8")
    print(f"wrote {RESULTS / 'serving_weights.md'}")


if __name__ == "__main__":
    main()
