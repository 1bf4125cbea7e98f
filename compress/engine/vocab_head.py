"""Next-token log-probabilities at a real vocabulary without a (batch, T, vocab) table.

A causal LM's forward ends in its output head: final hidden states (B, T, hidden) -> logits (B, T, vocab). At
Llama 3's 128,256-token vocabulary one position's float32 logits are 0.5 MiB, so a batch of 32 windows of 512
tokens is 8 GiB before any log_softmax copy. The evaluators need a few numbers per scored position (the target
token's log-probability, whether it is the argmax), so here the model runs its body with the head cut down to the
last position (`final_hidden`), and the head is applied to just the positions that are scored, a bounded number of
rows at a time (`target_scores`), each chunk reduced by logsumexp + gather before the next is computed.

Exactness: the head is the model's own output-embedding module followed by the elementwise transform its family
applies in `forward` (Gemma 2/3 final-logit soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`).
Every call checks that transform against the model itself: the last position's logits, which the model still
computes, must equal ours, so a family with a transform not listed here is refused by name, never scored wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from compress.recipe.errors import UserError

# The default `logit_chunk_mb` of the evaluators (compress/engine/settings.py, importable without torch): float32
# logits alive at once (the logsumexp's temporaries take one to three times as much again while it runs). 256 MiB is
# 523 positions at a 128,256-token vocabulary, 16,384 at 4,096.
from compress.engine.settings import DEFAULT_LOGIT_CHUNK_MB, MAX_LOGIT_CHUNK_MB  # noqa: E402,F401


def rows_per_chunk(vocab_size: int, chunk_mb: int) -> int:
    """How many positions' float32 logits fit in `chunk_mb` MiB (at least one)."""
    return max(1, chunk_mb * 2**20 // (4 * vocab_size))


@dataclass(frozen=True)
class OutputHead:
    """The model's output head as `forward` applies it: the output-embedding module, then an elementwise transform."""

    module: nn.Module
    softcap: float | None = None  # Gemma 2/3: cap * tanh(logits / cap)
    multiply: float | None = None  # Cohere: logits * logit_scale
    divide: float | None = None  # Granite: logits / logits_scaling

    def vocab_size(self) -> int:
        """Logits per position: the rows of the head's (vocab, hidden) weight."""
        return int(cast(torch.Tensor, self.module.weight).shape[0])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        # Same operations in the same order as the families' own forward, so the self-check can be tight.
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        return logits


def output_head(model: nn.Module) -> OutputHead:
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UserError(f"{_model_type(model)}: the model has no output-embedding module with a (vocab, hidden) "
                        "weight to score tokens with")
    configs = [getattr(model, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    def setting(name: str) -> float | None:
        values = [getattr(c, name, None) for c in configs if c is not None]
        return next((float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    return OutputHead(module, setting("final_logit_softcapping"), setting("logit_scale"), setting("logits_scaling"))


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def final_hidden(model: nn.Module, head: OutputHead, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states the head reads, (B, T, hidden), from one forward whose head computes only the last position.

    Raises UserError when the model's last-position logits differ from `head` applied to the same hidden state (an
    output transform we do not reproduce).
    """
    captured: list[torch.Tensor] = []

    def keep_last_position(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0][..., -1:, :], *args[1:])

    hook = head.module.register_forward_pre_hook(keep_last_position)
    try:
        model_logits = model(input_ids, use_cache=False).logits  # (B, 1, vocab)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise UserError(f"{_model_type(model)}: the output head ran {len(captured)} times in one forward; "
                        "vocabulary-chunked scoring needs it to run once")
    hidden = captured[0]
    _check_head(model, head, hidden[..., -1:, :], model_logits)
    return hidden


def _check_head(model: nn.Module, head: OutputHead, last_hidden: torch.Tensor, model_logits: torch.Tensor) -> None:
    with torch.no_grad():
        ours = head(last_hidden).float()
        theirs = model_logits.float().to(ours.device)  # a dispatched model's head may sit on another device
        tolerance = 1e-3 * (1.0 + float(theirs.abs().max())) if theirs.numel() else 0.0
        if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > tolerance:
            raise UserError(
                f"{_model_type(model)}: this model's forward transforms the output head's logits in a way the "
                "evaluators do not reproduce (known: final_logit_softcapping, logit_scale, logits_scaling); "
                "its log-probabilities cannot be scored in vocabulary chunks")


@dataclass(frozen=True)
class TargetScores:
    logprobs: torch.Tensor  # (P,) float32: log P(target | position)
    is_argmax: torch.Tensor  # (P,) bool: the target is the position's most likely token


def target_scores(head: OutputHead, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, *,
                  chunk_rows: int) -> TargetScores:
    """Log-probability and argmax flag (on the CPU) of `targets[p]` at hidden row `rows[p]`, for hidden (R, hidden).

    The head runs on `chunk_rows` rows at a time; each chunk's (n, vocab) logits are reduced to one logsumexp, one
    argmax and the picked logits per row before the next chunk exists. No gradient (see `target_nll` for that).
    """
    logprobs = torch.empty(rows.shape[0], dtype=torch.float32)
    is_argmax = torch.empty(rows.shape[0], dtype=torch.bool)
    rows, targets = rows.cpu(), targets.cpu()
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = head(hidden[start : start + chunk_rows]).float()  # (n, vocab), on the head's device
            in_chunk = (rows >= start) & (rows < start + logits.shape[0])
            local, wanted = (rows[in_chunk] - start).to(logits.device), targets[in_chunk].to(logits.device)
            logprobs[in_chunk] = (logits[local, wanted] - torch.logsumexp(logits, dim=-1)[local]).cpu()
            is_argmax[in_chunk] = (logits.argmax(dim=-1)[local] == wanted).cpu()
            del logits
    return TargetScores(logprobs, is_argmax)


def target_nll(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, *, chunk_rows: int) -> torch.Tensor:
    """Summed -log P(targets[i] | hidden[i]) over hidden (N, hidden) rows, differentiable w.r.t. `hidden`.

    Each chunk runs under activation checkpointing, so backward recomputes its (n, vocab) logits instead of every
    chunk's logits staying alive until backward: one chunk's logits exist at a time, in forward and in backward.
    """
    def chunk_nll(rows: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        logits = head(rows).float()  # (n, vocab)
        wanted = wanted.to(logits.device)
        return (torch.logsumexp(logits, dim=-1) - logits.gather(1, wanted[:, None])[:, 0]).sum()

    # One chunk gains nothing from checkpointing (its logits are the peak either way) and would pay the recompute.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk_rows
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows, wanted = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if recompute:
            total = total + cast(torch.Tensor, checkpoint(chunk_nll, rows, wanted, use_reentrant=False)).cpu()
        else:
            total = total + chunk_nll(rows, wanted).cpu()
    return total


def next_token_scorer(model: nn.Module) -> tuple[OutputHead, Callable[[torch.Tensor], torch.Tensor]]:
    """(the head, ids -> final hidden states) for a model: the pair every chunked scorer needs."""
    head = output_head(model)
    return head, lambda input_ids: final_hidden(model, head, input_ids)
