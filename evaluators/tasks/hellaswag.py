"""HellaSwag (lm-eval `hellaswag` v1.0), with lm-eval's preprocessing of the WikiHow artifacts.

Query: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()); choices: preprocess(ending).

Local file: llama.cpp's 6-lines-per-item text (`<activity_label>: <ctx>`, gold index, 4 endings), whose
text was already cleaned upstream by a similar rule; lm-eval's preprocessing is applied on top, so the
prompt our scorer and lm-eval see is the same string either way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from compress.recipe.errors import UserError
from compress.evaluators.tasks import Doc, HubSource, TaskDef, multiple_choice

LINES_PER_ITEM = 6


def preprocess(text: str) -> str:
    """lm-eval's hellaswag text cleanup: brackets are artifacts of the WikiHow part of the data set."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % LINES_PER_ITEM:
        raise UserError(f"{path}:{len(lines)}: expected {LINES_PER_ITEM} lines per item, the file has {len(lines)} lines")
    docs = []
    for start in range(0, len(lines), LINES_PER_ITEM):
        header, label, *endings = lines[start : start + LINES_PER_ITEM]
        activity, sep, context = header.partition(": ")
        if not sep:
            raise UserError(f"{path}:{start + 1}: expected '<activity label>: <context>', got {header[:60]!r}")
        if label.strip() not in ("0", "1", "2", "3"):
            raise UserError(f"{path}:{start + 2}: expected the gold ending index 0-3, got {label[:60]!r}")
        docs.append({"activity_label": activity, "ctx_a": context, "ctx_b": "", "endings": endings,
                     "label": label.strip()})
    return docs


def to_doc(doc: dict[str, Any]) -> Doc:
    query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return multiple_choice(query, [preprocess(ending) for ending in doc["endings"]], int(doc["label"]))


TASK = TaskDef(
    name="hellaswag", output="multiple_choice", version="1.0",
    template='preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) + " " + preprocess(ending)',
    local_file="hellaswag/hellaswag_val_full.txt", read_local=read_local,
    hub=HubSource("Rowan/hellaswag", None, "validation"), to_doc=to_doc,
)
