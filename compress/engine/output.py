"""Output folders: claimed by one run at a time, built in a hidden sibling and renamed, never at an input's cost.

Three promises, one function each:
- `replace_refusal`: an existing folder is replaced only if it is an earlier output of this tool (it holds the
  `MARKER` file, or a run's report.json) or empty, and never if it is, or holds, an input of the run.
- `hold_output`: a lock beside the folder (`out/.run.lock`, filelock's flock-based lock, which the kernel releases
  when its holder dies, SIGKILL included) so two runs cannot write, replace or resume the same output at once.
- `atomic_output`: the folder appears complete or not at all.
A full or read-only disk is told apart from a bug by `disk_problem`, so it is a user error (exit 2), not exit 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from filelock import FileLock, Timeout

from compress.recipe.errors import UserError

MARKER = ".compress"  # written into every run and export folder this tool builds: what `--overwrite` may replace
LEGACY_REPORTS = ("report.json", "compress_report.json")  # runs and exports from before the marker existed


# -- what may be replaced ------------------------------------------------------------------------------


def is_earlier_output(folder: Path) -> bool:
    """Whether `folder` is a run or export folder that this tool wrote (so `--overwrite` may replace it)."""
    if (folder / MARKER).is_file():
        return True
    for name in LEGACY_REPORTS:
        try:
            report = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and "schema_version" in report and "recipe" in report:
            return True
    return False


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _holds(folder: Path, path: Path) -> bool:
    """`path` is `folder` or lies inside it (after resolving links: a link to the model folder is the model)."""
    return folder == path or folder in path.parents


def replace_refusal(target: Path, *, overwrite: bool, inputs: Iterable[Path] = (), label: str = "--output") -> str | None:
    """Why `target` may not be written (or replaced) as a new output folder; None when it may.

    `inputs` are the files and folders the run reads (model, calibration and evaluation data, offload_dir, the run
    being exported): a target that is one of them, or holds one, is refused whatever the flags, because replacing
    it would delete it. Writing *into* an input folder (`--output model/run1`) deletes nothing and is allowed.
    """
    if not target.exists() and not target.is_symlink():
        return None
    if not target.is_dir():
        return f"{label} {target} exists and is not a folder; choose another {label}"
    where = _resolved(target)
    for item in inputs:
        if item.exists() and _holds(where, _resolved(item)):
            what = "is" if _resolved(item) == where else "holds"
            return (f"{label} {target} {what} an input of this run ({item}); replacing it would delete it. "
                    f"Choose another {label}")
    earlier = is_earlier_output(target)
    if not overwrite:
        hint = "or pass --overwrite to replace that earlier output" if earlier else (
            "(it is not an output of compress, so --overwrite will not replace it either)")
        return f"{label} {target} already exists; choose another {label} {hint}"
    if not earlier and any(target.iterdir()):
        return (f"{label} {target} is not an earlier output of compress (it has no {MARKER} marker or report.json), "
                f"so --overwrite does not replace it: choose another {label}, or empty or delete it yourself")
    return None


def named_paths(value: Any) -> list[Path]:
    """Every existing file or folder named by a string anywhere in `value` (nested dicts and lists): a recipe's inputs.

    Read from the values, not from a list of fields, so a new evaluator's data file is protected too; a value that
    only happens to name a folder (`device: cpu` beside a folder `cpu`) is protected needlessly, which costs no
    more than a refusal to replace that folder.
    """
    if isinstance(value, dict):
        return [path for item in value.values() for path in named_paths(item)]
    if isinstance(value, list):
        return [path for item in value for path in named_paths(item)]
    if isinstance(value, str) and value and len(value) < 4096 and "\0" not in value:
        with contextlib.suppress(OSError, ValueError):
            if Path(value).exists():
                return [Path(value)]
    return []


def check_output_target(target: Path, overwrite: bool, *, inputs: Iterable[Path] = (), label: str = "--output") -> None:
    """Fail before any work is done if `target` exists and may not be replaced (see `replace_refusal`)."""
    refusal = replace_refusal(target, overwrite=overwrite, inputs=inputs, label=label)
    if refusal is not None:
        raise UserError(refusal)


def preflight_output(target: Path, *, needed_bytes: int = 0, label: str = "--output") -> None:
    """Before any expensive work: the output's folder can be created and written to, and has room.

    A read-only or full disk would otherwise fail only after hours of compression, when the report is written.
    """
    with writing(target, label, probing=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.probe-"):
            pass
    free = shutil.disk_usage(target.parent).free
    if free < needed_bytes:
        raise UserError(f"not enough disk space for {target}: about {needed_bytes / 2**20:,.0f} MiB needed "
                        f"(checkpoints and report), {free / 2**20:,.0f} MiB free; free some space or choose another {label}")


def preflight_folder(folder: Path, label: str) -> None:
    """A folder the run writes into but never replaces (calibration.offload_dir): it is, or can become, a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{label} {folder} exists and is not a folder; give a folder (it is created if missing)")
    with writing(folder, label, probing=True):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".compress-probe-"):
            pass


# -- one run at a time ---------------------------------------------------------------------------------


def lock_path_for(target: Path) -> Path:
    """The lock of an output folder: a hidden sibling, so it outlives the folder being renamed or replaced."""
    where = _resolved(target)
    return where.parent / f".{where.name}.lock"


def _write_holder(fd: int) -> None:
    # Called by filelock with the lock file's descriptor right after each acquire: whoever finds the folder
    # busy reads this to say who holds it. A holder killed with SIGKILL leaves the file, but not the lock.
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())


def describe_holder(lock: Path) -> str:
    """`pid 123 on host-a since 2026-01-01 10:00:00 (compress run ...)`, or a shorter text when the note is unreadable."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        return (f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
                + (f" ({holder['command']})" if holder.get("command") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class OutputBusy(UserError):
    """Another live process holds the output folder's lock; `holder` says which (`describe_holder`)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


@contextlib.contextmanager
def hold_output(target: Path, label: str = "--output") -> Iterator[None]:
    """Hold `target`'s lock while the block runs: its folder, staging siblings and `.resume` checkpoints are ours.

    Re-entrant in one process (a run holds its output, then `atomic_output` takes it again). Raises OutputBusy
    naming the holder when a live process has it; a dead holder's lock is free (flock dies with its process).
    """
    path = lock_path_for(target)
    with writing(target, label, probing=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, is_singleton=True, on_acquired=_write_holder)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            holder = describe_holder(path)
            raise OutputBusy(f"{label} {target} is in use by another run: {holder}. Wait for it to finish (or "
                             f"stop it), or choose another {label}", holder) from None
    try:
        yield
    finally:
        if lock.lock_counter == 1:
            # The last release removes the file, so finished runs leave no `.lock` behind; filelock tells a peer
            # that opened the file just before this unlink to try again (it checks the inode's link count).
            path.unlink(missing_ok=True)
        lock.release()


# -- complete or absent ----------------------------------------------------------------------------------


def _remove_leftover_staging(target: Path) -> None:
    """Staging folders of runs that were killed: garbage, since whoever holds the lock is the only live writer."""
    for folder in target.parent.glob(f".{target.name}.partial-*"):
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
def atomic_output(target: Path, *, overwrite: bool = False, inputs: Iterable[Path] = (), label: str = "--output",
                  kind: str = "run") -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` only if the block finishes.

    On any error or Ctrl-C the temporary folder is removed, so a folder named `target` always holds a
    finished output. The folder gets the `MARKER` file (`kind`: run or export), which is what lets a later
    `--overwrite` replace it. `target` is locked for the block's length (`hold_output`).
    """
    inputs = list(inputs)
    with hold_output(target, label):
        check_output_target(target, overwrite, inputs=inputs, label=label)
        with writing(target, label):
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftover_staging(target)
            staging = target.parent / f".{target.name}.partial-{os.getpid()}"
            staging.mkdir()
        try:
            (staging / MARKER).write_text(json.dumps({"written_by": "compress", "kind": kind}) + "\n", encoding="utf-8")
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _rename_into_place(staging, target)


def replace_atomically(path: Path, data: str | bytes) -> None:
    """Write `path` whole or not at all: a reader (or a run killed mid-write) sees the old file or the new one.

    The temporary file sits beside `path` (one file system, so the rename is atomic) and is named by this
    process, so two processes writing the same file never share one.
    """
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        temporary.write_text(data, encoding="utf-8")
    else:
        temporary.write_bytes(data)
    os.replace(temporary, path)


def _rename_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    # Replacing an earlier output: move it aside first, so no moment exists where neither is complete on disk.
    previous = target.parent / f".{target.name}.replaced-{os.getpid()}"
    target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)


# -- a full or read-only disk is the user's to fix ---------------------------------------------------------

DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# safetensors (Rust) and other native writers report the OS error only in their message: "... (os error 28)"
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


@dataclass(frozen=True)
class DiskProblem:
    reason: str  # "no space left on the disk"
    path: str | None  # the file being written, when the error names one

    @property
    def full(self) -> bool:
        return self.reason in (DISK_ERRNOS[errno.ENOSPC], DISK_ERRNOS[errno.EDQUOT])

    def describe(self, fallback: Path | str) -> str:
        return f"{self.reason} (writing {self.path or fallback})"


def disk_problem(exc: BaseException) -> DiskProblem | None:
    """The full, read-only or forbidden disk behind `exc` (or an exception it was raised from); None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            return DiskProblem(DISK_ERRNOS[current.errno], current.filename if isinstance(current.filename, str) else None)
        match = _OS_ERROR_IN_TEXT.search(str(current))
        if match and int(match.group(1)) in DISK_ERRNOS:
            return DiskProblem(DISK_ERRNOS[int(match.group(1))], None)
        current = current.__cause__ or current.__context__
    return None


class Unwritable(UserError):
    """A path the run must write cannot be written: full, read-only or forbidden."""

    def __init__(self, message: str, problem: DiskProblem):
        super().__init__(message)
        self.problem = problem


@contextlib.contextmanager
def writing(target: Path, label: str, *, probing: bool = False) -> Iterator[None]:
    """Turn a full, read-only or forbidden disk met inside the block into an Unwritable naming `label` and `target`.

    `probing`: the block only creates folders and a probe file, so any OSError (a file where a folder should be,
    a name too long) means the path cannot be written, not a bug of ours.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        problem = disk_problem(exc)
        if problem is None and probing and isinstance(exc, OSError):
            problem = DiskProblem(exc.strerror or type(exc).__name__, exc.filename if isinstance(exc.filename, str) else None)
        if problem is None:
            raise
        fix = f"free some space or choose another {label}" if problem.full else f"choose another {label}"
        raise Unwritable(f"cannot write {label} {target}: {problem.describe(target)}; {fix}", problem) from None


def stopped_by_disk(exc: BaseException) -> DiskProblem | None:
    """The disk problem that stopped a run, if that is what `exc` is: an Unwritable, or an error of ours or a
    library's caused by one. Other UserErrors are the user's input, even if an OSError led to them."""
    if isinstance(exc, Unwritable):
        return exc.problem
    return None if isinstance(exc, UserError) else disk_problem(exc)


def finished_layers(checkpoints: Path) -> int:
    return sum(1 for _ in checkpoints.glob("sweep-*/layer-*/state.json"))


class DiskFull(UserError):
    """A run stopped by a full (or read-only) disk. Its finished layer checkpoints are kept, so it can resume."""

    def __init__(self, problem: DiskProblem, output: Path, checkpoints: Path | None):
        self.problem = problem
        self.checkpoints = checkpoints if checkpoints is not None and checkpoints.is_dir() else None
        layers = finished_layers(self.checkpoints) if self.checkpoints is not None else 0
        if self.checkpoints is not None:
            finished = "1 finished decoder layer is" if layers == 1 else f"{layers} finished decoder layers are"
            kept = (f"its {finished} kept in {self.checkpoints}; free some space, then run the same command "
                    "with --resume")
        else:
            kept = ("this run keeps no layer checkpoints (lazy: true, --no-checkpoints, or it stopped before the "
                    "first), so nothing could be kept; free some space and run it again")
        super().__init__(f"the run for {output} stopped: {problem.describe(output)}; {kept}")
