"""What the model now says: greedy continuations of a few prompts, before and after the passes.

The baseline continuations are generated before any pass changes the model, and only their token ids are kept,
so no second copy of the model is ever held. After the passes, the compressed model continues the same prompts
greedily, and is also fed each prompt with the *baseline* continuation (teacher forcing) to measure, per position,
whether its top-1 next token is still the baseline's:

    agreement[i] = argmax p_compressed(x_{i} | prompt, baseline[:i]) == baseline[i]

All prompts share one batch, and each new token is one forward over the prompts and the tokens so far (no KV
cache, so every architecture and every way the engine places a model, a lazy one read layer by layer included,
works the same): `new_tokens` forwards before the passes and `new_tokens + 1` after. A lazy run reads its layers
once per forward.
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
MIN_WORDS = 5
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def default_prompts(text: str, count: int = DEFAULT_PROMPTS) -> list[str]:
    """The first `count` sentences of `text` that read as prose: at least MIN_WORDS words, mostly letters (so a
    markup line such as `.. highlight:: c` or a `=====` rule is skipped), each cut at a space below PROMPT_CHARS."""
    prompts = []
    for paragraph in re.split(r"\n\s*\n", text[: count * PROMPT_CHARS * 20]):
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            if len(sentence) > PROMPT_CHARS:
                sentence = sentence[:PROMPT_CHARS].rsplit(" ", 1)[0]
            if _reads_as_prose(sentence):
                prompts.append(sentence)
            if len(prompts) == count:
                return prompts
    return prompts


def _reads_as_prose(sentence: str) -> bool:
    letters = sum(ch.isalpha() or ch.isspace() for ch in sentence)
    return len(sentence.split()) >= MIN_WORDS and letters >= 0.8 * len(sentence)


@dataclass(frozen=True)
class Continuation:
    prompt: str
    prompt_ids: list[int]
    tokens: list[int]  # the greedy continuation, new tokens only


def _right_padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """(prompts, longest) ids, each row padded on the right. In a causal model a token after position i never
    changes what position i predicts, so the padding needs no attention mask and shifts no position ids."""
    longest = max(len(row) for row in rows)
    return torch.tensor([row + [0] * (longest - len(row)) for row in rows], device=device)


def _next_tokens(handle: ModelHandle, rows: list[list[int]], at: list[list[int]]) -> list[list[int]]:
    """For each row, the argmax next token after each position in `at[row]`, from one batched forward."""
    head, body = next_token_scorer(handle.model)
    hidden = body(_right_padded(rows, handle.device))  # (prompts, longest, hidden)
    picked = [hidden[r, positions] for r, positions in enumerate(at)]  # (positions, hidden) each
    return [head(rows_hidden).argmax(-1).tolist() for rows_hidden in picked]


@torch.no_grad()
def greedy_continuations(handle: ModelHandle, prompts: list[str], new_tokens: int) -> list[Continuation]:
    """Each prompt continued by `new_tokens` argmax tokens, cut after the tokenizer's end-of-sequence token.

    All prompts go in one batch, so this costs `new_tokens` forwards whatever the number of prompts.
    """
    ids = [_prompt_ids(handle, prompt) for prompt in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    with model_on_device(handle, handle.device):
        for _ in range(new_tokens):
            rows = [prompt + said for prompt, said in zip(ids, tokens)]
            for said, (token,) in zip(tokens, _next_tokens(handle, rows, [[len(row) - 1] for row in rows])):
                said.append(token)
    return [Continuation(prompt, prompt_ids, _until_end(said, _tokenizer(handle).eos_token_id))
            for prompt, prompt_ids, said in zip(prompts, ids, tokens)]


def _until_end(tokens: list[int], eos: int | None) -> list[int]:
    # greedy tokens never depend on later ones, so cutting afterwards is the same as stopping there
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


@torch.no_grad()
def top1_agreement(handle: ModelHandle, baseline: list[Continuation]) -> list[list[bool]]:
    """Per prompt and position, whether the model's top-1 next token after the prompt and baseline[:i] is baseline[i].

    One batched forward over every prompt followed by its baseline continuation (teacher forcing).
    """
    rows = [item.prompt_ids + item.tokens for item in baseline]
    # the hidden state at position len(prompt) - 1 + i predicts baseline token i
    at = [list(range(len(item.prompt_ids) - 1, len(item.prompt_ids) - 1 + len(item.tokens))) for item in baseline]
    with model_on_device(handle, handle.device):
        predicted = _next_tokens(handle, rows, at)
    return [[p == t for p, t in zip(guesses, item.tokens)] for guesses, item in zip(predicted, baseline)]


def _tokenizer(handle: ModelHandle) -> Any:
    return handle.tokenizer  # a transformers tokenizer; the handle types it as a bare object


def _prompt_ids(handle: ModelHandle, prompt: str) -> list[int]:
    ids = _tokenizer(handle)(prompt, add_special_tokens=True).input_ids
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
    decode = _tokenizer(handle).decode

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
