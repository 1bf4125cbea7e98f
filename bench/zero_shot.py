"""Zero-shot scoring speed: documents per second for our scorer and for lm-evaluation-harness, same model, same
documents (the first N of each task in ../shared/data), same batch size, CPU. Also checks that both give the
same acc and acc_norm.

Seconds are wall time from documents on disk to metrics: our `load_task` + `score_task`, and lm-eval's
`simple_evaluate` on the same in-memory model (its task YAMLs pointed at the same files, see
evaluators/lm_eval_adapter.py), so both include reading and tokenizing the documents; model loading is
excluded for both.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/zero_shot.py [--docs 200] [--tasks piqa,arc_easy,hellaswag]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from compress.engine.model_io import load_model  # noqa: E402
from compress.evaluators.lm_eval_adapter import run_lm_eval  # noqa: E402
from compress.evaluators.zero_shot import load_task, model_max_length, score_task  # noqa: E402

DEMO_MODEL = REPO / "recipes" / "demo" / "model"


def time_ours(handle, name: str, data_dir: Path, docs: int, batch_size: int) -> tuple[float, dict]:
    start = time.perf_counter()
    task = load_task(name, data_dir, docs)
    metrics = score_task(handle.model, handle.tokenizer, task, batch_size=batch_size,
                         max_length=model_max_length(handle.model, handle.tokenizer), device=torch.device("cpu"))
    return time.perf_counter() - start, metrics


def time_lm_eval(handle, name: str, data_dir: Path, docs: int, batch_size: int) -> tuple[float, dict]:
    start = time.perf_counter()
    output = run_lm_eval(handle.model, handle.tokenizer, [name], limit=docs, batch_size=batch_size, data_dir=data_dir)
    return time.perf_counter() - start, output["results"][f"compress_{name}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--tasks", default="piqa,arc_easy,hellaswag,winogrande,boolq")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default=os.environ.get("COMPRESS_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "zero_shot.md"))
    args = parser.parse_args()

    import lm_eval
    import transformers

    load_before = os.getloadavg()
    handle = load_model(str(DEMO_MODEL), dtype="float32", device="cpu")
    rows = []
    for name in args.tasks.split(","):
        # lm-eval first, then ours: any warm-up (page cache, thread pools) favours the peer.
        peer_seconds, peer = time_lm_eval(handle, name, Path(args.data_dir), args.docs, args.batch_size)
        our_seconds, ours = time_ours(handle, name, Path(args.data_dir), args.docs, args.batch_size)
        same = all(ours[m][0] == peer.get(f"{m},none") for m in ("acc", "acc_norm"))
        rows.append(f"| {name} | {args.docs} | {args.docs / our_seconds:.1f} | {args.docs / peer_seconds:.1f} | "
                    f"{peer_seconds / our_seconds:.2f}x | {ours['acc'][0]:.3f} / {peer['acc,none']:.3f} | "
                    f"{ours['acc_norm'][0]:.3f} / {peer['acc_norm,none']:.3f} | {'yes' if same else 'NO'} |")
        print(rows[-1], flush=True)
    load_after = os.getloadavg()
    lines = [
        "## Zero-shot scoring: compress vs lm-evaluation-harness",
        "",
        f"- model: demo Llama (4.5M parameters, float32), CPU `{platform.processor() or platform.machine()}`, "
        f"{torch.get_num_threads()} torch threads, batch size {args.batch_size}",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"lm-eval {getattr(lm_eval, '__version__', '?')}",
        f"- load average (1 min) at start / end: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores "
        "(shared machine: timings are noisy)",
        "- documents per second, wall time from the files on disk to the metrics (model already loaded); the first "
        f"{args.docs} documents of each task from ../shared/data",
        "",
        "| task | docs | ours docs/s | lm-eval docs/s | speed-up | acc ours / lm-eval | acc_norm ours / lm-eval | identical |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|",
        *rows,
        "",
    ]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
