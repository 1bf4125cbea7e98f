"""The user's cache of results that are slow to compute and safe to reuse: baseline metrics, token ids, file digests.

Layout: `<cache dir>/<kind>/<key[:2]>/<key>.<suffix>`, where `key` is the SHA-256 of everything the value depends
on (`key_of`). The cache dir is $COMPRESS_CACHE_DIR, else $XDG_CACHE_HOME/compress, else ~/.cache/compress.

Three promises:
- an entry is written whole or not at all (`replace_atomically`), so a reader never sees half of one;
- an entry that cannot be read back as what was written (truncated, edited, another version's) is a warning and
  a miss, never a crash and never a number: every entry repeats the key material it was stored under, and a
  reader that finds other material there ignores it;
- the cache is an optimisation: a cache folder that cannot be created or written is a warning, and the run goes on
  computing everything.

Deleting the folder at any time is safe (`rm -rf ~/.cache/compress`); nothing prunes it automatically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from compress.engine.output import replace_atomically

log = logging.getLogger("compress")

CACHE_DIR_ENV = "COMPRESS_CACHE_DIR"
HASH_CHUNK_BYTES = 16 * 2**20


def default_cache_dir() -> Path:
    """$COMPRESS_CACHE_DIR, else $XDG_CACHE_HOME/compress, else ~/.cache/compress (the XDG base directory spec)."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the spec ignores a relative value
    return base / "compress"


def key_of(material: Any) -> str:
    """SHA-256 of `material` as canonical JSON (sorted keys): equal material, equal key."""
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def canonical_json(material: Any) -> str:
    # No `default=`: a value without an exact JSON form would make two different keys look alike.
    return json.dumps(material, sort_keys=True, separators=(",", ":"))


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes, read in chunks (memory stays at one chunk for a 16 GB shard)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Cache:
    """A cache folder; see the module docstring for what its entries promise.

    `warn` tells the user about an entry ignored or a folder that cannot be written (the runner passes its
    reporter's `note`, which also logs to run.log).
    """

    folder: Path
    warn: Callable[[str], None] = log.warning
    _unwritable_warned: list[bool] = field(default_factory=list, compare=False, repr=False)

    def path(self, kind: str, key: str, suffix: str) -> Path:
        return self.folder / kind / key[:2] / f"{key}.{suffix}"

    @contextlib.contextmanager
    def locked(self, kind: str, key: str) -> Iterator[None]:
        """Hold entry `key` while computing it, so a second process (a parallel sweep's next trial) waits and
        reads the result instead of computing it again. flock-based: a holder that dies frees it."""
        lock_path = self.path(kind, key, "lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(lock_path)
            try:
                lock.acquire(blocking=False)
            except Timeout:  # said in run.log, so a trial that seems stalled is explained
                log.info("waiting for another process computing the same %s entry (%s)", kind, lock_path)
                lock.acquire()
        except OSError as exc:
            self._warn_unwritable(lock_path, exc)
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def read_json(self, kind: str, key: str, material: Any) -> dict[str, Any] | None:
        """The `value` stored under `key`, or None when absent or unusable (the latter with a warning)."""
        path = self.path(kind, key, "json")
        data = self.read_bytes(path)
        if data is None:
            return None
        entry, problem = _entry_of(data, material)
        if problem is not None:
            self._ignored(path, problem)
        return entry

    def write_json(self, kind: str, key: str, material: Any, value: dict[str, Any]) -> None:
        """Store `value` under `key` with the material it was computed from and its checksum; a failure to write
        is only a warning."""
        entry = {"material": material, "value": value, "value_sha256": key_of(value)}
        self.write_bytes(self.path(kind, key, "json"), (json.dumps(entry, indent=1) + "\n").encode())

    def write_bytes(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, data)
        except OSError as exc:
            self._warn_unwritable(path, exc)

    def read_bytes(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # the latter: the folder is not there (writing it warns)
            return None
        except OSError as exc:
            self._ignored(path, f"cannot be read ({exc.strerror or exc})")
            return None

    def file_digest(self, path: Path) -> str:
        """`file_sha256(path)`, remembered by the file's identity (inode, size, mtime and ctime in ns).

        A file rewritten in place changes its mtime and ctime, and ctime cannot be set back by a program (cp -p,
        rsync -t and touch restore only mtime), so a remembered digest is reused only for the same bytes; a 16 GB
        shard is read once, not at every run.
        """
        resolved = path.resolve()
        info = resolved.stat()
        identity = {"path": str(resolved), "dev": info.st_dev, "inode": info.st_ino, "size": info.st_size,
                    "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}
        key = key_of(identity)
        known = self.read_json("file-sha256", key, identity)
        if known is not None and isinstance(known.get("sha256"), str):
            return known["sha256"]
        digest = file_sha256(resolved)
        self.write_json("file-sha256", key, identity, {"sha256": digest})
        return digest

    def _ignored(self, path: Path, why: str) -> None:
        self.warn(f"cache entry {path} {why}; ignoring it (it is recomputed and rewritten)")
        return None

    def _warn_unwritable(self, path: Path, exc: OSError) -> None:
        if not self._unwritable_warned:  # one warning per run, not one per entry
            self._unwritable_warned.append(True)
            self.warn(f"cache folder {self.folder} cannot be written ({exc.strerror or exc}); running without caching "
                      f"what is computed (set {CACHE_DIR_ENV} to another folder, or pass --no-cache)")


def _entry_of(data: bytes, material: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the value an entry's bytes hold, None) when it is whole and was stored for `material`; else (None, why)."""
    try:
        entry = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        return None, f"is not valid JSON ({exc})"
    if not isinstance(entry, dict) or not isinstance(entry.get("value"), dict):
        return None, "does not hold a cache entry"
    if entry.get("material") != json.loads(canonical_json(material)):
        return None, "was stored for other inputs"
    if entry.get("value_sha256") != key_of(entry["value"]):  # a flipped digit would still be valid JSON
        return None, "does not match its checksum"
    return entry["value"], None
