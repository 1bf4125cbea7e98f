"""ARC-Easy / ARC-Challenge (lm-eval `arc_easy`, `arc_challenge` v1.0): "Question: {question}\\nAnswer:",
the choice texts as continuations, test split.

Local files: MosaicML's `{query: "Question: ...", choices: [...], gold: i}` per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.recipe.errors import UserError
from compress.evaluators.tasks import Doc, HubSource, TaskDef, jsonl_records, multiple_choice, require, require_gold, require_strings

PREFIX = "Question: "


def read_local(path: Path) -> list[dict[str, Any]]:
    docs = []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        query = require(record, "query", str, where)
        if not query.startswith(PREFIX):
            raise UserError(f"{where}: 'query' should start with {PREFIX!r}")
        choices = require_strings(record, "choices", where)
        gold = require_gold(record, "gold", len(choices), where)
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        docs.append({"question": query[len(PREFIX):], "choices": {"text": choices, "label": labels},
                     "answerKey": labels[gold]})
    return docs


def to_doc(doc: dict[str, Any]) -> Doc:
    choices = doc["choices"]
    return multiple_choice(f"Question: {doc['question']}\nAnswer:", list(choices["text"]),
                           list(choices["label"]).index(doc["answerKey"]))


def _task(name: str, subset: str) -> TaskDef:
    return TaskDef(
        name=name, output="multiple_choice", version="1.0",
        template='"Question: {question}\\nAnswer:" + " " + choice',
        local_file=f"{name}/{name}.jsonl", read_local=read_local,
        hub=HubSource("allenai/ai2_arc", subset, "test"), to_doc=to_doc,
    )


ARC_EASY = _task("arc_easy", "ARC-Easy")
ARC_CHALLENGE = _task("arc_challenge", "ARC-Challenge")
