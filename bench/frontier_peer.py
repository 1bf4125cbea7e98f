"""The peers of bench/frontier.py, run in their own venv (auto-round, hqq): quantize the demo model on the given
calibration windows and save every decoder linear's *dequantized* weight, which frontier.py scores with our protocol.

    /work/venv-autoround/bin/python bench/frontier_peer.py autoround --bits 3 --group-size 128 \
        --model recipes/demo/model --windows calib.pt --output deq.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}


def autoround(model, tokenizer, windows: torch.Tensor, bits: int, group_size: int, iters: int) -> None:
    """AutoRound with its defaults but iters and the calibration: our windows, 8 per batch, as its dataloader."""
    from auto_round import AutoRound

    batches = list(windows.split(8))
    rounder = AutoRound(model, tokenizer, bits=bits, group_size=group_size, iters=iters, dataset=batches,
                        nsamples=windows.shape[0], seqlen=windows.shape[1], batch_size=8, device_map="cpu")
    rounder.quantize()  # leaves the tuned, fake-quantized (dequantized) weights in the model's linears


def hqq(model, bits: int, group_size: int) -> None:
    """HQQ (data-free, half-quadratic zero/scale refinement) per linear, dequantized back in place."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    for module in decoder_linears(model).values():
        layer = HQQLinear(module, config, compute_dtype=torch.float32, device="cpu", del_orig=False)
        module.weight.data.copy_(layer.dequantize().reshape(module.weight.shape).float())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=["autoround", "hqq"])
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="torch.save'd (samples, seq_len) calibration token ids")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    if args.method == "autoround":
        autoround(model, tokenizer, torch.load(args.windows), args.bits, args.group_size, args.iters)
    else:
        hqq(model, args.bits, args.group_size)
    seconds = time.perf_counter() - start
    save_file({name: m.weight.detach().float().contiguous() for name, m in decoder_linears(model).items()},
              args.output, metadata={"seconds": f"{seconds:.1f}"})


if __name__ == "__main__":
    main()
