"""Error types and the exit codes the CLI maps them to.

A `UserError` is something the person running the tool can fix (bad recipe, missing file,
offline hub access); everything else is an internal failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL_ERROR = 1
    USER_ERROR = 2
    INTERRUPTED = 130


class UserError(Exception):
    """A problem with the input that the user can fix; the message says how."""


@dataclass(frozen=True)
class RecipeIssue:
    """One validation problem, located in the recipe file."""

    path: str  # YAML path such as "passes[1].gptq.group_size"
    message: str
    line: int | None = None  # 1-based line in the recipe file; None when the value came from --set

    def render(self, filename: str) -> str:
        where = f"{filename}:{self.line}" if self.line is not None else f"{filename} (--set)"
        return _one_line(f"{where} {self.path or '<root>'}: {self.message}")


def _one_line(text: str) -> str:
    """Keys and values from a recipe may hold line breaks, terminal escapes or lone surrogates: each problem stays on
    one printable line of the message (such characters are written as Python escapes)."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


MAX_LISTED = 20


class RecipeError(UserError):
    """All problems found in one recipe (or sweep file: `kind`), reported together."""

    def __init__(self, filename: str, issues: list[RecipeIssue], *, kind: str = "recipe"):
        self.filename = filename
        self.issues = issues
        lines = [issue.render(filename) for issue in issues[:MAX_LISTED]]
        if len(issues) > MAX_LISTED:  # one screenful; the first problems usually explain the rest
            lines.append(f"... and {len(issues) - MAX_LISTED} more")
        noun = "problem" if len(issues) == 1 else "problems"
        super().__init__(f"{len(issues)} {noun} in {kind}:\n  " + "\n  ".join(lines))
