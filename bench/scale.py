"""Bench: a model larger than this machine's memory compresses with lazy loading; peak RSS vs. model size.

Generates a random-weight Llama checkpoint from a config, in bfloat16 safetensors shards (one per decoder layer,
written one at a time so generating it needs no more memory than a layer), under a temporary folder that is
deleted afterwards (never committed). Then runs `compress run` with `lazy: true` in a child process for each
method and reads its peak RSS from report.json (the process's ru_maxrss, the kernel's own high-water mark).

    python bench/scale.py                                  # both configs, writes bench/results/scale.md
    python bench/scale.py --configs llama3-8b --methods rtn

Configs:
- llama3-8b: Llama-3-8B's shape (hidden 4096, MLP 14336, 32 layers, GQA 8, vocab 128256): 8.03B parameters,
  16 GB in bf16, 32 GB in float32. RTN only by default: GPTQ's inverse Hessian of the 14336-wide down_proj
  alone is ~4e12 flops per layer, about 2 h for the model on this shared 2-core CPU.
- llama2-7b: Llama-2-7B's shape (hidden 4096, MLP 11008, 32 layers, MHA, vocab 32000): 6.74B parameters,
  27 GB in float32. For GPUs: GPTQ's layer 0 alone took over 6 CPU-minutes here (an 11008-column Hessian).
- deep-7b: a narrower, deeper Llama (hidden 2048, MLP 2048, 290 layers, GQA 4, vocab 32000): 6.82B parameters,
  27.3 GB in float32 (> 24 GiB). GPTQ's cost grows with the cube of a layer's width, so at the same parameter
  count this shape runs GPTQ on every layer in about an hour on 2 cores.
Peer: none. llm-compressor loads the whole model with from_pretrained (its sequential onloading needs the model
in host memory first), so on this 24 GiB machine it cannot load either model in float32; we report that, not a run.
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

CONFIGS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=256),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "deep-7b": dict(hidden_size=2048, intermediate_size=2048, num_hidden_layers=290, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
}
DEFAULT_METHODS = {"llama3-8b": ["rtn"], "llama2-7b": ["gptq"], "deep-7b": ["gptq"], "smoke": ["rtn", "gptq"]}
PASSES = {
    "rtn": "  - rtn: {bits: 4, group_size: 128}",
    # one Hessian forward per layer (true_sequential off), as the peer's default pipeline does
    "gptq": "  - gptq: {bits: 4, group_size: 128, true_sequential: false}",
}


def generate_checkpoint(folder: Path, name: str, seed: int = 0) -> dict:
    """Write a random bf16 Llama of config `name` to `folder`, one shard per decoder layer; returns its sizes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.engine.shards import ShardWriter
    from tests.tiny_models import save_tokenizer

    config = LlamaConfig(**CONFIGS[name], bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    config.dtype = torch.bfloat16
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {n: p.shape for n, p in skeleton.named_parameters()}
    writer = ShardWriter(folder)
    generator = torch.Generator().manual_seed(seed)

    def fill(names: list[str], shard: str) -> None:
        tensors = {}
        for n in names:
            shape = shapes[n]
            if len(shape) == 1:  # norms: ones, as initialised
                tensors[n] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[n] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        writer.write(shard, tensors)

    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        fill([n for n in shapes if n.startswith(prefix)], f"model-layer-{index:05d}.safetensors")
    fill([n for n in shapes if not n.startswith("model.layers.")], "model-outside.safetensors")
    writer.finish()
    config.save_pretrained(folder)
    save_tokenizer(folder)
    params = sum(s.numel() for s in shapes.values())
    return {"parameters": params, "bf16_bytes": params * 2, "fp32_bytes": params * 4}


def run_compress(model: Path, method: str, work: Path, samples: int, seq_len: int,
                 time_limit: float | None = None) -> dict:
    recipe = work / f"{method}.yaml"
    recipe.write_text(
        f"model: {model}\nlazy: true\ndtype: float32\ndevice: cpu\n"
        f"calibration: {{dataset: {REPO / 'recipes/demo/calib.txt'}, samples: {samples}, seq_len: {seq_len}, batch_size: {samples}}}\n"
        f"passes:\n{PASSES[method]}\n",
        encoding="utf-8",
    )
    out = work / f"out-{method}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli.main", "run", str(recipe), "--output", str(out), "--quiet"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    polled_peak = 0  # VmHWM from /proc while it runs: the peak so far even if the time limit stops it
    while proc.poll() is None:
        polled_peak = max(polled_peak, _vm_hwm(proc.pid))
        if time_limit and time.time() - start > time_limit:
            layers_done = len(list(work.glob(f".out-{method}.partial-*/model/model-layer-*.safetensors")))
            proc.kill()
            proc.wait()
            shutil.rmtree(out, ignore_errors=True)
            for partial in work.glob(f".out-{method}.partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
            return {"method": method, "finished": False, "wall_s": round(time.time() - start, 1),
                    "peak_rss_bytes": polled_peak, "layers_done": layers_done}
        time.sleep(2)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"compress run {method} failed ({proc.returncode}):\n{(proc.stderr.read() if proc.stderr else '')[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    shards = sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
    result = {
        "method": method,
        "finished": True,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": max(polled_peak, report["peak_memory"]["cpu_rss_bytes"]),  # ru_maxrss, from report.json
        "timings": report["timings"],
        "quantized_modules": report["passes"][0]["summary"]["modules"],
        "mean_weight_rel_error": report["passes"][0]["summary"].get("mean_weight_rel_error"),
        "bits_per_weight": report["size"]["bits_per_weight"],
        "output_shard_bytes": shards,
        "layers_done": report["model"]["decoder_layers"],
    }
    shutil.rmtree(out)
    return result


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _count_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += _prod(handle.get_slice(key).get_shape())
    return total


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(results: dict[str, dict], args: argparse.Namespace) -> str:
    import transformers

    load = os.getloadavg()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    lines = [
        "## Scale: models larger than memory (lazy loading)",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {gib(mem)} RAM, no GPU; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared with other jobs: times are noisy)",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- random-weight Llama checkpoints generated on the fly in bf16 shards (deleted after); `compress run` with "
        f"`lazy: true`, compute in float32 on CPU, {args.samples} calibration windows of {args.seq_len} tokens; "
        "peak RSS is the run process's kernel high-water mark (ru_maxrss, in report.json)",
        "- peer: llm-compressor 0.14 loads the model with `from_pretrained` before compressing, so it needs the "
        "whole model in host memory (32 GB / 27.3 GB in float32, 16 / 13.6 GB in bf16 plus its working set) and "
        "cannot run these models in float32 on this 24 GiB machine; not run.",
        "",
        "| model | parameters | bf16 on disk | fp32 in memory | method | layers | wall | peak RSS | RSS / bf16 size | RSS / fp32 size | output shards |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        size = entry["size"]
        layers = CONFIGS[name]["num_hidden_layers"]
        for run in entry["runs"]:
            finished = run.get("finished", True)
            done = f"{run.get('layers_done', run.get('decoder_layers'))} of {layers}"
            done += "" if finished else " (stopped at the time limit)"
            shards = gib(run["output_shard_bytes"]) if finished else "—"
            lines.append(
                f"| {name} | {size['parameters'] / 1e9:.2f} B | {gib(size['bf16_bytes'])} | {gib(size['fp32_bytes'])} "
                f"| {run['method']} w4 g128 | {done} | {run['wall_s'] / 60:.1f} min "
                f"| {gib(run['peak_rss_bytes'])} | {run['peak_rss_bytes'] / size['bf16_bytes']:.3f} "
                f"| {run['peak_rss_bytes'] / size['fp32_bytes']:.3f} | {shards} |"
            )
    lines += ["", "No GPU was available to this run, so GPU memory per layer is not reported (the report's "
              "`peak_memory.cuda_passes_bytes` carries it when one is).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="llama3-8b,deep-7b")
    parser.add_argument("--methods", default=None, help="comma list; default per config (see the module docstring)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/compress-bench-scale"))
    parser.add_argument("--output", type=Path, default=REPO / "bench/results/scale.md")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="reuse a checkpoint generated earlier for the (single) config instead of generating it")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per run; report the layers done")
    parser.add_argument("--merge", action="store_true", help="keep the runs already in the results JSON")
    args = parser.parse_args()
    partial = args.output.with_suffix(".json")
    results: dict[str, dict] = json.loads(partial.read_text()) if args.merge and partial.is_file() else {}
    for name in args.configs.split(","):
        work = args.workdir / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            if args.model_dir is not None:
                model = args.model_dir
                config = json.loads((model / "config.json").read_text())
                params = _count_params(model)
                size = {"parameters": params, "bf16_bytes": params * 2, "fp32_bytes": params * 4}
                assert config["num_hidden_layers"] == CONFIGS[name]["num_hidden_layers"]
            else:
                t = time.time()
                model = work / "model"
                size = generate_checkpoint(model, name)
                print(f"{name}: generated {size['parameters'] / 1e9:.2f} B parameters in {time.time() - t:.0f} s", flush=True)
            entry = results.setdefault(name, {"size": size, "runs": []})
            methods = args.methods.split(",") if args.methods else DEFAULT_METHODS[name]
            for method in methods:
                run = run_compress(model, method, work, args.samples, args.seq_len, args.time_limit)
                print(f"{name} {method}: {json.dumps(run)}", flush=True)
                entry["runs"] = [r for r in entry["runs"] if r["method"] != method] + [run]
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(results, indent=2) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)  # 14-16 GB: never leave it behind
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(results, args), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
