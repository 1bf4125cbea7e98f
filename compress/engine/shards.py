"""Writing a model as it is compressed: each finished decoder layer goes to its own safetensors shard at once.

The peers save at the very end, from a model that must then sit whole in host memory; a host OOM there loses
hours of work. Here every layer is written (and can be freed) as soon as its passes are done, and the index
`model.safetensors.index.json` that makes the folder loadable with `from_pretrained` is written last, so a
folder with an index is complete. Every file is written to a temporary name and renamed, so a crash never
leaves a half-written shard under a real name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.engine.output import replace_atomically

INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
    """Appends named tensors to shards in `folder` and keeps the tensor -> shard index.

    Writing the same shard name again replaces it (a second sweep over the same layer), and the index follows.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.shard_bytes: dict[str, int] = {}

    def write(self, shard: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Write `tensors` (any device) as `folder/shard`; returns its path."""
        path = self.folder / shard
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # safetensors refuses tensors that share memory (tied weights) and non-contiguous views
        cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        save_file(cpu, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        for name in [n for n, s in self.weight_map.items() if s == shard]:
            del self.weight_map[name]
        self.weight_map.update({name: shard for name in cpu})
        self.shard_bytes[shard] = sum(t.numel() * t.element_size() for t in cpu.values())
        return path

    def finish(self) -> Path:
        """Write the index last: its presence marks the folder as a complete checkpoint."""
        index = {
            "metadata": {"total_size": sum(self.shard_bytes.values())},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        path = self.folder / INDEX_NAME
        replace_atomically(path, (json.dumps(index, indent=2) + "\n").encode())
        return path
