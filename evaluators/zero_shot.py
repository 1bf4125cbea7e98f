"""Zero-shot accuracy with the semantics of lm-evaluation-harness (`lm_eval_loglikelihood` v1).

For each document and each choice, score log P(continuation | context) as lm-eval's HF backend does:

- tokenization: trailing spaces of the context move to the continuation; the pair is encoded as
  tok(context + continuation) with the context part tok(context) (tokenizer defaults, so a Llama BOS is
  kept); an empty context becomes the BOS (else EOS) token;
- the model reads (context + continuation)[-(max_length + 1):][:-1] and the continuation's tokens are
  scored from the last len(continuation) positions (left truncation past the model's context length);
- acc = argmax of the summed log-probabilities is the gold choice; acc_norm = argmax of the sum divided by
  the choice's length in characters (lm-eval's `acc_norm`; equal to its byte length for ASCII text, and
  lm-eval's own `acc_bytes` is the byte variant); the first index wins ties, as with numpy.argmax;
- stderr = sample standard deviation / sqrt(n) (lm-eval's `mean_stderr`);
- lambada_openai: acc = the greedy (argmax) tokens reproduce the last word, perplexity =
  exp(-mean log-likelihood of the word), stderr by bootstrap (1,000 resamples, seed 0).

Worked example (PIQA): context "Question: How do I open a jar?\\nAnswer:", continuations " Twist the lid."
and " Hit it with a hammer."; with sums -12.0 and -15.0 over 15 and 22 characters acc picks choice 0
and acc_norm compares -0.800 with -0.682, picking choice 1.

Speed: identical model inputs are computed once (a multiple-choice document whose choices are one token
each, like BoolQ's " no"/" yes", costs one forward for all its choices: the shared context), the unique
inputs are sorted longest first (so padding is small and the first batch shows the peak memory), padded on
the right and run `batch_size` at a time.

Memory: each batch is reduced to its requests' two numbers (summed log-probability, greedy flag) before the next
runs. The model's head is applied only at the continuation positions, `logit_chunk_mb` MiB of float32 logits at
a time, each chunk reduced by logsumexp + gather (compress/engine/vocab_head.py); no (T, vocab) table is kept.
Peak memory is one batch's activations plus 2-4 times `logit_chunk_mb` (the logsumexp's temporaries), flat in
the number of documents.

Recipe example:

    evaluate:
      zero_shot: {tasks: [piqa, arc_easy, hellaswag, winogrande, boolq, demo_cloze.jsonl], limit: 200}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.data import DATA_DIR_ENV
from compress.engine.layer_sweep import model_on_device
from compress.recipe.errors import UserError
from compress.engine.model_io import ModelHandle
from compress.engine.vocab_head import DEFAULT_LOGIT_CHUNK_MB, next_token_scorer, rows_per_chunk, target_scores
from compress.engine.progress import SILENT, Advance, Reporter, no_progress
from compress.recipe.registry import EvalResult
from compress.evaluators.tasks import Doc, TaskDef, registry
from compress.evaluators.tasks.generic import read_docs
from compress.evaluators.configs import ZeroShotConfig  # noqa: F401  (re-exported; defined without torch)

PROTOCOL = {"name": "lm_eval_loglikelihood", "version": 1, "num_fewshot": 0, "target_delimiter": " ",
            "acc_norm": "sum logprob / len(choice) in characters", "stderr": "sample std / sqrt(n)"}


# ---------------------------------------------------------------------------------------------------
# Loading documents


@dataclass(frozen=True)
class TaskDocs:
    name: str
    output: str
    version: str
    source: str  # the file read, or "hub:<path>/<name>:<split>"
    docs: list[Doc]


def resolve_data_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def load_task(ref: str, data_dir: Path | None, limit: int | None = None) -> TaskDocs:
    """The documents of one task: a JSONL of `{context, choices, gold}`, or a built-in task read from
    `data_dir` when given, else from the hub."""
    if ref.endswith(".jsonl"):
        path = Path(ref)
        docs = read_docs(path)
        return TaskDocs(path.stem, "multiple_choice", "generic-1", str(path), docs[:limit])
    task = registry()[ref]
    if data_dir is not None:
        path = data_dir / task.local_file
        if not path.is_file():
            raise UserError(f"task '{ref}': file not found: {path} (data_dir {data_dir} should hold {task.local_file})")
        native, source = task.read_local(path), str(path)
    else:
        native, source = _read_hub(task), f"hub:{task.hub}"
    return TaskDocs(task.name, task.output, task.version, source, [task.to_doc(d) for d in native[:limit]])


def _read_hub(task: TaskDef) -> list[dict[str, Any]]:
    if task.hub is None or os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(
            f"task '{task.name}' is read from the Hugging Face hub, but offline mode is on (HF_HUB_OFFLINE=1). "
            f"Give a data folder with {task.local_file} (data_dir / --data-dir / ${DATA_DIR_ENV})."
        )
    try:
        import datasets
    except ImportError:
        raise UserError(f"task '{task.name}' needs the `datasets` package: pip install 'compress[hub]'") from None
    try:
        rows = datasets.load_dataset(task.hub.path, task.hub.name, split=task.hub.split)
    except Exception as exc:  # network, auth and missing-config errors all mean the same to the user
        raise UserError(f"could not load task '{task.name}' from the hub ({task.hub.path}): {exc}") from exc
    return [task.process_hub(dict(row)) for row in rows]


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class TokenRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # summed over the continuation's tokens
    is_greedy: bool  # argmax at every continuation position reproduces it


def _encode(tokenizer: Any, text: str) -> list[int]:
    """lm-eval's tok_encode: the tokenizer's default special tokens, unless the text already starts with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_request(tokenizer: Any, context: str, continuation: str) -> TokenRequest:
    """Token ids of one (context, continuation) pair, split the way lm-eval splits them."""
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        if cont and cont[0] == prefix:
            return TokenRequest(tuple(cont[:1]), tuple(cont[1:]))
        return TokenRequest((prefix,), tuple(cont))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return TokenRequest(tuple(context_ids), tuple(whole[len(context_ids):]))


def model_max_length(model: nn.Module, tokenizer: Any) -> int:
    """lm-eval's choice: the config's n_positions / max_position_embeddings / n_ctx, then the tokenizer's, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    from_tokenizer = getattr(tokenizer, "model_max_length", None)
    return int(from_tokenizer) if from_tokenizer is not None and from_tokenizer < 10**12 else 2048


def _model_input(request: TokenRequest, max_length: int) -> tuple[int, ...]:
    if not request.continuation:
        raise UserError("a continuation encodes to no tokens; every choice must be non-empty text")
    if len(request.continuation) > max_length:
        raise UserError(f"a continuation of {len(request.continuation)} tokens exceeds the context length {max_length}")
    return (request.context + request.continuation)[-(max_length + 1):][:-1]


@torch.no_grad()
def score_requests(model: nn.Module, requests: list[TokenRequest], *, batch_size: int, max_length: int,
                   device: torch.device, logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB,
                   advance: Advance = no_progress) -> list[Loglikelihood]:
    """log P(continuation | context) for every request, one forward per distinct model input.

    Each batch is reduced to its requests' (logprob, is_greedy) before the next batch runs: the head is applied
    only at continuation positions, `logit_chunk_mb` MiB of float32 logits at a time, so memory is one batch's
    activations plus one chunk of logits, whatever the number of documents or the vocabulary.
    """
    inputs = [_model_input(r, max_length) for r in requests]
    users: dict[tuple[int, ...], list[int]] = {}  # model input -> the requests it serves
    for index, ids in enumerate(inputs):
        users.setdefault(ids, []).append(index)
    # Longest first: each batch pads to its first row, and a memory problem shows in the first batch.
    unique = sorted(users, key=lambda ids: (-len(ids), ids))
    head, body = next_token_scorer(model)
    results: list[Loglikelihood | None] = [None] * len(requests)
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        padded = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)  # right padding cannot reach the rows
        for row, ids in enumerate(batch):
            padded[row, : len(ids)] = torch.tensor(ids)
        hidden = body(padded.to(device))  # (B, T, hidden)
        plan = continuation_positions(batch, [[requests[i].continuation for i in users[ids]] for ids in batch])
        rows = hidden[plan.row_of_position, plan.position]  # (R, hidden): only the scored positions
        scores = target_scores(head, rows, plan.pair_rows, plan.pair_targets,
                               chunk_rows=rows_per_chunk(head.vocab_size(), logit_chunk_mb))
        served = [i for ids in batch for i in users[ids]]
        for index, (first, last) in zip(served, plan.pair_spans):
            results[index] = Loglikelihood(float(scores.logprobs[first:last].sum()),
                                           bool(scores.is_argmax[first:last].all()))
        advance(len(batch))
    assert all(r is not None for r in results), "every request is served by its model input's batch"
    return cast(list[Loglikelihood], results)


@dataclass(frozen=True)
class PositionPlan:
    """Which positions of a padded batch the head must score, and which (position, target) pairs each request owns.

    Rows are unique (input, position) pairs: requests sharing a model input share its rows (the shared-input trick).
    """

    row_of_position: torch.Tensor  # (R,) batch row of each scored position
    position: torch.Tensor  # (R,) position within that row
    pair_rows: torch.Tensor  # (P,) index into the R scored positions
    pair_targets: torch.Tensor  # (P,) the continuation token expected there
    pair_spans: list[tuple[int, int]]  # per request, in batch order: its pairs are [first, last)


def continuation_positions(batch: list[tuple[int, ...]], continuations: list[list[tuple[int, ...]]]) -> PositionPlan:
    """The positions predicting each continuation: the last len(continuation) positions of its model input."""
    row_of: list[int] = []
    position: list[int] = []
    pair_rows: list[int] = []
    targets: list[int] = []
    spans: list[tuple[int, int]] = []
    for row, (ids, conts) in enumerate(zip(batch, continuations)):
        longest = max(len(c) for c in conts)
        first_row = len(position)
        row_of += [row] * longest
        position += range(len(ids) - longest, len(ids))
        for cont in conts:
            spans.append((len(pair_rows), len(pair_rows) + len(cont)))
            pair_rows += range(first_row + longest - len(cont), first_row + longest)
            targets += cont
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return PositionPlan(as_long(row_of), as_long(position), as_long(pair_rows), as_long(targets), spans)


# ---------------------------------------------------------------------------------------------------
# Metrics


def first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_stderr(values: list[float]) -> float:
    """Standard error of a mean: sample std (n - 1) / sqrt(n), as lm-eval reports for acc."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def multiple_choice_metrics(docs: list[Doc], scores: list[list[Loglikelihood]]) -> dict[str, list[float]]:
    """Per-document acc and acc_norm (1.0 or 0.0)."""
    acc, acc_norm = [], []
    for doc, doc_scores in zip(docs, scores):
        sums = [s.logprob for s in doc_scores]
        acc.append(float(first_argmax(sums) == doc.gold))
        normed = [total / len(text) for total, text in zip(sums, doc.norm_texts)]
        acc_norm.append(float(first_argmax(normed) == doc.gold))
    return {"acc": acc, "acc_norm": acc_norm}


def last_word_metrics(scores: list[list[Loglikelihood]]) -> tuple[float, float, float, float]:
    """(acc, acc stderr, perplexity, perplexity stderr by bootstrap) for lambada-style tasks."""
    greedy = [float(s[0].is_greedy) for s in scores]
    lls = [s[0].logprob for s in scores]
    ppl = math.exp(-sum(lls) / len(lls))
    rng = random.Random(0)
    resampled = [math.exp(-sum(rng.choices(lls, k=len(lls))) / len(lls)) for _ in range(1000)]
    mean = sum(resampled) / len(resampled)
    ppl_stderr = math.sqrt(sum((r - mean) ** 2 for r in resampled) / (len(resampled) - 1))
    return sum(greedy) / len(greedy), mean_stderr(greedy), ppl, ppl_stderr


def score_task(model: nn.Module, tokenizer: Any, task: TaskDocs, *, batch_size: int, max_length: int,
               device: torch.device, logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB,
               reporter: Reporter = SILENT) -> dict[str, tuple[float, float]]:
    """{metric: (value, stderr)} for one task's documents."""
    flat = [encode_request(tokenizer, ctx, cont) for doc in task.docs for ctx, cont in doc.requests]
    forwards = len({_model_input(r, max_length) for r in flat})
    with reporter.task(f"{task.name}: {len(task.docs)} docs, {forwards} inputs", total=forwards) as advance:
        results = score_requests(model, flat, batch_size=batch_size, max_length=max_length, device=device,
                                 logit_chunk_mb=logit_chunk_mb, advance=advance)
    per_doc, position = [], 0
    for doc in task.docs:
        per_doc.append(results[position : position + len(doc.requests)])
        position += len(doc.requests)
    if task.output == "last_word":
        acc, acc_err, ppl, ppl_err = last_word_metrics(per_doc)
        return {"acc": (acc, acc_err), "perplexity": (ppl, ppl_err)}
    metrics = multiple_choice_metrics(task.docs, per_doc)
    return {name: (sum(values) / len(values), mean_stderr(values)) for name, values in metrics.items()}


def check_task_files(cfg: ZeroShotConfig) -> None:
    """Read every local task file once, so a missing or malformed one fails before a model is loaded."""
    data_dir = resolve_data_dir(cfg.data_dir)
    for ref in cfg.tasks:
        if ref.endswith(".jsonl") or data_dir is not None:
            load_task(ref, data_dir, cfg.limit)
        else:
            _read_hub_check_offline(registry()[ref])


def _read_hub_check_offline(task: TaskDef) -> None:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        _read_hub(task)  # raises the offline error naming the local file to use instead


def _task_docs(ref: str, cfg: ZeroShotConfig, run: RunContext) -> TaskDocs:
    """The documents of task `ref`, read once per run: the baseline and the compressed evaluation score the same."""
    data_dir = resolve_data_dir(cfg.data_dir)
    task: TaskDocs = run.cache.task_docs(ref, str(data_dir), cfg.limit, lambda: load_task(ref, data_dir, cfg.limit))
    return task


def docs_sha256(task: TaskDocs) -> str:
    """SHA-256 of what is scored: every document's requests, gold index and normalisation texts, in order."""
    described = [[doc.requests, doc.gold, doc.norm_texts] for doc in task.docs]
    return hashlib.sha256(json.dumps([task.name, task.output, task.version, described]).encode("utf-8")).hexdigest()


def zero_shot_cache_inputs(handle: ModelHandle, cfg: ZeroShotConfig, run: RunContext) -> dict[str, object]:
    """What the scores depend on besides the model, `cfg` and the code: each task's documents (by content, wherever
    they were read from), the context length and the protocol."""
    return {"docs_sha256": {ref: docs_sha256(_task_docs(ref, cfg, run)) for ref in cfg.tasks},
            "max_length": cfg.max_length or model_max_length(handle.model, handle.tokenizer), "protocol": PROTOCOL}


def evaluate_zero_shot(handle: ModelHandle, cfg: ZeroShotConfig, run: RunContext) -> list[EvalResult]:
    """Zero-shot accuracy (acc, acc_norm, stderr) with lm-evaluation-harness semantics."""
    max_length = cfg.max_length or model_max_length(handle.model, handle.tokenizer)
    results = []
    for ref in cfg.tasks:
        task = _task_docs(ref, cfg, run)
        with model_on_device(handle, handle.device):
            metrics = score_task(handle.model, handle.tokenizer, task, batch_size=cfg.batch_size,
                                 max_length=max_length, device=handle.device, logit_chunk_mb=cfg.logit_chunk_mb,
                                 reporter=run.inputs.reporter)
        details = {**PROTOCOL, "task": task.name, "task_version": task.version, "source": task.source,
                   "docs": len(task.docs), "max_length": max_length}
        for metric, (value, stderr) in metrics.items():
            name = "last_word_perplexity" if metric == "perplexity" else metric
            results.append(EvalResult(name, task.name, value, {**details, "stderr": stderr}))
    return results
