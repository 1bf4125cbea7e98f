"""Your own multiple-choice task as JSONL, no code needed.

One JSON object per line:

    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}

Each choice is scored as the continuation `target_delimiter + choice` (default " ", as lm-eval does) after
`context`; acc and acc_norm (normalised by the choice's length in characters) follow lm-eval.
"""

from __future__ import annotations

from pathlib import Path

from compress.recipe.errors import UserError
from compress.evaluators.tasks import Doc, jsonl_records, multiple_choice, require, require_gold, require_strings


def read_docs(path: Path, target_delimiter: str = " ") -> list[Doc]:
    docs = []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        context = require(record, "context", str, where)
        choices = require_strings(record, "choices", where)
        docs.append(multiple_choice(context, choices, require_gold(record, "gold", len(choices), where), target_delimiter))
    if not docs:
        raise UserError(f"{path}: no documents (expected one JSON object per line)")
    return docs
