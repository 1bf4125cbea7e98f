"""llm-compressor's side of bench/whole_job.py: the whole job as a user would script it, in one process.

Load the model and tokenizer, read and tokenize the calibration and evaluation texts, sample the same calibration
windows as our recipe (GPTQ's sampling, the same seed), score the baseline, `oneshot`, score again with the same
perplexity protocol and windows, and save the compressed model. Prints one JSON line: both perplexities and the
seconds of each phase.

    python bench/whole_job_peer.py gptq-w4 --model recipes/demo/model --calibration recipes/demo/calib.txt \
        --evaluation recipes/demo/eval.txt --samples 128 --seq-len 512 --eval-windows 64 --output /tmp/peer-out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

STARTED = time.perf_counter()
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from schemes import BLOCK_SIZE, DAMPENING_FRAC, _peer_gptq, _peer_rtn  # noqa: E402

EVAL_BATCH = 8
CALIBRATION_BATCH = 8


def _peer_sparsegpt() -> list[Any]:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    # as bench/pruning.py: the peer names pruned modules "<target>.<child>", so lm_head needs a regex
    return [SparseGPTModifier(sparsity=0.5, mask_structure="0:0", ignore=["re:.*lm_head"],
                              dampening_frac=DAMPENING_FRAC, block_size=BLOCK_SIZE)]


RECIPES: dict[str, tuple[Callable[[], list[Any]], bool]] = {  # key -> (modifiers, calibrated)
    "gptq-w4": (_peer_gptq(4), True),
    "gptq-w3": (_peer_gptq(3), True),
    "rtn-w4": (_peer_rtn(4), False),
    "sparsegpt-50": (_peer_sparsegpt, True),
}


def _loader(windows: torch.Tensor) -> torch.utils.data.DataLoader:
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([row[key] for row in batch]) for key in batch[0]}

    return torch.utils.data.DataLoader(rows, batch_size=CALIBRATION_BATCH, shuffle=False, collate_fn=collate)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """token_ppl v1 (the GPTQ protocol, as ours): exp(mean next-token NLL) over disjoint windows."""
    total, count = 0.0, 0
    for batch in windows.split(EVAL_BATCH):
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scheme", choices=sorted(RECIPES))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--evaluation", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    phases["import"] = mark - STARTED

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 3)
        mark = now

    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lap("import_peer")
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    lap("load")
    ids = tokenizer(args.evaluation.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    count = ids.numel() // args.seq_len
    windows = ids[: count * args.seq_len].reshape(count, args.seq_len)[: args.eval_windows]
    calibration_ids = tokenizer(args.calibration.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    generator = torch.Generator().manual_seed(0)  # GPTQ's sampling, as our calibration (seed 0)
    starts = torch.randint(0, calibration_ids.numel() - args.seq_len, (args.samples,), generator=generator)
    calibration = torch.stack([calibration_ids[s : s + args.seq_len] for s in starts.tolist()])
    lap("data")
    baseline = perplexity(model, windows)
    lap("baseline_eval")
    modifiers, calibrated = RECIPES[args.scheme]
    kwargs = {"dataset": _loader(calibration), "num_calibration_samples": args.samples,
              "max_seq_length": args.seq_len} if calibrated else {}
    model = oneshot(model=model, tokenizer=tokenizer, recipe=modifiers(), **kwargs)
    lap("oneshot")
    compressed = perplexity(model, windows)
    lap("eval")
    model.save_pretrained(args.output, save_compressed=True)
    tokenizer.save_pretrained(args.output)
    lap("export")
    print(json.dumps({"baseline": baseline, "compressed": compressed, "phases": phases}))


if __name__ == "__main__":
    main()
