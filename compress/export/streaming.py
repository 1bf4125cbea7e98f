"""A lazy run's compressed-tensors checkpoint, written one decoder layer at a time as the layers finish.

`lazy: true` never holds the model, so the usual export (a `CompressedModel` with every layer's codes) cannot
run at the end. Instead each finished layer's tensors are packed and written to their own shard right away,
the same tensors `write_compressed_tensors` would store for that layer, and the codes are dropped. At the
end come the tensors outside the layers, config.json with the quantization config (which needs only the
records' specs and, for pruning, a per-module mask summary) and the index. The result equals the eager export
tensor for tensor (tests/scale/test_lazy.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.export.compressed_tensors_format import (
    config_details,
    holdable,
    kv_cache_tensors,
    mask_summary,
    module_tensors,
    quantization_config,
    sparsity_config_of,
)
from compress.export.common import write_config
from compress.export.state import CompressedModel
from compress.engine.model_io import ModelHandle
from compress.engine.shards import ShardWriter


class StreamingCompressedTensors:
    """Packs and writes each finished layer of a lazy run into `folder`; `finish` completes the checkpoint."""

    def __init__(self, folder: Path, dtype: torch.dtype, run: RunContext):
        self.writer = ShardWriter(folder)
        self.dtype = dtype
        self.run = run
        self.masks: dict[str, tuple[int, int, bool]] = {}  # summaries of the masks already written

    def write_layer(self, index: int, prefix: str, layer: nn.Module) -> None:
        """Write layer `index` (named `prefix`, still materialised) in the compressed-tensors layout."""
        records = holdable({fqn: r for fqn, r in self.run.results.records.items() if fqn.startswith(prefix + ".")},
                           self.run.results.activation_quant)  # refused before this layer's shard is written
        tensors: dict[str, torch.Tensor] = {}
        for name, param in layer.named_parameters():
            full = f"{prefix}.{name}"
            if name.endswith(".weight") and full.removesuffix(".weight") in records:
                continue
            tensors[full] = param.detach().to(self.dtype) if param.is_floating_point() else param.detach()
        for fqn, record in records.items():
            module = layer.get_submodule(fqn.removeprefix(prefix + "."))
            tensors.update(module_tensors(fqn, module, record, self.dtype, self.run.results.activation_quant.get(fqn)))
        tensors.update(kv_cache_tensors({f: s for f, s in self.run.results.kv_cache.items() if f.startswith(prefix + ".")}))
        for fqn in [f for f in self.run.handoff.masks if f.startswith(prefix + ".")]:
            self.masks[fqn] = mask_summary(self.run.handoff.masks.pop(fqn))  # a byte per weight: not kept past its layer
        self.writer.write(f"model-layer-{index:05d}.safetensors", tensors)

    def finish(self, handle: ModelHandle, outside: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Write `outside` (the tensors outside the decoder layers, one at a time), config, tokenizer and index."""
        for number, (name, tensor) in enumerate(outside):
            stored = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            self.writer.write(f"model-outside-{number:03d}.safetensors", {name: stored})
        shapes = CompressedModel(handle.model, handle.tokenizer, self.dtype, self.run.results.records, {},
                                 self.run.results.activation_quant, self.run.results.kv_cache)
        config = quantization_config(shapes, sparsity=sparsity_config_of(self.masks))
        write_config(shapes, self.writer.folder, self.dtype, {"quantization_config": config})
        self.writer.finish()
        return config_details(config)
