"""Text sources for calibration and evaluation.

A dataset reference is a local `.jsonl` (one JSON object per line with a `text` field), any other local
file read as UTF-8 text, or one of the hub names below, read through `datasets` when online.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from compress.recipe.datasets import HUB_DATASETS, is_hub_dataset
from compress.recipe.errors import UserError


def dataset_label(ref: str) -> str:
    """A short name for reports: the hub name, or the file name without extension."""
    return ref if is_hub_dataset(ref) else Path(ref).stem


# Where a hub name's split lives in a local data folder laid out like ../shared/data (for offline use).
LOCAL_LAYOUT = {
    "wikitext2": "wikitext2_raw/wiki.test.raw",
    "c4": "c4/c4-validation.00000-of-00008.json",
}
DATA_DIR_ENV = "COMPRESS_DATA_DIR"


def load_text(ref: str, data_dir: str | Path | None = None) -> str:
    """The full text of a dataset reference, documents joined as the papers do.

    A hub name reads its local copy from `data_dir` (default $COMPRESS_DATA_DIR) when one is given.
    """
    if is_hub_dataset(ref):
        folder = data_dir or os.environ.get(DATA_DIR_ENV)
        return _load_local_hub_copy(ref, Path(folder)) if folder else _load_hub_text(ref)
    path = Path(ref)
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    if path.suffix == ".jsonl":
        return _load_jsonl_text(path)
    return read_utf8(path)


def read_utf8(path: Path) -> str:
    """The file's text; a UserError naming the file and the byte offset where it stops being UTF-8."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} cannot be "
                        "decoded; save the file as UTF-8") from None
    # Universal newlines, as read_text gives: wiki.test.raw's \r\n rows must match the hub's rows.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_records(path: Path, what: str = "file") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming the file and line."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    offset = 0
    with path.open("rb") as lines:  # bytes, so a line that is not UTF-8 can be named by its byte offset
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not UTF-8: byte 0x{raw[exc.start]:02x} at byte offset "
                                f"{offset + exc.start} cannot be decoded; save the file as UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _load_jsonl_text(path: Path) -> str:
    texts = []
    for number, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number}: expected an object with a string 'text' field")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _load_local_hub_copy(name: str, data_dir: Path) -> str:
    """A hub data set from its local files, rebuilt into the same rows the hub gives, joined the same way."""
    path = data_dir / LOCAL_LAYOUT[name]
    if not path.is_file():
        raise UserError(f"dataset '{name}': file not found: {path} (the data folder {data_dir} should hold {LOCAL_LAYOUT[name]})")
    if name != "wikitext2":
        return _load_jsonl_text(path)
    # wiki.test.raw has one line per hub row; the hub keeps the newline on text rows and gives blank lines as "".
    lines = read_utf8(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = [line + "\n" if line.strip() else "" for line in lines]
    return HUB_DATASETS[name][3].join(rows)


def _load_hub_text(name: str) -> str:
    args, kwargs, field, joiner = HUB_DATASETS[name]
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(
            f"dataset '{name}' is read from the Hugging Face hub, but offline mode is on (HF_HUB_OFFLINE=1). "
            "Point the recipe at a local .txt or .jsonl file instead, or at a local copy of the data set "
            f"(`data_dir:` / --data-dir / ${DATA_DIR_ENV} holding {LOCAL_LAYOUT[name]})."
        )
    try:
        import datasets
    except ImportError:
        raise UserError(f"dataset '{name}' needs the `datasets` package: pip install 'compress[hub]'") from None
    try:
        rows = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, auth and missing-config errors all mean the same to the user
        raise UserError(f"could not load dataset '{name}' from the hub: {exc}") from exc
    return joiner.join(rows[field])


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1-D, int64) of the whole text, tokenized once as the GPTQ protocol does."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids[0].to(torch.int64)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Settings a tokenizer keeps outside its backend that do not change `tokenize_text`'s ids: where it was read from
# (the same tokenizer in two model folders gives the same ids).
_IDENTITY_IGNORES = ("name_or_path",)


def tokenizer_identity(tokenizer: Any) -> str | None:
    """SHA-256 of everything `tokenize_text` reads from `tokenizer`, or None when that cannot be told.

    A fast tokenizer is its backend (vocabulary, merges, normalizer, pre-tokenizer, the post-processor that adds
    BOS) plus the Python-side settings; the versions of transformers and tokenizers are in it because their code
    turns those into ids. A slow (Python) tokenizer has no one serialisable state: None, so its ids are not shared
    between runs.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    from importlib import metadata

    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _IDENTITY_IGNORES}
    # repr() for values without a JSON form (AddedToken); one with a memory address in it only makes a miss
    described = json.dumps({"class": type(tokenizer).__name__, "settings": settings, "backend": backend.to_str(),
                            "transformers": metadata.version("transformers"), "tokenizers": metadata.version("tokenizers")},
                           sort_keys=True, default=repr)
    return hashlib.sha256(described.encode("utf-8")).hexdigest()


def sample_windows(token_ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens (GPTQ's calibration sampling), reproducible from `seed`."""
    if token_ids.numel() <= seq_len:
        raise UserError(
            f"calibration text has {token_ids.numel()} tokens, fewer than seq_len={seq_len}; "
            "use a longer text or a shorter seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])


def contiguous_windows(token_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows (count, seq_len) covering the text; the tail shorter than seq_len is dropped."""
    count = token_ids.numel() // seq_len
    if count == 0:
        raise UserError(f"evaluation text has {token_ids.numel()} tokens, fewer than seq_len={seq_len}")
    return token_ids[: count * seq_len].reshape(count, seq_len)
