"""One rank of the two-process data-parallel GPTQ test (spawned by test_distributed.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def gptq_on_share(model_dir: str, windows: torch.Tensor, out_dir: str) -> dict[str, torch.Tensor]:
    """Layer 0's q/k/v Hessian and every quantized weight after GPTQ, calibrated on this rank's windows."""
    from compress.engine.context import RunContext, RunInputs
    from compress.engine.distributed import shard_windows
    from compress.engine.layer_sweep import LayerContext, SweepStep, capture_layer_inputs, run_sweep
    from compress.engine.model_io import load_model
    from compress.compressors.gptq import GPTQConfig, collect_hessians, run_gptq

    handle = load_model(model_dir)
    run = RunContext(RunInputs(device=handle.device, calibration=shard_windows(windows, 2), calibration_batch_size=2))
    inputs = capture_layer_inputs(handle, run)
    ctx = LayerContext(0, f"{handle.layers_prefix}.0", handle.layers[0], inputs, run)
    q_name = next(n for n in ctx.linears() if n.endswith("q_proj"))
    hessian = collect_hessians(ctx, {q_name: ctx.linears()[q_name]})[q_name]
    run_sweep(handle, [SweepStep("gptq", run_gptq, GPTQConfig(bits=3, group_size=32), True)], run)
    result = {"hessian": hessian.hessian, "samples": torch.tensor([hessian.samples])}
    result.update({f"codes/{k}": r.codes.to(torch.int32) for k, r in run.results.records.items()})
    result.update({f"scale/{k}": r.scale for k, r in run.results.records.items()})
    return result


def worker(rank: int, world: int, model_dir: str, windows: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        result = gptq_on_share(model_dir, windows, out_dir)
        save_file({k: v.contiguous() for k, v in result.items()}, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
