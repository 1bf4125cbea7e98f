"""BoolQ (lm-eval `boolq` v2.0): "{passage}\\nQuestion: {question}?\\nAnswer:", choices " no" / " yes".

Local file: MosaicML's `{query: "Passage: <passage>\\nQuestion: <question>?", choices: ["no","yes"], gold}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.recipe.errors import UserError
from compress.evaluators.tasks import Doc, HubSource, TaskDef, jsonl_records, multiple_choice, require, require_gold

PASSAGE, QUESTION = "Passage: ", "\nQuestion: "


def read_local(path: Path) -> list[dict[str, Any]]:
    docs = []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        query = require(record, "query", str, where)
        passage, sep, question = query.rpartition(QUESTION)
        if not (query.startswith(PASSAGE) and sep and question.endswith("?")):
            raise UserError(f"{where}: 'query' should look like 'Passage: ...\\nQuestion: ...?'")
        docs.append({"passage": passage[len(PASSAGE):], "question": question[:-1],
                     "label": require_gold(record, "gold", 2, where)})
    return docs


def to_doc(doc: dict[str, Any]) -> Doc:
    return multiple_choice(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["label"]))


TASK = TaskDef(
    name="boolq", output="multiple_choice", version="2.0",
    template='"{passage}\\nQuestion: {question}?\\nAnswer:" + " " + no|yes',
    local_file="boolq/boolq.jsonl", read_local=read_local,
    hub=HubSource("aps/super_glue", "boolq", "validation"), to_doc=to_doc,
)
