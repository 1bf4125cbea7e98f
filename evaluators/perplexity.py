"""Token-level perplexity with the protocol of the GPTQ, SparseGPT and AWQ papers.

Protocol `token_ppl` version 1: tokenize the whole text once (documents joined with "\\n\\n"), cut it into
non-overlapping windows of `seq_len` tokens (the tail shorter than a window is dropped), and report
exp(mean next-token negative log-likelihood) over every predicted token of every window. Each window starts
cold, without context from the previous one.

Worked example: 1,050 tokens with seq_len=512 give 2 windows; 2 x 511 = 1,022 predictions are scored.
This is not lm-eval's word-level document perplexity, which normalises by words and uses a rolling context.

Protocol `token_ppl` version 2 (chosen by setting `stride`): sliding windows of `seq_len` tokens that start
every `stride` tokens; each window scores only the tokens no earlier window scored, so every token but the
first is predicted once, with at least seq_len - stride tokens of context (except inside the first window).
The last window ends at the end of the text (nothing is dropped).

Worked example: 1,050 tokens, seq_len=512, stride=256: windows [0,512) [256,768) [512,1024) [768,1050) score
511 + 256 + 256 + 26 = 1,049 predictions. Smaller strides cost seq_len/stride times the compute of v1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.data import contiguous_windows, dataset_label
from compress.engine.layer_sweep import model_on_device
from compress.recipe.errors import UserError
from compress.engine.model_io import ModelHandle
from compress.engine.vocab_head import (
    DEFAULT_LOGIT_CHUNK_MB,
    OutputHead,
    next_token_scorer,
    rows_per_chunk,
    target_nll,
)
from compress.engine.progress import SILENT, Advance, Reporter, no_progress
from compress.recipe.registry import EvalResult
from compress.evaluators.configs import PerplexityConfig  # noqa: F401  (re-exported; defined without torch)

PROTOCOL = {"name": "token_ppl", "version": 1, "stride": "seq_len", "joined": "\\n\\n"}
SLIDING_PROTOCOL = {"name": "token_ppl", "version": 2, "joined": "\\n\\n",
                    "windows": "seq_len tokens every stride tokens; each token scored once; tail kept"}


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
               advance: Advance = no_progress, logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB) -> tuple[float, int]:
    """Summed next-token NLL over all windows (count, seq_len), and the number of scored tokens."""
    head, body = next_token_scorer(model)
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        advance(batch.shape[0])
        batch = batch.to(device)
        hidden = body(batch)[:, :-1]  # (B, T-1, hidden)
        targets = batch[:, 1:]
        total_nll += scored_nll(head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), logit_chunk_mb)
        total_tokens += targets.numel()
    return total_nll, total_tokens


def scored_nll(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, logit_chunk_mb: int) -> float:
    """-sum log P(targets[i] | hidden[i]) for hidden (N, hidden) rows, `logit_chunk_mb` MiB of logits at a time."""
    chunk_rows = rows_per_chunk(head.vocab_size(), logit_chunk_mb)
    return float(target_nll(head, hidden, targets, chunk_rows=chunk_rows))


def perplexity_of(model: nn.Module, token_ids: torch.Tensor, seq_len: int, batch_size: int, device: torch.device,
                  max_windows: int | None = None, reporter: Reporter = SILENT,
                  logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB) -> tuple[float, dict[str, int]]:
    windows = contiguous_windows(token_ids, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    with reporter.task(f"perplexity ({windows.shape[0]} windows)", total=windows.shape[0], unit="window") as advance:
        nll, tokens = window_nll(model, windows, batch_size, device, advance, logit_chunk_mb)
    return math.exp(nll / tokens), {"windows": windows.shape[0], "scored_tokens": tokens}


def sliding_windows(total_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each token_ppl v2 window: positions [first_scored, end) are scored."""
    windows, scored_until, begin = [], 1, 0
    while True:
        end = min(begin + seq_len, total_tokens)
        windows.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == total_tokens:
            return windows
        begin += stride


@torch.no_grad()
def sliding_perplexity_of(model: nn.Module, token_ids: torch.Tensor, seq_len: int, stride: int, batch_size: int,
                          device: torch.device, max_windows: int | None = None, reporter: Reporter = SILENT,
                          logit_chunk_mb: int = DEFAULT_LOGIT_CHUNK_MB) -> tuple[float, dict[str, int]]:
    if token_ids.numel() < 2:
        raise UserError(f"evaluation text has {token_ids.numel()} tokens; perplexity needs at least 2")
    windows = sliding_windows(token_ids.numel(), seq_len, stride)[:max_windows]
    head, body = next_token_scorer(model)
    total_nll, total_tokens = 0.0, 0
    with reporter.task(f"perplexity ({len(windows)} sliding windows)", total=len(windows)) as advance:
        for start in range(0, len(windows), batch_size):
            group = windows[start : start + batch_size]
            for length in sorted({end - begin for begin, end, _ in group}):  # the tail window is shorter
                same = [w for w in group if w[1] - w[0] == length]
                batch = torch.stack([token_ids[b:e] for b, e, _ in same]).to(device)  # (B, length)
                hidden = body(batch)  # (B, length, hidden)
                for row, (begin, end, first) in enumerate(same):
                    targets = batch[row, first - begin :]
                    total_nll += scored_nll(head, hidden[row, first - begin - 1 : -1], targets, logit_chunk_mb)
                    total_tokens += targets.numel()
            advance(len(group))
    return math.exp(total_nll / total_tokens), {"windows": len(windows), "scored_tokens": total_tokens}


def evaluate_perplexity(handle: ModelHandle, cfg: PerplexityConfig, run: RunContext) -> EvalResult:
    """Token perplexity on a text, non-overlapping windows (GPTQ/SparseGPT/AWQ protocol)."""
    # the baseline and the compressed evaluation read the same text: tokenized once (RunCache)
    token_ids = run.cache.token_ids((cfg.dataset, cfg.data_dir), handle.tokenizer)
    with model_on_device(handle, handle.device):
        if cfg.stride is None:
            value, counts = perplexity_of(handle.model, token_ids, cfg.seq_len, cfg.batch_size, handle.device,
                                          cfg.max_windows, run.inputs.reporter, cfg.logit_chunk_mb)
        else:
            value, counts = sliding_perplexity_of(handle.model, token_ids, cfg.seq_len, cfg.stride, cfg.batch_size,
                                                  handle.device, cfg.max_windows, run.inputs.reporter,
                                                  cfg.logit_chunk_mb)
    protocol = PROTOCOL if cfg.stride is None else {**SLIDING_PROTOCOL, "stride": cfg.stride}
    details = {**protocol, "seq_len": cfg.seq_len, "dataset": cfg.dataset, **counts}
    return EvalResult("perplexity", dataset_label(cfg.dataset), value, details)


def perplexity_cache_inputs(handle: ModelHandle, cfg: PerplexityConfig, run: RunContext) -> dict[str, object]:
    """What a perplexity depends on besides the model, `cfg` and the code: the text scored (by content, so an
    edited file is scored afresh) and the protocol."""
    protocol = PROTOCOL if cfg.stride is None else SLIDING_PROTOCOL
    return {"text_sha256": run.cache.text_digest((cfg.dataset, cfg.data_dir)), "protocol": protocol}
