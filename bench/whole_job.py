"""The whole job, start to exit: `compress run` of a recipe against llm-compressor's script doing the same work.

Each measurement is one fresh process: load the demo model, read and tokenize the texts, score the baseline,
calibrate and compress, score again on the same windows, write the report (ours) or save the model (the peer's).
We time the process from spawn to exit (wall), its CPU (user + sys, `wait4`) and its peak RSS, with the load
average beside each. Runs alternate A B C A B C over the rounds:

- A: ours, cold: `compress run --no-cache` (the baseline and token ids computed in this process);
- B: the peer, bench/whole_job_peer.py (llm-compressor's `oneshot`, the same calibration windows and perplexity
  protocol, baseline and final scores);
- C: ours, warm: `compress run` with a cache that an earlier run filled (the baseline and token ids read back),
  what a second run or a sweep's later trials cost.

Reported: medians, the ratio of ours to the peer's pair by pair (round i's A over round i's B), and our per-phase
seconds from report.json `timings`.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv-bench/bin/python bench/whole_job.py --rounds 3
    ... bench/whole_job.py --model random-1024 --output bench/results/whole_job_1024.md   # a wider random Llama

`--model random-WIDTH` builds a random-weight float32 Llama of that hidden width (2 layers, MLP 2.75 x width, GQA
4:1, the demo model's tokenizer so the same texts tokenize the same) in the scratch folder; its perplexities are
near the vocabulary size and mean nothing, its seconds are what a wider model costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEMO = REPO / "recipes" / "demo"
RESULTS = BENCH / "results"

sys.path.insert(0, str(BENCH))
from schemes import GPTQ_MATCHED, _ours_weights  # noqa: E402  (the settings bench/run.py matches to the peer's)

ROWS = {  # key -> (title, our passes); the peer's modifiers are in bench/whole_job_peer.py under the same key
    "gptq-w4": ("GPTQ W4 g128", _ours_weights("gptq", 4, GPTQ_MATCHED)),
    "gptq-w3": ("GPTQ W3 g128", _ours_weights("gptq", 3, GPTQ_MATCHED)),
    "rtn-w4": ("RTN W4 g128", _ours_weights("rtn", 4)),
    "sparsegpt-50": ("SparseGPT 50%", "[sparsegpt: {sparsity: 0.5}]"),  # as bench/pruning.py
}


@dataclass
class Measured:
    wall: float
    cpu: float
    peak_rss_mib: float
    load: float  # 1-minute load average when the process started
    perplexity: tuple[float, float] | None = None  # (baseline, compressed)
    phases: dict[str, float] = field(default_factory=dict)


def measure(command: list[str], env: dict[str, str]) -> tuple[Measured, str]:
    """Spawn `command`, wait for it, and return its wall, CPU and peak RSS (its own rusage, from wait4)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO, text=True)
    assert process.stdout is not None
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} exited {process.returncode}")
    return Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, load), stdout


RANDOM_LAYERS = 2


def mlp_width(width: int) -> int:
    """2.75 x width (Llama's ratio), rounded up to a multiple of 128 so groups of 128 divide every linear."""
    return -(-(width * 11 // 4) // 128) * 128


def random_llama(folder: Path, width: int, seed: int = 0) -> Path:
    """A random float32 Llama `width` wide with the demo model's tokenizer files, saved in `folder`."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    demo = json.loads((DEMO / "model" / "config.json").read_text(encoding="utf-8"))
    config = LlamaConfig(hidden_size=width, intermediate_size=mlp_width(width), num_hidden_layers=RANDOM_LAYERS,
                         num_attention_heads=width // 64, num_key_value_heads=max(1, width // 256),
                         vocab_size=demo["vocab_size"], max_position_embeddings=demo["max_position_embeddings"],
                         bos_token_id=demo.get("bos_token_id"), eos_token_id=demo.get("eos_token_id"),
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (DEMO / "model" / name).exists():
            shutil.copy(DEMO / "model" / name, folder / name)
    return folder


def model_folder(name: str, scratch: Path) -> Path:
    if name == "demo":
        return DEMO / "model"
    folder = scratch / name
    if not folder.exists():
        random_llama(folder, int(name.removeprefix("random-")))
    return folder


def recipe_text(model: Path, passes: str, samples: int, seq_len: int, eval_windows: int | None) -> str:
    limit = f", max_windows: {eval_windows}" if eval_windows else ""
    return (f"model: {model}\n"
            f"calibration: {{dataset: {DEMO / 'calib.txt'}, samples: {samples}, seq_len: {seq_len}, seed: 0}}\n"
            f"passes: {passes}\n"
            f"evaluate:\n  perplexity: [{{dataset: {DEMO / 'eval.txt'}, seq_len: {seq_len}{limit}}}]\n")


def ours(recipe: Path, output: Path, env: dict[str, str], cold: bool) -> Measured:
    command = [sys.executable, "-m", "compress.cli.main", "run", str(recipe), "--output", str(output), "--overwrite",
               "--json", "--no-checkpoints", *(["--no-cache"] if cold else [])]
    measured, stdout = measure(command, env)
    report = json.loads(stdout)
    metric = report["metrics"]["perplexity"]["eval"]
    measured.perplexity = (metric["baseline"], metric["compressed"])
    measured.phases = dict(report["timings"])
    for entry in report["passes"]:  # GPTQ / SparseGPT: the Hessians' forwards and the solves, inside `passes`
        for part, seconds in entry.get("seconds_by_part", {}).items():
            measured.phases[f"{entry['name']} {part}"] = seconds
    return measured


def peer(key: str, args: argparse.Namespace, model: Path, output: Path, env: dict[str, str]) -> Measured:
    command = [args.peer_python, str(BENCH / "whole_job_peer.py"), key, "--model", str(model),
               "--calibration", str(DEMO / "calib.txt"), "--evaluation", str(DEMO / "eval.txt"),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--output", str(output),
               *(["--eval-windows", str(args.eval_windows)] if args.eval_windows else [])]
    measured, stdout = measure(command, env)
    result = json.loads(stdout.strip().splitlines()[-1])
    measured.perplexity = (result["baseline"], result["compressed"])
    measured.phases = result["phases"]
    return measured


def run_row(key: str, args: argparse.Namespace, scratch: Path) -> dict[str, list[Measured]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COMPRESS_CACHE_DIR": str(scratch / "cache")}
    recipe = scratch / f"{key}.yaml"
    model = model_folder(args.model, scratch)
    recipe.write_text(recipe_text(model, ROWS[key][1], args.samples, args.seq_len, args.eval_windows), encoding="utf-8")
    ours(recipe, scratch / "warmup", env, cold=False)  # fills the cache the warm runs read
    runs: dict[str, list[Measured]] = {"ours cold": [], "peer": [], "ours warm": []}
    for round_ in range(args.rounds):
        runs["ours cold"].append(ours(recipe, scratch / "a", env, cold=True))
        runs["peer"].append(peer(key, args, model, scratch / "b", env))
        runs["ours warm"].append(ours(recipe, scratch / "c", env, cold=False))
        print(f"{key} round {round_ + 1}: " + ", ".join(f"{name} {m[-1].cpu:.1f} CPU-s" for name, m in runs.items()),
              flush=True)
    return runs


def _median(values: list[float]) -> float:
    return statistics.median(values)


def row_lines(key: str, runs: dict[str, list[Measured]]) -> list[str]:
    cold, peer_runs, warm = runs["ours cold"], runs["peer"], runs["ours warm"]
    cold_ratio = [a.cpu / b.cpu for a, b in zip(cold, peer_runs)]
    warm_ratio = [c.cpu / b.cpu for c, b in zip(warm, peer_runs)]
    cells = []
    for name, measured in runs.items():
        cells.append(f"{_median([m.wall for m in measured]):.1f} / {_median([m.cpu for m in measured]):.1f} / "
                     f"{_median([m.peak_rss_mib for m in measured]):.0f} "
                     f"(load {', '.join(f'{m.load:.1f}' for m in measured)})")
    ppl = f"{cold[0].perplexity[1]:.3f} / {peer_runs[0].perplexity[1]:.3f}" if cold[0].perplexity and peer_runs[0].perplexity else "—"
    return [f"| {ROWS[key][0]} | {' | '.join(cells)} | {_median(cold_ratio):.2f} ({', '.join(f'{r:.2f}' for r in cold_ratio)}) "
            f"| {_median(warm_ratio):.2f} ({', '.join(f'{r:.2f}' for r in warm_ratio)}) | {ppl} |"]


def phase_lines(key: str, runs: dict[str, list[Measured]]) -> list[str]:
    lines = []
    for name in ("ours cold", "ours warm", "peer"):
        phases = runs[name]
        keys = list(phases[0].phases)
        cells = ", ".join(f"{k} {_median([m.phases.get(k, 0.0) for m in phases]):.2f}" for k in keys)
        lines.append(f"| {ROWS[key][0]} | {name} | {cells} |")
    return lines


def model_title(name: str) -> str:
    if name == "demo":
        return "Demo model (recipes/demo/model, 4 layers, hidden 256)"
    width = int(name.removeprefix("random-"))
    return (f"Random-weight float32 Llama, hidden {width}, MLP {mlp_width(width)}, {RANDOM_LAYERS} layers, "
            f"{width // 64} heads ({max(1, width // 256)} key-value), the demo tokenizer")


def markdown(results: dict[str, dict[str, list[Measured]]], args: argparse.Namespace) -> str:
    import platform

    lines = [
        "## Whole job, start to exit (bench/whole_job.py)" + ("" if args.model == "demo" else f", {args.model}"),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; {args.rounds} round(s) of A (ours, `--no-cache`), B (llm-compressor), "
        "C (ours, baseline and token ids from the cache), alternating. "
        f"{model_title(args.model)}, "
        f"{args.samples} calibration windows of {args.seq_len} tokens, perplexity on "
        f"{args.eval_windows or 'all'} windows of eval.txt, baseline and final, in both tools.",
        "",
        "Each cell: median wall s / CPU s (user + sys of the process, from wait4) / peak RSS MiB, and the 1-minute "
        "load average at the start of each run. Ratio: our CPU over the peer's, round by round (median, then each).",
        "",
        "| row | ours cold | peer | ours warm | cold / peer CPU | warm / peer CPU | final ppl ours / peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        lines += row_lines(key, runs)
    lines += ["", "Per phase (median seconds; ours from report.json `timings`, where `load` includes "
              "`calibration_data`, `passes` includes `propagation` and each pass's `statistics` (the Hessians' "
              "forwards) and `solve`, and `total` counts from the process's start; the peer's from its script's own "
              "clock, from its first line):", "", "| row | run | phases |", "|---|---|---|"]
    for key, runs in results.items():
        lines += phase_lines(key, runs)
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="demo", help="demo, or random-WIDTH (e.g. random-1024)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="default: every window of eval.txt")
    parser.add_argument("--peer-python", default=sys.executable, help="the interpreter with llmcompressor")
    parser.add_argument("--note", default="", help="a line added under the tables (e.g. the machine's state)")
    parser.add_argument("--output", type=Path, default=RESULTS / "whole_job.md")
    args = parser.parse_args()
    results: dict[str, dict[str, list[Measured]]] = {}
    with tempfile.TemporaryDirectory(prefix="whole-job-") as folder:
        for key in args.rows:  # written after every row, so a stopped bench keeps the rows it finished
            results[key] = run_row(key, args, Path(folder))
            args.output.write_text(markdown(results, args), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
