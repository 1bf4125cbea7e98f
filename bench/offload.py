"""Bench: calibration activations on the device vs offloaded to disk (`calibration.offload`); peak RSS and wall time.

A run where the activations, not the model, dominate memory: a small random-weight Llama (hidden 1024, 3 decoder
layers, float32) calibrated on many windows, so one copy of the hidden states (windows x seq_len x 1024 x 4
bytes) is several times the model. `compress run` with GPTQ runs in a child process once per mode; its peak RSS
(ru_maxrss) and the engine's own count of activation bytes in memory come from report.json.

    python bench/offload.py                          # writes bench/results/offload.md
    python bench/offload.py --samples 64 --modes device,disk,cpu --rounds 1

Each round runs every mode, in reverse order every other round, so a drift in the machine's load shows up as
disagreement between rounds rather than as a difference between modes.

On this CPU-only machine `cpu` is the same memory as `device`, so it is not run by default. Disk offload writes
through the page cache: the files may never reach the disk, and the cache is not part of the process's RSS.
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

# Wide hidden states, little compute per token (narrow MLP, GQA, 3 layers): activations dominate memory while a
# run stays within a few minutes on a shared 2-core CPU.
CONFIG = dict(hidden_size=1024, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024)
PASS = "gptq: {bits: 4, group_size: 128, true_sequential: false}"  # one Hessian forward per layer


def generate_model(folder: Path, seed: int = 0) -> int:
    """A random float32 Llama of CONFIG with the tests' small tokenizer; returns its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import save_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG, bos_token_id=0, eos_token_id=1))
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder)
    return sum(p.numel() for p in model.parameters())


def run_mode(model: Path, mode: str, work: Path, samples: int, seq_len: int, batch_size: int) -> dict:
    recipe = work / f"{mode}.yaml"
    recipe.write_text(
        f"model: {model}\ndtype: float32\ndevice: cpu\n"
        f"calibration: {{dataset: {REPO / 'recipes/demo/calib.txt'}, samples: {samples}, seq_len: {seq_len}, "
        f"batch_size: {batch_size}, offload: {mode}}}\n"
        f"passes:\n  - {PASS}\n",
        encoding="utf-8",
    )
    out = work / f"out-{mode}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "compress.cli.main", "run", str(recipe), "--output", str(out), "--quiet"],
                          env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"compress run ({mode}) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    [offload] = report["calibration"]["offload"]
    shutil.rmtree(out)
    return {
        "mode": mode,
        "wall_s": round(wall, 1),
        "passes_s": report["timings"]["passes"],
        "propagation_s": report["timings"]["propagation"],
        "peak_rss_bytes": report["peak_memory"]["cpu_rss_bytes"],
        "activation_bytes": offload["activation_bytes"],
        "peak_resident_bytes": offload["peak_resident_bytes"],
        "placement": offload["placement"],
        "weights_sha256": report["weights_sha256"],
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def render(runs: list[dict], params: int, args: argparse.Namespace) -> str:
    import transformers

    load = os.getloadavg()
    same = len({run["weights_sha256"] for run in runs}) == 1
    lines = [
        "## Offloading calibration activations (`calibration.offload`)",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared with other jobs: times are noisy)",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- model: random-weight Llama, hidden {CONFIG['hidden_size']}, MLP {CONFIG['intermediate_size']}, "
        f"{CONFIG['num_hidden_layers']} layers, {params / 1e6:.1f} M parameters ({mib(params * 4)} in float32)",
        f"- `compress run` with `{PASS}` on CPU in float32, {args.samples} calibration windows of {args.seq_len} "
        f"tokens in batches of {args.batch_size}; one child process per mode (`bench/offload.py`)",
        "- peak RSS: the run process's ru_maxrss (report.json `peak_memory.cpu_rss_bytes`); activations in memory: "
        "the engine's own peak count of hidden-state bytes held or handed out (`calibration.offload[0].peak_resident_bytes`)",
        f"- quantized weights bit-identical across modes (report.json `weights_sha256`): {'yes' if same else 'NO'}",
        "",
        "| round | offload | activations (inputs + outputs) | activations in memory at peak | peak RSS | wall | passes | propagation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['round']} | {run['mode']} | {mib(run['activation_bytes'])} | {mib(run['peak_resident_bytes'])} "
            f"| {mib(run['peak_rss_bytes'])} | {run['wall_s']:.0f} s | {run['passes_s']:.0f} s | {run['propagation_s']:.0f} s |"
        )
    lines += ["", "Disk offload writes through the page cache, so on a machine with free RAM the files are read back "
              "from memory that the kernel can reclaim; RSS does not count it.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="device,disk")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/compress-bench-offload"))
    parser.add_argument("--output", type=Path, default=REPO / "bench/results/offload.md")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    try:
        params = generate_model(args.workdir / "model")
        runs = []
        modes = args.modes.split(",")
        for round_ in range(1, args.rounds + 1):
            for mode in modes if round_ % 2 else modes[::-1]:
                run = run_mode(args.workdir / "model", mode, args.workdir, args.samples, args.seq_len, args.batch_size)
                run["round"] = round_
                print(json.dumps(run), flush=True)
                runs.append(run)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(runs, params, args), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
