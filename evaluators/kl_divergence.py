"""KL divergence of the compressed model's next-token distributions from the baseline's, on an evaluation text.

Protocol `next_token_kl` version 1: the windows of `token_ppl` v1 (the text tokenized once, documents joined with
"\\n\\n", cut into disjoint windows of `seq_len` tokens, the short tail dropped); at every position but a window's
last, P = the baseline's next-token distribution, Q = the compressed model's. Reported: the mean over positions of
KL(P || Q) in nats (`kl_divergence`), its 99th percentile (`kl_divergence_p99`, numpy's linear interpolation), and
the share of positions where both models' most likely token is the same (`top1_agreement`). The baseline's row of
each is 0, 0 and 1 by definition.

Both distributions come from the same run: the first evaluation (the baseline, before any pass) keeps, per
position, the baseline's `top_k` most likely tokens with their log-probabilities and the log of the mass of all the
others, in a temporary file (`(2 top_k + 1) x 4` bytes per position, in $TMPDIR), streamed back one batch at a time
by the second (the compressed model). Memory is one batch's worth of logits chunks, whatever the number of windows
and the vocabulary; the only thing kept per position is its KL (4 bytes), for the exact percentile.

The approximation, and its bound: with T the baseline's top-k tokens and R the rest, what is computed is the exact
KL between P and Q coarsened to T plus one bucket R:

    KL_k = sum_{i in T} p_i log(p_i / q_i) + P(R) log(P(R) / Q(R))

By the log-sum inequality KL_k <= KL(P || Q), and KL(P || Q) - KL_k = P(R) * KL(P(.|R) || Q(.|R)) >= 0: the
reported mean is a lower bound, exact when the two models spread their tail mass alike, and the whole gap is
confined to the baseline's tail mass, whose mean is reported beside it (`baseline_tail_mass`). Top-1 agreement is
exact (the baseline's argmax is in T).

Worked example: 1,050 tokens with seq_len=512 give 2 windows, 2 x 511 = 1,022 positions compared.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.data import contiguous_windows, dataset_label
from compress.engine.layer_sweep import model_on_device
from compress.engine.model_io import ModelHandle
from compress.engine.vocab_head import OutputHead, next_token_scorer, rows_per_chunk
from compress.recipe.errors import UserError
from compress.recipe.registry import EvalResult
from compress.evaluators.configs import KLDivergenceConfig  # noqa: F401  (re-exported; defined without torch)

PROTOCOL = {"name": "next_token_kl", "version": 1, "stride": "seq_len", "joined": "\\n\\n",
            "divergence": "KL(baseline || compressed), nats, baseline top-k plus one bucket for the rest"}
PERCENTILE = 99.0


# ---------------------------------------------------------------------------------------------------
# The pure part: one chunk of positions


@dataclass(frozen=True)
class BaselineTop:
    """The baseline's summary of n positions: its top-k tokens, their log-probabilities, the log of the rest's mass."""

    ids: torch.Tensor  # (n, k) int64, most likely first
    logprobs: torch.Tensor  # (n, k) float32
    log_rest: torch.Tensor  # (n,) float32; -inf when the top k hold all the mass


def baseline_top(logits: torch.Tensor, k: int) -> BaselineTop:
    """`BaselineTop` of (n, vocab) logits; the rest's mass is a logsumexp over the tail, so it never cancels."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # sorted: ids[:, 0] is the argmax
    return BaselineTop(ids, values, torch.logsumexp(logp.scatter(1, ids, -math.inf), dim=-1))


@dataclass(frozen=True)
class ChunkDivergence:
    kl: torch.Tensor  # (n,) float32, nats, >= 0
    agrees: torch.Tensor  # (n,) bool: the compressed model's argmax is the baseline's
    tail_mass: torch.Tensor  # (n,) float32: P(R)


def coarse_kl(base: BaselineTop, logits: torch.Tensor) -> ChunkDivergence:
    """KL_k of the module docstring between the baseline's summary and the compressed model's (n, vocab) logits."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(1, base.ids)  # (n, k)
    q_rest = torch.logsumexp(logq.scatter(1, base.ids, -math.inf), dim=-1)  # (n,)
    top = (base.logprobs.exp() * (base.logprobs - q_top)).sum(dim=-1)
    p_rest = base.log_rest.exp()
    # p log(p/q) with 0 log 0 = 0: a baseline whose top k hold everything adds nothing for the rest
    rest = torch.where(p_rest > 0, p_rest * (base.log_rest - q_rest), torch.zeros_like(p_rest))
    kl = (top + rest).clamp_min(0)  # rounding can leave -1e-9 where the two agree
    return ChunkDivergence(kl, logq.argmax(dim=-1) == base.ids[:, 0], p_rest)


# ---------------------------------------------------------------------------------------------------
# The baseline's summaries on disk, one fixed-size record per position


class TopFile:
    """Records of `k` ids (int32 bits), `k` log-probabilities and 1 log-rest, float32 words, written and read in order."""

    def __init__(self, k: int):
        self.k = k
        handle, name = tempfile.mkstemp(prefix="compress-kl-", suffix=".bin")
        os.close(handle)
        self.path = Path(name)
        self.positions = 0
        self._finalizer = weakref.finalize(self, self.path.unlink, missing_ok=True)

    @property
    def record_words(self) -> int:
        return 2 * self.k + 1

    def append(self, file: BinaryIO, top: BaselineTop) -> None:
        words = torch.cat([top.ids.to(torch.int32).view(torch.float32), top.logprobs,
                           top.log_rest[:, None]], dim=1)  # (n, 2k + 1)
        file.write(words.cpu().contiguous().numpy().tobytes())
        self.positions += words.shape[0]

    def read(self, file: BinaryIO, n: int, device: torch.device) -> BaselineTop:
        wanted = n * self.record_words
        raw = np.frombuffer(file.read(wanted * 4), dtype=np.float32)
        if raw.size != wanted:
            raise RuntimeError(f"{self.path}: the baseline's records end early (the evaluation text changed?)")
        words = torch.from_numpy(raw.copy()).view(n, self.record_words).to(device)
        k = self.k
        return BaselineTop(words[:, :k].contiguous().view(torch.int32).long(), words[:, k : 2 * k], words[:, 2 * k])

    def remove(self) -> None:
        self._finalizer()


# ---------------------------------------------------------------------------------------------------
# The two passes over the windows


def _chunks(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
            logit_chunk_mb: int) -> Iterator[torch.Tensor]:
    """(n, vocab) logits of every predicting position, window batch by window batch, `logit_chunk_mb` MiB at a time."""
    head, body = next_token_scorer(model)
    chunk_rows = rows_per_chunk(head.vocab_size(), logit_chunk_mb)
    for batch in windows.split(batch_size):
        hidden = body(batch.to(device))[:, :-1]  # (B, T-1, hidden): the last position predicts nothing scored
        rows = hidden.reshape(-1, hidden.shape[-1])
        for start in range(0, rows.shape[0], chunk_rows):
            yield _logits(head, rows[start : start + chunk_rows])


def _logits(head: OutputHead, rows: torch.Tensor) -> torch.Tensor:
    return head(rows).float()


@torch.no_grad()
def record_baseline(model: nn.Module, windows: torch.Tensor, cfg: KLDivergenceConfig, device: torch.device) -> TopFile:
    """The baseline's top-k summaries of every position, in a temporary file."""
    records = TopFile(cfg.top_k)
    with open(records.path, "wb") as file:
        for logits in _chunks(model, windows, cfg.batch_size, device, cfg.logit_chunk_mb):
            records.append(file, baseline_top(logits, cfg.top_k))
    return records


@dataclass(frozen=True)
class Divergence:
    mean_kl: float
    p99_kl: float
    top1_agreement: float
    baseline_tail_mass: float
    positions: int


@torch.no_grad()
def compare_to_baseline(model: nn.Module, windows: torch.Tensor, cfg: KLDivergenceConfig, device: torch.device,
                        records: TopFile) -> Divergence:
    """Stream the baseline's records back beside the model's logits, position for position."""
    kls: list[torch.Tensor] = []  # one float32 per position: the exact percentile needs them all (4 bytes each)
    agree, tail, positions = 0, 0.0, 0
    with open(records.path, "rb") as file:
        for logits in _chunks(model, windows, cfg.batch_size, device, cfg.logit_chunk_mb):
            chunk = coarse_kl(records.read(file, logits.shape[0], logits.device), logits)
            kls.append(chunk.kl.cpu())
            agree += int(chunk.agrees.sum())
            tail += float(chunk.tail_mass.double().sum())
            positions += logits.shape[0]
    if positions != records.positions:
        raise RuntimeError(f"compared {positions} positions with a baseline of {records.positions}")
    values = torch.cat(kls).double().numpy()
    return Divergence(float(values.mean()), float(np.percentile(values, PERCENTILE)), agree / positions,
                      tail / positions, positions)


# ---------------------------------------------------------------------------------------------------
# The evaluator


def evaluate_kl_divergence(handle: ModelHandle, cfg: KLDivergenceConfig, run: RunContext) -> list[EvalResult]:
    """The first call in a run (the baseline) records the baseline; the second (the compressed model) compares.

    kl_divergence is never taken from the baseline cache (it declares no cache inputs): the baseline's records live
    only as long as the run.
    """
    token_ids = run.cache.token_ids((cfg.dataset, cfg.data_dir), handle.tokenizer)
    windows = contiguous_windows(token_ids, cfg.seq_len)
    if cfg.max_windows is not None:
        windows = windows[: cfg.max_windows]
    if windows.shape[0] == 0:
        raise UserError(f"{cfg.dataset}: fewer than seq_len={cfg.seq_len} tokens; kl_divergence needs one window")
    key = f"kl_divergence:{cfg.model_dump_json()}:{run.cache.text_digest((cfg.dataset, cfg.data_dir))}"
    label = dataset_label(cfg.dataset)
    details: dict[str, Any] = {**PROTOCOL, "seq_len": cfg.seq_len, "top_k": cfg.top_k, "dataset": cfg.dataset,
                               "windows": windows.shape[0], "positions": windows.shape[0] * (cfg.seq_len - 1)}
    records = run.cache.evaluator_state.pop(key, None)
    with model_on_device(handle, handle.device):
        if records is None:
            run.cache.evaluator_state[key] = record_baseline(handle.model, windows, cfg, handle.device)
            return _results(label, details, Divergence(0.0, 0.0, 1.0, math.nan, int(details["positions"])))
        try:
            found = compare_to_baseline(handle.model, windows, cfg, handle.device, records)
        finally:
            records.remove()
    return _results(label, {**details, "baseline_tail_mass": round(found.baseline_tail_mass, 6)}, found)


def _results(label: str, details: dict[str, Any], found: Divergence) -> list[EvalResult]:
    return [EvalResult("kl_divergence", label, found.mean_kl, details),
            EvalResult("kl_divergence_p99", label, found.p99_kl, details),
            EvalResult("top1_agreement", label, found.top1_agreement, details)]
