"""Checking a model folder's safetensors files before anything reads a tensor from them.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype": "BF16", "shape": [4096, 128256], "data_offsets": [begin, end]}, "__metadata__": {...}}`, then
the tensors' bytes, offsets relative to the end of the header. The safetensors library checks the same things,
but its errors (and transformers' wrapping of them) are exceptions the user cannot tell from our own bugs, and
they name neither the folder nor the fix. Here every field is checked against the file's size, as safetensors
does, without reading a tensor: a header is a few hundred kilobytes even for a 400B model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.recipe.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a real header is far below it
# bits per element of each safetensors dtype (sub-byte types pack several elements per byte)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FIX = "re-download or re-save the checkpoint"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]


def header_problem(header: Any, body_bytes: int) -> str | None:
    """Why a parsed safetensors header does not describe a body of `body_bytes` bytes, or None when it does.

    Each tensor needs a known dtype, a shape of non-negative integers and `data_offsets` [begin, end] whose length
    is the shape's element count times the dtype's size; the tensors must tile the body exactly, in order.
    """
    if not isinstance(header, dict):
        return f"the header is a JSON {type(header).__name__}, not an object"
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return "__metadata__ must map strings to strings"
            continue
        problem = _entry_problem(entry)
        if problem is not None:
            return f"tensor {name!r}: {problem}"
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            gap = "overlaps the previous tensor" if begin < position else f"leaves {begin - position} bytes unused"
            return f"tensor {name!r} starts at byte {begin} of the data, which {gap}"
        position = end
    if position != body_bytes:
        if position > body_bytes:
            return f"the tensors need {position} bytes of data but the file holds {body_bytes} (truncated?)"
        return f"the tensors use {position} bytes of data but the file holds {body_bytes}"
    return None


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return "expected exactly the keys dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape must be a list of non-negative integers, got {shape!r:.80}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        return f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.80}"
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != (offsets[1] - offsets[0]) * 8:
        return (f"{dtype} x {shape} needs {bits / 8:g} bytes but data_offsets span {offsets[1] - offsets[0]} "
                "(the dtype or shape does not match the data)")
    return None


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, after checking its header against the file; UserError naming it if not."""
    _check_is_file(path)
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size < 8:
                raise UserError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header "
                                f"length ({FIX})")
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise UserError(f"{path} is not a valid safetensors file: its header claims {length} bytes, and the "
                                f"file holds {size} ({FIX})")
            raw = handle.read(length)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a valid safetensors file: its header is not JSON ({exc}; {FIX})") from None
    problem = header_problem(header, size - 8 - length)
    if problem is not None:
        raise UserError(f"{path} is not a valid safetensors file: {problem} ({FIX})")
    return {name: StoredTensor(path, entry["dtype"], tuple(entry["shape"]))
            for name, entry in header.items() if name != "__metadata__"}


def _check_is_file(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a symbolic link to {path.readlink()}, which does not exist")
    if not path.is_file():
        raise UserError(f"{path} is missing or not a file")


def shard_names(index_path: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a `model.safetensors.index.json` (checked: JSON, names, no paths)."""
    _check_is_file(index_path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{index_path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {index_path}: {exc.strerror or exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_path} has no `weight_map` of tensor names to shard files")
    outside = sorted({v for v in weight_map.values() if Path(v).name != v})
    if outside:
        raise UserError(f"{index_path} names shards outside its folder: {', '.join(outside[:3])}")
    return weight_map


def stored_tensors(folder: Path, *, every_file: bool = False) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in `folder`, each header checked, as the loader will read them.

    transformers reads `model.safetensors` when there is one, else the shards an index names (each must exist
    and hold the tensors the index puts in it). `every_file` is lazy loading's rule: the index, else every
    *.safetensors file in the folder.
    """
    single, index = folder / SINGLE_FILE, folder / INDEX_NAME
    if not every_file and _present(single):
        return read_header(single)
    if _present(index):
        return _indexed_tensors(index)
    found: dict[str, StoredTensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(read_header(file))
    return found


def _present(path: Path) -> bool:
    """There is an entry by that name, even a dangling symlink (which read_header then names)."""
    return path.exists() or path.is_symlink()


def _indexed_tensors(index: Path) -> dict[str, StoredTensor]:
    weight_map = shard_names(index)
    headers: dict[str, dict[str, StoredTensor]] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not _present(path):
            listed = sum(1 for v in weight_map.values() if v == shard)
            raise UserError(f"{index} lists {listed} tensors in {shard}, which is not in {index.parent}")
        headers[shard] = read_header(path)
    absent = [name for name, shard in weight_map.items() if name not in headers[shard]]
    if absent:
        raise UserError(f"{index} puts {describe_names(absent)} in shards that do not hold them")
    return {name: headers[shard][name] for name, shard in weight_map.items()}


def describe_names(names: list[str], shown: int = 5) -> str:
    """'a, b, c and 12 more' for error messages: the first few names and a count."""
    names = sorted(names)
    listed = ", ".join(names[:shown])
    return f"{len(names)} tensors ({listed}{f' and {len(names) - shown} more' if len(names) > shown else ''})" \
        if len(names) > 1 else listed
