"""What the model now says: greedy continuations of a few prompts, before and after the passes.

The baseline continuations are generated before any pass changes the model, and only their token ids are kept,
so no second copy of the model is ever held. After the passes, the compressed model continues the same prompts
greedily, and is also fed each prompt with the *baseline* continuation (teacher forcing) to measure, per position,
whether its top-1 next token is still the baseline's:

    agreement[i] = argmax p_compressed(x_{i} | prompt, baseline[:i]) == baseline[i]

Each new token is one forward over the prompt and the tokens so far (no KV cache, so every architecture and every
way the engine places a model, a lazy one read layer by layer included, works the same); a few prompts of a few
dozen tokens keep this to seconds on a GPU. A lazy run reads its layers once per generated token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from compress.engine.layer_sweep import model_on_device
from compress.engine.model_io import ModelHandle
from compress.engine.vocab_head import next_token_scorer

DEFAULT_PROMPTS = 3
PROMPT_CHARS = 200  # a default prompt is cut at a word boundary below this
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def default_prompts(text: str, count: int = DEFAULT_PROMPTS) -> list[str]:
    """The first `count` sentences of `text` (each up to PROMPT_CHARS, cut at a space), skipping blank ones."""
    prompts = []
    for sentence in _SENTENCE_END.split(" ".join(text[: count * PROMPT_CHARS * 4].split())):
        sentence = sentence.strip()
        if len(sentence) > PROMPT_CHARS:
            sentence = sentence[:PROMPT_CHARS].rsplit(" ", 1)[0]
        if sentence:
            prompts.append(sentence)
        if len(prompts) == count:
            break
    return prompts


@dataclass(frozen=True)
class Continuation:
    prompt: str
    prompt_ids: list[int]
    tokens: list[int]  # the greedy continuation, new tokens only


@torch.no_grad()
def greedy_continuations(handle: ModelHandle, prompts: list[str], new_tokens: int) -> list[Continuation]:
    """Each prompt continued by `new_tokens` argmax tokens (stops early at the tokenizer's end-of-sequence)."""
    found = []
    with model_on_device(handle, handle.device):
        head, body = next_token_scorer(handle.model)
        for prompt in prompts:
            ids = _prompt_ids(handle, prompt)
            tokens: list[int] = []
            for _ in range(new_tokens):
                batch = torch.tensor([ids + tokens], device=handle.device)  # (1, length)
                token = int(head(body(batch)[0, -1:]).argmax(-1).item())
                tokens.append(token)
                if token == handle.tokenizer.eos_token_id:
                    break
            found.append(Continuation(prompt, ids, tokens))
    return found


@torch.no_grad()
def top1_agreement(handle: ModelHandle, baseline: list[Continuation]) -> list[list[bool]]:
    """Per prompt and position, whether the model's top-1 next token after the prompt and baseline[:i] is baseline[i]."""
    agreement = []
    with model_on_device(handle, handle.device):
        head, body = next_token_scorer(handle.model)
        for item in baseline:
            if not item.tokens:
                agreement.append([])
                continue
            batch = torch.tensor([item.prompt_ids + item.tokens], device=handle.device)
            start = len(item.prompt_ids) - 1  # the hidden state that predicts the first new token
            hidden = body(batch)[0, start : start + len(item.tokens)]  # (new tokens, hidden)
            predicted = head(hidden).argmax(-1).tolist()
            agreement.append([p == t for p, t in zip(predicted, item.tokens)])
    return agreement


def _prompt_ids(handle: ModelHandle, prompt: str) -> list[int]:
    ids = handle.tokenizer(prompt, add_special_tokens=True).input_ids
    return [int(i) for i in ids]


def _first_difference(before: list[int], after: list[int]) -> int | None:
    """The first position where the two continuations differ (None when they are the same)."""
    for position, (a, b) in enumerate(zip(before, after)):
        if a != b:
            return position
    return None if len(before) == len(after) else min(len(before), len(after))


def continuation_report(handle: ModelHandle, baseline: list[Continuation], compressed: list[Continuation],
                        agreement: list[list[bool]], source: str, new_tokens: int) -> dict[str, Any]:
    """report.json `continuations`: per prompt, both continuations as text and as token pieces, and the agreement."""
    decode = handle.tokenizer.decode

    def side(item: Continuation) -> dict[str, Any]:
        return {"text": decode(item.tokens), "tokens": item.tokens, "pieces": [decode([t]) for t in item.tokens]}

    prompts = []
    for before, after, agrees in zip(baseline, compressed, agreement):
        prompts.append({"prompt": before.prompt, "baseline": side(before), "compressed": side(after),
                        "top1_agreement": agrees,
                        "agreement": round(sum(agrees) / len(agrees), 4) if agrees else None,
                        "first_difference": _first_difference(before.tokens, after.tokens)})
    scored = [a for item in agreement for a in item]
    return {"source": source, "new_tokens": new_tokens, "decoding": "greedy (argmax), no KV cache",
            "agreement": round(sum(scored) / len(scored), 4) if scored else None, "prompts": prompts}
