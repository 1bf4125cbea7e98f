"""WinoGrande (lm-eval `winogrande` v1.0), partial scoring.

Each option fills the blank: the contexts are sentence[:blank] + option, and the one continuation scored
in both is " " + the rest of the sentence after the blank (stripped). acc_norm divides by the length of the
filled-in context, as lm-eval does for this "multiple input" task.

Local file: MosaicML's `{context_options: [2], continuation, gold}` per line; it is turned back into the
hub's `{sentence, option1, option2, answer}` with the blank after the options' common prefix, which gives
back exactly the same contexts and continuation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compress.evaluators.tasks import Doc, HubSource, TaskDef, jsonl_records, require, require_gold, require_strings


def read_local(path: Path) -> list[dict[str, Any]]:
    docs = []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        options = require_strings(record, "context_options", where, count=2)
        continuation = require(record, "continuation", str, where)
        gold = require_gold(record, "gold", 2, where)
        prefix = os.path.commonprefix(options)
        docs.append({"sentence": f"{prefix}_ {continuation}", "option1": options[0][len(prefix):],
                     "option2": options[1][len(prefix):], "answer": str(gold + 1)})
    return docs


def to_doc(doc: dict[str, Any]) -> Doc:
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + doc[option] for option in ("option1", "option2")]
    continuation = " " + doc["sentence"][blank + 1 :].strip()
    return Doc(tuple((context, continuation) for context in contexts), {"1": 0, "2": 1}[doc["answer"]], tuple(contexts))


TASK = TaskDef(
    name="winogrande", output="multiple_choice", version="1.0",
    template='sentence[:blank] + option1|option2, scoring " " + sentence[blank+1:].strip()',
    local_file="winogrande/winogrande.jsonl", read_local=read_local,
    hub=HubSource("allenai/winogrande", "winogrande_xl", "validation"), to_doc=to_doc,
)
