"""GPTQ time per decoder layer against width, both tools, beside the machine's GEMM floor.

For each hidden width (512, 1024, 2048) a random-weight float32 Llama of 2 decoder layers (bench/whole_job.py's
`random_llama`: MLP 2.75 x width, GQA 4:1, the demo tokenizer) gets GPTQ W4 g128 (settings matched as in
bench/schemes.py) from each tool in this process, on the same calibration windows, alternating ours and the
peer's over the rounds; we time the compression call only (our `run_passes`, the peer's `oneshot`) and divide by
the layers. The growth exponent is the slope of log(seconds per layer) against log(width).

The floor is what the arithmetic costs at the machine's measured fp32 matmul rate (a (width x 4096) @ (4096 x width)
product, one calibration batch's Hessian update): the Hessians, 2 * tokens * in^2 for each distinct input
(ours share one per input: attention, o_proj, MLP, down_proj; llm-compressor builds one per linear), plus the
solves, out * in^2 (the lazy-batch updates) + in^3 (the inverse's factorisation) per linear, plus one forward of
the layer per calibration token (2 * parameters FLOPs per token) to propagate.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv-bench/bin/python bench/layer_width.py --rounds 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from schemes import GPTQ_MATCHED, Scheme, _ours_weights, _peer_gptq  # noqa: E402
from tools import Setup, peer_version, run_ours, run_peer  # noqa: E402
from whole_job import DEMO, RANDOM_LAYERS, mlp_width, random_llama  # noqa: E402

from compress.engine.data import load_text, sample_windows, tokenize_text  # noqa: E402

SCHEME = Scheme("gptq-w4", "GPTQ W4 g128", _ours_weights("gptq", 4, GPTQ_MATCHED), _peer_gptq(4), calibrated=True)
BATCH_TOKENS = 4096  # one calibration batch (8 x 512)


def matmul_rate(width: int) -> float:
    """GFLOP/s of a plain fp32 (width x 4096) @ (4096 x width): one batch's Hessian update."""
    x = torch.randn(BATCH_TOKENS, width)
    torch.matmul(x.t(), x)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        torch.matmul(x.t(), x)
        best = min(best, time.perf_counter() - start)
    return 2 * BATCH_TOKENS * width**2 / best / 1e9


def layer_flops(width: int, tokens: int, shared: bool) -> float:
    """Hessians + solves + one forward per token for one decoder layer of `random_llama(width)`."""
    mlp, kv = mlp_width(width), max(1, width // 256) * 64
    linears = {"q": (width, width), "k": (kv, width), "v": (kv, width), "o": (width, width),
               "gate": (mlp, width), "up": (mlp, width), "down": (width, mlp)}  # (out, in)
    inputs = [width, width, width, mlp] if shared else [shape[1] for shape in linears.values()]
    hessians = sum(2 * tokens * columns**2 for columns in inputs)
    solves = sum(out * columns**2 + columns**3 for out, columns in linears.values())
    forward = 2 * tokens * sum(out * columns for out, columns in linears.values())
    return float(hessians + solves + forward)


def measure_width(width: int, rounds: int, samples: int, seq_len: int, scratch: Path) -> dict:
    folder = random_llama(scratch / f"random-{width}", width)
    import shutil

    shutil.copy(DEMO / "calib.txt", scratch / "calib.txt")  # run_ours's recipe names it; the windows are handed over
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = sample_windows(tokenize_text(tokenizer, load_text(str(DEMO / "calib.txt"))), samples, seq_len, seed=0)
    # the peer's run probes the logits on the evaluation text before and after (bench/tools.py): nothing is scored
    setup = Setup(folder, calibration, tokenize_text(tokenizer, load_text(str(DEMO / "eval.txt"))), seq_len, 1)
    ours, peer = [], []
    for round_ in range(rounds):
        ours.append(run_ours(SCHEME, setup, evaluate=False).seconds)
        outcome = run_peer(SCHEME, setup, evaluate=False)
        if outcome.error:
            raise SystemExit(f"peer failed at width {width}: {outcome.error}")
        peer.append(outcome.seconds)
        print(f"width {width} round {round_ + 1}: ours {ours[-1]:.1f} s, peer {peer[-1]:.1f} s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    tokens = samples * seq_len
    return {"width": width, "ours": [s / RANDOM_LAYERS for s in ours], "peer": [s / RANDOM_LAYERS for s in peer],
            "rate": matmul_rate(width), "ours_flops": layer_flops(width, tokens, shared=True),
            "peer_flops": layer_flops(width, tokens, shared=False), "load": os.getloadavg()[0]}


def exponent(rows: list[dict], key: str) -> float:
    xs = [math.log(r["width"]) for r in rows]
    ys = [math.log(statistics.median(r[key])) for r in rows]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    import platform

    lines = [
        "## GPTQ time per decoder layer against width (bench/layer_width.py)", "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), llm-compressor {peer_version()}. Random-weight "
        f"float32 Llama, {RANDOM_LAYERS} layers, MLP 2.75 x width, GQA 4:1; GPTQ W4 g128 (damp 0.01, block 128, no "
        f"act-order; ours not true-sequential, as the peer); {args.samples} calibration windows of {args.seq_len} "
        f"tokens; the compression call only, {args.rounds} rounds alternating ours and the peer's, medians.", "",
        "Floor: the layer's FLOPs (Hessians + solves + one propagating forward, see the script) at the measured fp32 "
        "matmul rate of one calibration batch's Hessian update at that width.", "",
        "| width | ours s / layer | peer s / layer | ours / peer | matmul GFLOP/s | our floor s | ours / our floor "
        "| peer floor s | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, peer = statistics.median(r["ours"]), statistics.median(r["peer"])
        our_floor, peer_floor = r["ours_flops"] / r["rate"] / 1e9, r["peer_flops"] / r["rate"] / 1e9
        lines.append(f"| {r['width']} | {ours:.2f} | {peer:.2f} | {ours / peer:.2f} | {r['rate']:.0f} | "
                     f"{our_floor:.2f} | {ours / our_floor:.1f} | {peer_floor:.2f} | {r['load']:.1f} |")
    if len(rows) > 1:
        lines += ["", f"Growth exponent (seconds per layer ~ width^k, least squares over the widths): ours k = "
                      f"{exponent(rows, 'ours'):.2f}, peer k = {exponent(rows, 'peer'):.2f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "layer_width.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="layer-width-") as scratch:
        for width in args.widths:
            rows.append(measure_width(width, args.rounds, args.samples, args.seq_len, Path(scratch)))
            args.output.write_text(markdown(rows, args), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
