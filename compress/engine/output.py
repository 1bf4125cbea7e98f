"""Run output folders that appear complete or not at all: build in a hidden sibling, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from compress.recipe.errors import UserError


def check_output_target(target: Path, overwrite: bool) -> None:
    """Fail before any work is done if the output folder exists and may not be replaced."""
    if target.exists() and not overwrite:
        raise UserError(f"output folder {target} already exists; choose another --output or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise UserError(f"output path {target} exists and is not a folder")


def preflight_output(target: Path, *, needed_bytes: int = 0) -> None:
    """Before any expensive work: the output's folder can be created and written to, and has room.

    A read-only or full disk would otherwise fail only after hours of compression, when the report is written.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.probe-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write the output folder {target}: {exc.strerror or exc}; "
                        "choose a writable --output") from None
    free = shutil.disk_usage(target.parent).free
    if free < needed_bytes:
        raise UserError(f"not enough disk space for {target}: about {needed_bytes / 2**20:,.0f} MiB needed "
                        f"(checkpoints and report), {free / 2**20:,.0f} MiB free; free some space or choose another --output")


def _remove_abandoned_staging(target: Path) -> None:
    """Staging folders of runs that were SIGKILLed (their process is gone) are garbage; live ones are left alone."""
    for folder in target.parent.glob(f".{target.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` only if the block finishes.

    On any error or Ctrl-C the temporary folder is removed, so a folder named `target` always holds a
    finished run.
    """
    check_output_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        staging.rename(target)
        return
    # Replacing a finished run: move it aside first, so no moment exists where neither run is complete on disk.
    previous = target.parent / f".{target.name}.replaced-{os.getpid()}"
    target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
