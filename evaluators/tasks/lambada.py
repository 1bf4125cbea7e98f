"""LAMBADA, OpenAI variant (lm-eval `lambada_openai` v1.0): the passage without its last word as context,
" " + the last word as continuation; acc = the greedy prediction reproduces the word, and perplexity =
exp(-mean log-likelihood of the word) over documents.

Local file: MosaicML's `{context, continuation}` per line, where the passage is context + " " + continuation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.evaluators.tasks import Doc, HubSource, TaskDef, jsonl_records, require


def read_local(path: Path) -> list[dict[str, Any]]:
    docs = []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        docs.append({"text": require(record, "context", str, where) + " " + require(record, "continuation", str, where)})
    return docs


def to_doc(doc: dict[str, Any]) -> Doc:
    words = doc["text"].split(" ")
    return Doc(((" ".join(words[:-1]), " " + words[-1]),), 0, (words[-1],))


TASK = TaskDef(
    name="lambada_openai", output="last_word", version="1.0",
    template='" ".join(words[:-1]) + " " + words[-1]',
    local_file="lambada_openai/lambada_openai.jsonl", read_local=read_local,
    hub=HubSource("EleutherAI/lambada_openai", "default", "test"), to_doc=to_doc,
)
