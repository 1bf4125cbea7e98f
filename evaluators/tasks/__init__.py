"""Zero-shot tasks with lm-evaluation-harness semantics: one module per task format.

Every task module turns its source (a local file in the `../shared/data` layout, or the hub data set lm-eval
uses) into *native documents*: dicts with the field names of the hub data set (`goal/sol1/sol2/label` for
PIQA, ...). Its `to_doc` then applies lm-eval's template for that task (doc_to_text, doc_to_choice,
target_delimiter " ", zero-shot) and returns a `Doc`: the (context, continuation) pairs to score. Keeping the
native schema in between means the local and hub paths share one template, and the parity test can hand the
very same documents to lm-eval itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from compress.recipe.errors import UserError

TaskOutput = Literal["multiple_choice", "last_word"]


@dataclass(frozen=True)
class Doc:
    """One scored document.

    `requests` holds one (context, continuation) pair per choice, exactly the strings lm-eval scores;
    `norm_texts` are the strings whose length divides the log-likelihood for acc_norm (lm-eval's
    doc_to_choice output: the choice texts, or for WinoGrande the filled-in contexts).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_texts: tuple[str, ...]


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str | None
    split: str


@dataclass(frozen=True)
class TaskDef:
    """A task: where its documents come from and how lm-eval turns one into requests."""

    name: str
    output: TaskOutput
    version: str  # lm-eval's `metadata: version` of the task whose semantics we reproduce
    template: str  # the prompt in words, for the report
    local_file: str  # relative to a data folder laid out like ../shared/data
    read_local: Callable[[Path], list[dict[str, Any]]]
    hub: HubSource | None
    to_doc: Callable[[dict[str, Any]], Doc]
    process_hub: Callable[[dict[str, Any]], dict[str, Any]] = lambda row: dict(row)


def multiple_choice(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Doc:
    """lm-eval's multiple_choice request layout: the shared context, then delimiter + each choice."""
    return Doc(tuple((context, delimiter + choice) for choice in choices), gold, tuple(choices))


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a task file; malformed lines name the file and line."""
    from compress.engine import data  # it imports torch (tokenizing), and task names validate without torch

    return data.jsonl_records(path, what="task file")


def require(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[key], checked to be of `kind`; `where` is 'file:line' for the error."""
    value = record.get(key)
    if key not in record:
        raise UserError(f"{where}: missing field '{key}'")
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{where}: field '{key}' should be {expected}, got {type(value).__name__}")
    return value


def require_strings(record: dict[str, Any], key: str, where: str, count: int | None = None) -> list[str]:
    values = require(record, key, list, where)
    if not values or not all(isinstance(v, str) for v in values):
        raise UserError(f"{where}: field '{key}' should be a non-empty list of strings")
    if count is not None and len(values) != count:
        raise UserError(f"{where}: field '{key}' should have {count} entries, got {len(values)}")
    return values


def require_gold(record: dict[str, Any], key: str, choices: int, where: str) -> int:
    gold = require(record, key, int, where)
    if not 0 <= gold < choices:
        raise UserError(f"{where}: '{key}' is {gold}, but there are only {choices} choices (0-based index)")
    return gold


def registry() -> dict[str, TaskDef]:
    """Built-in tasks by name (explicit imports: the list below is the whole set)."""
    from compress.evaluators.tasks import arc, boolq, hellaswag, lambada, piqa, winogrande

    tasks = [piqa.TASK, arc.ARC_EASY, arc.ARC_CHALLENGE, hellaswag.TASK, winogrande.TASK, boolq.TASK, lambada.TASK]
    return {task.name: task for task in tasks}
