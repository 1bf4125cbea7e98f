"""Evaluator peak memory at Llama 3's 128,256-token vocabulary: flat in the number of documents (issue 15).

Each measurement is a fresh process (tests/evaluators/peak_memory.py) on the random-weight Llama-3-shaped fixture
(tests/real_shapes.py: 128,256-token untied head, GQA, bf16 on disk, float32 on the CPU), reporting its peak RSS
(`ru_maxrss`) and the RSS right after loading the model. Documents: HellaSwag's validation set from ../shared/data
(llama.cpp's 6-line layout) and WikiText-2 test text; without them, synthetic documents in the same layouts.
The old zero-shot scorer (a (T, vocab) log-probability table per distinct input, kept to the end of the task) is
measured at small document counts, and its table size computed exactly for the larger ones.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/eval_memory.py [--docs 100,1000] [--skip lm_eval]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from tests.evaluators.peak_memory import write_hellaswag  # noqa: E402
from tests.real_shapes import LLAMA3_VOCAB, save_real_shape_model  # noqa: E402
from tests.tiny_models import synthetic_text  # noqa: E402

BOUND_MIB = 1024  # the stated bound for zero-shot at 1,000 documents: peak RSS minus the loaded model


def measure(model: Path, evaluator: str, data: Path, docs: int, *extra: str) -> dict:
    command = [sys.executable, "-m", "tests.evaluators.peak_memory", str(model), evaluator, str(data), str(docs), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"evaluator": evaluator, "docs": docs, "error": done.stderr.strip().splitlines()[-1][:200]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def old_table_mib(model: Path, data: Path, docs: int) -> float:
    """The old scorer's log-probability tables for `docs` HellaSwag documents: sum over distinct inputs of
    len(input) x vocab x 4 bytes (float32), all alive at the end of the task."""
    from transformers import AutoTokenizer

    from compress.evaluators.zero_shot import _model_input, encode_request, load_task

    tokenizer = AutoTokenizer.from_pretrained(model)
    task = load_task("hellaswag", data, docs)
    inputs = {_model_input(encode_request(tokenizer, c, k), 131_072) for doc in task.docs for c, k in doc.requests}
    return sum(len(ids) for ids in inputs) * LLAMA3_VOCAB * 4 / 2**20


def data_sources(work: Path, docs: int) -> tuple[Path, Path, str]:
    shared = Path(os.environ.get("COMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))
    hellaswag, wikitext = shared / "hellaswag" / "hellaswag_val_full.txt", shared / "wikitext2_raw" / "wiki.test.raw"
    if hellaswag.is_file() and wikitext.is_file():
        return shared, wikitext, "HellaSwag validation and WikiText-2 test (../shared/data)"
    text = work / "text.txt"
    text.write_text(synthetic_text(words=200_000), encoding="utf-8")
    return write_hellaswag(work / "data", docs), text, "synthetic HellaSwag-format documents and text"


def row(result: dict, note: str = "") -> str:
    if "error" in result:
        return f"| {result['evaluator']} | {result['docs']:,} | failed: {result['error']} | | | {note} |"
    above = result["peak_mib"] - result["loaded_mib"]
    return (f"| {result['evaluator']} | {result['docs']:,} | {result['peak_mib']:,.0f} | {above:,.0f} | "
            f"{result['seconds']:,.0f} | {note} |")


def flat_line(name: str, few: dict, many: dict) -> str:
    if "error" in few or "error" in many:
        return f"- {name}: not measured (see the table)."
    ratio = many["peak_mib"] / few["peak_mib"]
    return (f"- {name}: {many['docs']:,} vs {few['docs']:,}: peak RSS ratio {ratio:.3f} "
            f"({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", default="100,1000", help="two document counts for zero-shot and perplexity")
    parser.add_argument("--lm-eval-docs", default="20,60", help="lm-eval scores every position: slower")
    parser.add_argument("--sensitivity-windows", default="8,24")
    parser.add_argument("--old-docs", default="10,20", help="document counts the old scorer is run at")
    parser.add_argument("--skip", default="", help="comma-separated evaluators to leave out")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "eval_memory.md"))
    args = parser.parse_args()
    few, many = (int(n) for n in args.docs.split(","))
    skip = set(filter(None, args.skip.split(",")))
    started = time.time()
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="eval-memory-") as tmp:
        work = Path(tmp)
        model = save_real_shape_model(work / "llama3", "llama3")
        data, text, source = data_sources(work, many)
        results: dict[str, list[dict]] = {}
        plan = [("zero_shot", data, (few, many)), ("perplexity", text, (few, many)),
                ("lm_eval", data, tuple(int(n) for n in args.lm_eval_docs.split(","))),
                ("sensitivity", text, tuple(int(n) for n in args.sensitivity_windows.split(",")))]
        for evaluator, source_path, counts in plan:
            if evaluator not in skip:
                results[evaluator] = [measure(model, evaluator, source_path, n) for n in counts]
        old = [measure(model, "zero_shot", data, int(n), "--full-table") for n in args.old_docs.split(",")]
        old_tables = {n: old_table_mib(model, data, n) for n in [int(n) for n in args.old_docs.split(",")] + [few, many]}

    import torch
    import transformers

    lines = [
        "## Evaluator memory at a 128k vocabulary",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} by `bench/eval_memory.py` on "
        f"{platform.machine()} ({os.cpu_count()} cores, load average {load:.1f} at the start, other jobs sharing "
        f"them), torch {torch.__version__}, transformers {transformers.__version__}, one thread per process. Model: "
        "the random Llama-3-shaped fixture (tests/real_shapes.py: 128,256-token untied head, hidden 64, 2 layers, "
        f"float32 on the CPU). Documents: {source}. Each row is a fresh process; *above load* is its peak RSS minus "
        "the RSS right after loading the model. Seconds are wall time on a loaded machine, not a speed claim.",
        "",
        "Settings: zero-shot `hellaswag`, batch_size 32; perplexity seq_len 128, batch_size 8 (documents = windows); "
        "lm_eval: lm-evaluation-harness's own HFLM on the in-memory model, batch_size 8; sensitivity: `allocate`'s "
        "hessian_trace, 64-token calibration windows, batches of 8, max_probes 4 (documents = windows). "
        "`logit_chunk_mb` at its default, 256.",
        "",
        "| evaluator | documents | peak RSS (MiB) | above load (MiB) | seconds | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for evaluator, measured in results.items():
        lines += [row(r) for r in measured]
    for result in old:
        lines.append(row({**result, "evaluator": "zero_shot, old scorer"},
                         f"its tables: {old_tables[result['docs']]:,.0f} MiB"))
    for n in (few, many):
        lines.append(f"| zero_shot, old scorer | {n:,} | not run | {old_tables[n]:,.0f} (tables alone, computed) | | "
                     "sum of len(input) x 128,256 x 4 bytes over distinct inputs |")
    lines += ["", "Flat in the number of documents:"]
    lines += [flat_line(e, m[0], m[1]) for e, m in results.items()]
    zero = results.get("zero_shot")
    if zero and "error" not in zero[1]:
        above = zero[1]["peak_mib"] - zero[1]["loaded_mib"]
        lines.append(f"- Must show: zero-shot on {zero[1]['docs']:,} HellaSwag documents peaks at "
                     f"{zero[1]['peak_mib']:,.0f} MiB, {above:,.0f} MiB above the loaded model "
                     f"({'within' if above <= BOUND_MIB else 'OVER'} the stated bound of {BOUND_MIB:,} MiB).")
    lines += [
        "",
        "lm_eval is lm-evaluation-harness's own code, not chunked by us: it keeps only (log-likelihood, is-greedy) "
        "per request, but each batch takes a float32 log_softmax over every position, (batch_size, T, vocab), and its "
        "first batch holds the longest inputs, so its peak rises with the longest document seen, bounded by "
        "batch_size x max_length x vocab x 4 bytes; use `zero_shot` for the built-in tasks at a large vocabulary. "
        "The sensitivity estimator's peak is a few times `logit_chunk_mb`: a "
        "Hessian-vector product keeps each differentiated position's softmax for the second derivative.",
    ]
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
