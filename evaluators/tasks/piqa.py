"""PIQA (lm-eval `piqa` v1.0): "Question: {goal}\\nAnswer:", choices [sol1, sol2], gold = label.

Local files: the official `valid.jsonl` ({goal, sol1, sol2} per line) with labels aligned by line number in
`valid-labels.lst` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.recipe.errors import UserError
from compress.evaluators.tasks import Doc, HubSource, TaskDef, jsonl_records, multiple_choice, require


def read_local(path: Path) -> list[dict[str, Any]]:
    labels_path = path.with_name(path.stem + "-labels.lst")
    if not labels_path.is_file():
        raise UserError(f"{path}: PIQA labels file not found: {labels_path} (one 0/1 per line, aligned with {path.name})")
    labels = labels_path.read_text(encoding="utf-8").split()
    docs = []
    for index, (number, record) in enumerate(jsonl_records(path)):
        where = f"{path}:{number}"
        if index >= len(labels):
            raise UserError(f"{labels_path}: has {len(labels)} labels, fewer than the documents in {path.name}")
        if labels[index] not in ("0", "1"):
            raise UserError(f"{labels_path}:{index + 1}: expected 0 or 1, got {labels[index]!r}")
        docs.append({key: require(record, key, str, where) for key in ("goal", "sol1", "sol2")}
                    | {"label": int(labels[index])})
    return docs


def to_doc(doc: dict[str, Any]) -> Doc:
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


TASK = TaskDef(
    name="piqa", output="multiple_choice", version="1.0",
    template='"Question: {goal}\\nAnswer:" + " " + sol1|sol2',
    local_file="piqa/valid.jsonl", read_local=read_local,
    hub=HubSource("baber/piqa", None, "validation"), to_doc=to_doc,
)
