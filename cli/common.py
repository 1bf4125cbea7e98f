"""What every command shares: consoles, error-to-exit-code mapping and output modes."""

from __future__ import annotations

import contextlib
import traceback
from typing import TYPE_CHECKING, Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from compress.recipe.errors import ExitCode, UserError

if TYPE_CHECKING:
    from compress.recipe.schema import Recipe

err_console = Console(stderr=True)


def register_builtins() -> None:
    """Register the built-in passes and evaluators, on first use: `compress --help` must not pay for torch."""
    import compress.app.builtins  # noqa: F401


def load_recipe(*args: Any, **kwargs: Any) -> "Recipe":
    """`compress.recipe.schema.load_recipe` with the built-ins registered, so their names and configs validate."""
    register_builtins()
    from compress.recipe.schema import load_recipe as load

    return load(*args, **kwargs)


@contextlib.contextmanager
def exit_codes(verbose: bool = False) -> Iterator[None]:
    """Map failures to distinct exit codes: 2 user error, 1 internal error, 130 interrupted."""
    try:
        yield
    except typer.Exit:
        raise
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(ExitCode.USER_ERROR) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: no output was written")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except Exception as exc:  # anything else is our bug, not the user's
        if verbose:
            err_console.print(traceback.format_exc(), markup=False, highlight=False)
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
            "Run again with --verbose for the traceback, and please report it.",
            highlight=False,
        )
        raise typer.Exit(ExitCode.INTERNAL_ERROR) from None
