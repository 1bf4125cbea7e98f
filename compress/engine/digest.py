"""SHA-256 digests of a model: of its weights in memory (the `weights_sha256` of report.json: equal digests,
bit-identical weights), and of the files it is loaded from (what the baseline cache is keyed by)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from compress.engine.cache import Cache


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names and raw bytes): equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shards_digest(folder: Path) -> str:
    """`weights_digest` of a model written to safetensors shards (a lazy run's output), one tensor in memory at a time.

    Tensors are taken in name order, so the digest does not depend on how they were spread over the shards.
    """
    from safetensors import safe_open

    from compress.engine.lazy import checkpoint_files

    where = checkpoint_files(folder)
    digest = hashlib.sha256()
    for name in sorted(where):
        with safe_open(str(where[name]), framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(name)
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_folder(ref: str) -> Path | None:
    """The folder a model is read from: `ref` itself, or a hub id's snapshot in the local hub cache; None when
    it has none on disk (nothing is downloaded here)."""
    if Path(ref).is_dir():
        return Path(ref)
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(ref, "config.json")
    except Exception:  # not a valid repo id: nothing on disk to point at
        return None
    return Path(config).parent if isinstance(config, str) else None


def model_files_digests(folder: Path, cache: Cache) -> dict[str, str]:
    """File name -> SHA-256 of every file transformers may read from the model folder (weights, config, tokenizer,
    remote code). Hidden files are ours (locks, checkpoints); sub-folders (a hub repo's `original/`) are not read.

    Each file is read in full once and its digest remembered by the file's identity (`Cache.file_digest`), so
    a 16 GB checkpoint costs one read the first time and a `stat` per file afterwards.
    """
    return {path.name: cache.file_digest(path) for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".")}
