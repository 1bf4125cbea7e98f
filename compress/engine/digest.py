"""SHA-256 digests of a model's weights, the `weights_sha256` of report.json: equal digests, bit-identical weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


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
