"""What every command shares: consoles, error-to-exit-code mapping and output modes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any, Iterator, Mapping

import typer
from rich.console import Console
from rich.markup import escape

from compress.recipe.errors import ExitCode, RecipeError, UserError

if TYPE_CHECKING:
    from compress.recipe.schema import Recipe

OFF_TERMINAL_WIDTH = 4096
"""Columns rich lays out for when its stream is no terminal and COLUMNS is unset: a log or a pipe has no width, and
rich's fallback of 80 cut every module name to `model.laye…`. Tables are as wide as their content, not this."""


def console_width(stream: IO[str], environ: Mapping[str, str]) -> int | None:
    """The width to give rich for `stream`: None (rich measures the terminal, or reads COLUMNS) on a terminal or
    when COLUMNS is set; OFF_TERMINAL_WIDTH otherwise, so nothing is truncated or wrapped."""
    if environ.get("COLUMNS", "").strip().isdigit() or stream.isatty():
        return None
    return OFF_TERMINAL_WIDTH


err_console = Console(stderr=True, width=console_width(sys.stderr, os.environ))


def register_builtins() -> None:
    """Register the built-in passes and evaluators, on first use: `compress --help` must not pay for torch."""
    import compress.app.builtins  # noqa: F401


def load_recipe(*args: Any, **kwargs: Any) -> "Recipe":
    """`compress.recipe.schema.load_recipe` with the built-ins registered, so their names and configs validate."""
    register_builtins()
    from compress.recipe.schema import load_recipe as load

    return load(*args, **kwargs)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) that a command has put into words: what was kept and how to continue."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A batch scheduler's SIGTERM (preemption, time limit, `kill`) stops the command the way Ctrl-C does: the same
    KeyboardInterrupt unwinds it, so what it keeps on an interrupt is kept, and it exits 130 with a message (the
    default action would end the process at once with 143 and say nothing)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Failure:
    """How a command failed, as it is printed on stderr and, with --json, on stdout."""

    exit_code: ExitCode
    kind: str  # "user_error", "recipe_error", "internal_error" or "interrupted"
    message: str
    file: str | None = None  # the file the problem is in, when one is known (a recipe)
    line: int | None = None  # its first problem's 1-based line
    issues: list[dict[str, Any]] = field(default_factory=list)  # every located problem of a recipe

    def to_json(self) -> dict[str, Any]:
        error = asdict(self)
        code = error.pop("exit_code")
        return {"ok": False, "exit_code": int(code), "error": error}


NOT_WRITTEN = "interrupted: no output was written"


def failure_of(exc: BaseException, on_interrupt: str = NOT_WRITTEN) -> Failure:
    """The exit code and description of what ended a command; anything not the user's doing is our bug (exit 1).
    `on_interrupt` says what an interrupt leaves behind, unless the command raised `Interrupted` with its own words."""
    if isinstance(exc, RecipeError):
        issues = [{"path": i.path, "line": i.line, "message": i.message} for i in exc.issues]
        first_line = next((i.line for i in exc.issues if i.line is not None), None)
        return Failure(ExitCode.USER_ERROR, "recipe_error", str(exc), exc.filename, first_line, issues)
    if isinstance(exc, UserError):
        return Failure(ExitCode.USER_ERROR, "user_error", str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return Failure(ExitCode.INTERRUPTED, "interrupted", exc.message if isinstance(exc, Interrupted) else on_interrupt)
    return Failure(ExitCode.INTERNAL_ERROR, "internal_error", f"{type(exc).__name__}: {exc}")


def print_failure(failure: Failure, as_json: bool) -> None:
    """The human message on stderr; with --json also the error object on stdout, so a script reading stdout never
    gets an empty string."""
    if failure.kind == "interrupted":
        # soft_wrap: a log file is no terminal, and a command cut across lines cannot be pasted back
        err_console.print(failure.message, highlight=False, markup=False, soft_wrap=True)
    elif failure.kind == "internal_error":
        err_console.print(f"[bold red]internal error:[/] {escape(failure.message)}\n"
                          "Run again with --verbose for the traceback, and please report it.", highlight=False)
    else:
        err_console.print(f"[bold red]error:[/] {escape(failure.message)}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(failure.to_json(), indent=2))


@contextlib.contextmanager
def exit_codes(verbose: bool = False, as_json: bool = False, on_interrupt: str = NOT_WRITTEN) -> Iterator[None]:
    """Map failures to distinct exit codes: 2 user error, 1 internal error, 130 interrupted. The message goes to
    stderr; with `as_json` (the command's --json) the error object goes to stdout too (see `Failure.to_json`)."""
    try:
        yield
    except typer.Exit:
        raise
    except (UserError, KeyboardInterrupt) as exc:
        failure = failure_of(exc, on_interrupt)
        print_failure(failure, as_json)
        raise typer.Exit(failure.exit_code) from None
    except Exception as exc:  # anything else is our bug, not the user's
        if verbose:
            err_console.print(traceback.format_exc(), markup=False, highlight=False)
        print_failure(failure_of(exc), as_json)
        raise typer.Exit(ExitCode.INTERNAL_ERROR) from None
