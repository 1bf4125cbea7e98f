"""Peak memory of one evaluator run, in a fresh process (run by test_eval_memory.py and bench/eval_memory.py).

    python -m tests.evaluators.peak_memory MODEL_DIR EVALUATOR DATA DOCS [--chunk-mb 256] [--full-table]

Prints one JSON line: the evaluator's results, its seconds, and the process's peak resident set size
(`ru_maxrss`, MiB) after loading the model and after evaluating. Synthetic HellaSwag-format documents come from
`write_hellaswag`, so the measurement runs without ../shared. `--full-table` swaps in the zero-shot scorer as it
was before vocabulary chunking (`full_table_score_requests`), to measure what the old code held.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

WORDS = ("model layer weight token python function return value list dict string file test data import class "
         "object error zero one two three four eight scale group").split()


def write_hellaswag(folder: Path, docs: int, *, seed: int = 0) -> Path:
    """`docs` documents in llama.cpp's 6-lines-per-item HellaSwag layout under folder/hellaswag/ (the built-in task's file)."""
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    lines = []
    for _ in range(docs):
        lines += [f"{words(1).capitalize()}: {words(rng.randint(6, 10))}.", str(rng.randint(0, 3))]
        lines += [words(rng.randint(2, 4)) + "." for _ in range(4)]
    path = folder / "hellaswag" / "hellaswag_val_full.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def full_table_score_requests(model, requests, *, batch_size, max_length, device, advance=lambda n: None, **_):
    """The zero-shot scorer before vocabulary chunking: a (T, vocab) log-probability table per distinct input,
    all kept until the task ends (the memory defect of issue 15, kept here only to be measured)."""
    import torch
    import torch.nn.functional as F

    from compress.evaluators.zero_shot import Loglikelihood, _model_input

    inputs = [_model_input(r, max_length) for r in requests]
    unique = sorted(set(inputs), key=lambda ids: (-len(ids), ids))
    log_probs = {}
    with torch.no_grad():
        for start in range(0, len(unique), batch_size):
            batch = unique[start : start + batch_size]
            padded = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
            for row, ids in enumerate(batch):
                padded[row, : len(ids)] = torch.tensor(ids)
            logits = model(padded.to(device)).logits
            for row, ids in enumerate(batch):
                log_probs[ids] = F.log_softmax(logits[row, : len(ids)], dim=-1).cpu()
            advance(len(batch))
    results = []
    for request, ids in zip(requests, inputs):
        cont = torch.tensor(request.continuation)
        rows = log_probs[ids][len(ids) - len(cont):]
        results.append(Loglikelihood(float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())))
    return results


def main(model_dir: str, evaluator: str, data: str, docs: int, chunk_mb: int | None, full_table: bool = False) -> None:
    import torch

    import compress.app.builtins  # noqa: F401  (registers the evaluators)
    from compress.engine.model_io import load_model
    from compress.evaluators import zero_shot

    if full_table:
        zero_shot.score_requests = full_table_score_requests
    torch.set_num_threads(1)  # the tests share a 2-core machine; memory, not speed, is measured
    handle = load_model(model_dir, device="cpu")
    loaded = peak_mib()
    started = time.perf_counter()
    results = sensitivities(handle, data, docs, chunk_mb) if evaluator == "sensitivity" else \
        evaluate(handle, evaluator, data, docs, chunk_mb)
    print(json.dumps({"evaluator": evaluator, "docs": docs, "loaded_mib": round(loaded, 1),
                      "peak_mib": round(peak_mib(), 1), "seconds": round(time.perf_counter() - started, 2),
                      "results": results}))


def evaluate(handle, evaluator: str, data: str, docs: int, chunk_mb: int | None) -> dict[str, float]:
    """Run a registered evaluator as a recipe's `evaluate:` section would; {metric/label: value}."""
    import torch

    from compress.engine.context import RunContext, RunInputs
    from compress.recipe.registry import available_evaluators

    definition = available_evaluators()[evaluator]
    settings = {"zero_shot": {"tasks": ["hellaswag"], "data_dir": data, "limit": docs, "batch_size": 32},
                "lm_eval": {"tasks": ["hellaswag"], "data_dir": data, "limit": docs, "batch_size": 8},
                "perplexity": {"dataset": data, "seq_len": 128, "batch_size": 8, "max_windows": docs}}[evaluator]
    if chunk_mb is not None:
        settings["logit_chunk_mb"] = chunk_mb
    results = definition.apply(handle, definition.config(**settings), RunContext(RunInputs(device=torch.device("cpu"))))
    return {f"{r.metric}/{r.label}": r.value for r in (results if isinstance(results, list) else [results])}


def sensitivities(handle, text: str, windows: int, chunk_mb: int | None) -> dict[str, float]:
    """`allocate`'s hessian_trace estimator on `windows` calibration windows of 64 tokens; summed module scores."""
    import torch

    from compress.compressors.allocate import AllocateConfig, compute_sensitivities
    from compress.compressors.rtn import RTNConfig
    from compress.engine.context import RunContext, RunInputs
    from compress.engine.data import load_text, sample_windows, tokenize_text

    calibration = sample_windows(tokenize_text(handle.tokenizer, load_text(text)), windows, 64, 0)
    settings = {"budget": {"avg_bits": 4.25}, "sensitivity": "hessian_trace", "max_probes": 4}
    if chunk_mb is not None:
        settings["logit_chunk_mb"] = chunk_mb
    run = RunContext(RunInputs(device=torch.device("cpu"), calibration=calibration, calibration_batch_size=8))
    document = compute_sensitivities(handle, AllocateConfig(**settings), RTNConfig(bits=4), run)
    return {"hessian_trace/sum_of_module_scores": sum(document["module_scores"].values())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("evaluator", choices=["zero_shot", "lm_eval", "perplexity", "sensitivity"])
    parser.add_argument("data", help="zero_shot, lm_eval: a data folder with hellaswag/; else a text file")
    parser.add_argument("docs", type=int, help="documents (zero_shot, lm_eval) or windows (perplexity, sensitivity)")
    parser.add_argument("--chunk-mb", type=int, help="the evaluator's logit_chunk_mb (default: its own default)")
    parser.add_argument("--full-table", action="store_true")
    args = parser.parse_args()
    main(args.model_dir, args.evaluator, args.data, args.docs, args.chunk_mb, args.full_table)
