"""Token-level perplexity with the protocol of the GPTQ, SparseGPT and AWQ papers.

Protocol `token_ppl` version 1: tokenize the whole text once (documents joined with "\\n\\n"), cut it into
non-overlapping windows of `seq_len` tokens (the tail shorter than a window is dropped), and report
exp(mean next-token negative log-likelihood) over every predicted token of every window. Each window starts
cold, without context from the previous one.

Worked example: 1,050 tokens with seq_len=512 give 2 windows; 2 x 511 = 1,022 predictions are scored.
This is not lm-eval's word-level document perplexity, which normalises by words and uses a rolling context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compress.context import RunContext
from compress.data import contiguous_windows, dataset_label, load_text, tokenize_text
from compress.engine import model_on_device
from compress.model_io import ModelHandle
from compress.progress import SILENT, Advance, Reporter, no_progress
from compress.registry import StrictConfig, register_evaluator
from evaluators.base import EvalResult

PROTOCOL = {"name": "token_ppl", "version": 1, "stride": "seq_len", "joined": "\\n\\n"}


class PerplexityConfig(StrictConfig):
    """Recipe example:

        evaluate:
          perplexity: [{dataset: eval.txt, seq_len: 512}, {dataset: wikitext2, seq_len: 2048}]
    """

    dataset: str
    seq_len: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    max_windows: int | None = Field(None, ge=1, description="score only the first N windows (quick checks)")


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
               advance: Advance = no_progress) -> tuple[float, int]:
    """Summed next-token NLL over all windows (count, seq_len), and the number of scored tokens."""
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        advance(batch.shape[0])
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, vocab)
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return total_nll, total_tokens


def perplexity_of(model: nn.Module, token_ids: torch.Tensor, seq_len: int, batch_size: int, device: torch.device,
                  max_windows: int | None = None, reporter: Reporter = SILENT) -> tuple[float, dict[str, int]]:
    windows = contiguous_windows(token_ids, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    with reporter.task(f"perplexity ({windows.shape[0]} windows)", total=windows.shape[0], unit="window") as advance:
        nll, tokens = window_nll(model, windows, batch_size, device, advance)
    return math.exp(nll / tokens), {"windows": windows.shape[0], "scored_tokens": tokens}


@register_evaluator("perplexity", PerplexityConfig)
def evaluate_perplexity(handle: ModelHandle, cfg: PerplexityConfig, run: RunContext) -> EvalResult:
    """Token perplexity on a text, non-overlapping windows (GPTQ/SparseGPT/AWQ protocol)."""
    key = ("token_ids", cfg.dataset)
    if key not in run.cache:  # the baseline and the compressed evaluation read the same text
        run.cache[key] = tokenize_text(handle.tokenizer, load_text(cfg.dataset))
    token_ids = run.cache[key]
    with model_on_device(handle, handle.device):
        value, counts = perplexity_of(handle.model, token_ids, cfg.seq_len, cfg.batch_size, handle.device,
                                      cfg.max_windows, run.reporter)
    details = {**PROTOCOL, "seq_len": cfg.seq_len, "dataset": cfg.dataset, **counts}
    return EvalResult("perplexity", dataset_label(cfg.dataset), value, details)
