"""Run output folders that appear complete or not at all: build in a hidden sibling, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from compress.errors import UserError


def check_output_target(target: Path, overwrite: bool) -> None:
    """Fail before any work is done if the output folder exists and may not be replaced."""
    if target.exists() and not overwrite:
        raise UserError(f"output folder {target} already exists; choose another --output or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise UserError(f"output path {target} exists and is not a folder")


@contextlib.contextmanager
def atomic_output(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` only if the block finishes.

    On any error or Ctrl-C the temporary folder is removed, so a folder named `target` always holds a
    finished run.
    """
    check_output_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
