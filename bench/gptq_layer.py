"""GPTQ at Llama-7B width on random data: where the time goes, and how close the Hessian matmul runs to the machine.

    python bench/gptq_layer.py                   # 128 x 512 calibration tokens, shapes 4096x4096 and 11008x4096
    python bench/gptq_layer.py --tokens 8192     # fewer tokens (Hessian time scales linearly with tokens)

Hessian accumulation is our `HessianAccumulator.add` on batches of 8 x 512 tokens (what the engine feeds it); its
FLOPs are 2 * tokens * in_features^2. The solve is `gptq_quantize` (W4, groups of 128, symmetric, damp 0.01, block
128). The machine's matmul rate is a plain fp32 `torch.matmul` of the same shape as one Hessian batch,
(in, 4096) @ (4096, in), and of a square 4096 matmul. Random inputs are generated outside the timed region.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

import torch
import typer
from rich.table import Table

from compress.quant.primitives import PerGroup, QuantSpec
from compress.compressors.gptq import HessianAccumulator, gptq_quantize

BATCH_SEQUENCES, SEQ_LEN = 8, 512  # one engine calibration batch: 4,096 tokens
IN_FEATURES = 4096
SHAPES = ((4096, 4096), (11008, 4096))  # (out, in): attention projection, MLP gate/up projection
SPEC = QuantSpec(4, True, PerGroup(128))


@dataclass
class LayerResult:
    tokens: int
    threads: int
    hessian_seconds: float
    hessian_gflops: float  # achieved rate of the accumulation
    matmul_gflops: float  # plain torch.matmul, same shape as one accumulation batch
    square_matmul_gflops: float  # plain torch.matmul, 4096 x 4096 x 4096
    solves: dict[str, float] = field(default_factory=dict)  # "4096x4096" -> our gptq_quantize seconds
    peer_solves: dict[str, float | str] = field(default_factory=dict)  # seconds, or why it could not run


def _timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first call pays allocation and thread-pool start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rates(columns: int = IN_FEATURES) -> tuple[float, float]:
    """GFLOP/s of plain fp32 matmuls: the Hessian-batch shape, and square 4096."""
    tokens = BATCH_SEQUENCES * SEQ_LEN
    x = torch.randn(tokens, columns)
    batch_rate = 2 * tokens * columns**2 / _timed(lambda: torch.matmul(x.t(), x)) / 1e9
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    square_rate = 2 * 4096**3 / _timed(lambda: torch.matmul(a, b)) / 1e9
    return batch_rate, square_rate


def accumulate_hessian(tokens: int, columns: int = IN_FEATURES, seed: int = 0) -> tuple[torch.Tensor, float]:
    """H from `tokens` random inputs; returns H and the seconds spent in `add` alone."""
    generator = torch.Generator().manual_seed(seed)
    accumulator = HessianAccumulator(columns, torch.device("cpu"))
    per_batch = BATCH_SEQUENCES * SEQ_LEN
    seconds = 0.0
    for start in range(0, tokens, per_batch):
        sequences = min(per_batch, tokens - start) // SEQ_LEN or 1
        x = torch.randn(sequences, SEQ_LEN, columns, generator=generator)  # (B, T, in)
        t = time.perf_counter()
        accumulator.add(x)
        seconds += time.perf_counter() - t
    return accumulator.hessian, seconds


def peer_solve(weight: torch.Tensor, hessian: torch.Tensor) -> float | str:
    """llm-compressor's GPTQ kernel on the same W and H (scales from the original weights, as its observer does)."""
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.utils import calculate_qparams
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except Exception as exc:
        return f"not importable: {type(exc).__name__}"
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    groups = weight.reshape(weight.shape[0], -1, 128)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    start = time.perf_counter()
    quantize_weight(weight[None].clone(), hessian[None].clone(), scale[None], zero[None], None, args,
                    blocksize=128, percdamp=0.01)
    return time.perf_counter() - start


def run(tokens: int = 128 * 512, shapes=SHAPES, peer: bool = True) -> LayerResult:
    batch_rate, square_rate = matmul_rates()
    hessian, hessian_seconds = accumulate_hessian(tokens)
    result = LayerResult(tokens, torch.get_num_threads(), hessian_seconds,
                         2 * tokens * IN_FEATURES**2 / hessian_seconds / 1e9, batch_rate, square_rate)
    generator = torch.Generator().manual_seed(1)
    for rows, columns in shapes:
        weight = torch.randn(rows, columns, generator=generator) * 0.02
        start = time.perf_counter()
        gptq_quantize(weight, hessian, SPEC, block_size=128, dampening_frac=0.01)
        result.solves[f"{rows}x{columns}"] = time.perf_counter() - start
        if peer:
            result.peer_solves[f"{rows}x{columns}"] = peer_solve(weight, hessian)
    return result


def _rows(result: LayerResult) -> list[list[str]]:
    out = []
    for shape, solve in result.solves.items():
        total = result.hessian_seconds + solve
        peer = result.peer_solves.get(shape, "—")
        out.append([
            shape,
            f"{total:.1f}",
            f"{result.hessian_seconds:.1f} ({100 * result.hessian_seconds / total:.0f}%)",
            f"{solve:.1f} ({100 * solve / total:.0f}%)",
            f"{peer:.1f}" if isinstance(peer, float) else str(peer),
        ])
    return out


HEADERS = ["weight (out x in)", "s per matrix", "Hessian s (share)", "solve s (share)", "peer solve s"]


def rich_table(result: LayerResult) -> Table:
    table = Table(title=f"GPTQ W4 g128, {result.tokens} random tokens, {result.threads} threads; Hessian "
                        f"{result.hessian_gflops:.0f} GFLOP/s vs matmul {result.matmul_gflops:.0f} GFLOP/s")
    for header in HEADERS:
        table.add_column(header, justify="left" if header.startswith("weight") else "right")
    for row in _rows(result):
        table.add_row(*row)
    return table


def markdown(result: LayerResult) -> str:
    shares = result.hessian_gflops / result.matmul_gflops
    lines = [
        "## GPTQ on a synthetic 4096-wide layer",
        "",
        f"Random fp32 weights (std 0.02) and {result.tokens:,} random N(0,1) calibration tokens "
        f"({result.tokens // SEQ_LEN} x {SEQ_LEN}), {result.threads} torch threads. The Hessian (in x in = 4096 x 4096) "
        "is accumulated once and shared by both shapes, as q/k/v share one in a Llama layer; a matrix's seconds are "
        "that accumulation plus its own solve. W4, groups of 128, symmetric, damp 0.01, block 128, no act-order.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|---|---:|---:|---:|---:|",
        *["| " + " | ".join(row) + " |" for row in _rows(result)],
        "",
        f"- Hessian accumulation: {2 * result.tokens * IN_FEATURES**2 / 1e12:.2f} TFLOP in {result.hessian_seconds:.1f} s "
        f"= **{result.hessian_gflops:.0f} GFLOP/s**; a plain `torch.matmul` of the same shape runs at "
        f"{result.matmul_gflops:.0f} GFLOP/s ({100 * shares:.0f}% of it reached), a square 4096 matmul at "
        f"{result.square_matmul_gflops:.0f} GFLOP/s.",
        "- Hessian time grows linearly with calibration tokens, solve time does not depend on them.",
    ]
    return "\n".join(lines)


def main(tokens: Annotated[int, typer.Option(help="random calibration tokens")] = 128 * 512,
         peer: Annotated[bool, typer.Option(help="also time llm-compressor's quantize_weight")] = True) -> None:
    from rich.console import Console

    result = run(tokens=tokens, peer=peer)
    Console().print(rich_table(result))
    print(markdown(result))


if __name__ == "__main__":
    typer.run(main)
