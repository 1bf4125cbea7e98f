"""quantize_embeddings: the input embedding table and the output head rounded onto a GGUF block type.

The layer quantizers see the decoder layers' linears only; llama.cpp's own files also store `token_embd` and
`output` quantized (Q6_K for the head, or for a tied table; the main type for an untied embedding). Round to
nearest on the type's grid (compress/quant/gguf_records.py, the same grid search as RTN's) is what llama-quantize
does with these tensors too. The rounded tables replace the model's own, so evaluation scores what is exported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.compressors.base import write_back
from compress.compressors.configs import QuantizeEmbeddingsConfig  # noqa: F401  (re-exported; defined without torch)
from compress.engine.context import RunContext
from compress.engine.eager import EagerWeights
from compress.engine.model_io import ModelHandle
from compress.quant.gguf_records import GGUFSpec, check_gguf_columns, quantize_gguf_rtn
from compress.quant.modules import weight_matrix
from compress.recipe.errors import UserError
from compress.recipe.registry import StrictConfig


def tables_to_round(model: nn.Module, cfg: QuantizeEmbeddingsConfig) -> dict[str, tuple[nn.Module, str]]:
    """{module name: (module, GGUF label)} of the tables `cfg` asks for; a tied pair is one entry, the embedding's
    name, with the head's type when one is given."""
    causal_lm: Any = model  # a transformers PreTrainedModel
    embeddings, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    tied = head is not None and head.weight is embeddings.weight
    chosen: dict[str, tuple[nn.Module, str]] = {}
    if tied and (cfg.head or cfg.embeddings):
        chosen[names[id(embeddings)]] = (embeddings, str(cfg.head or cfg.embeddings))
        return chosen
    if cfg.embeddings:
        chosen[names[id(embeddings)]] = (embeddings, cfg.embeddings)
    if cfg.head:
        if head is None:
            raise UserError("quantize_embeddings: `head` is set, and this model has no output head")
        chosen[names[id(head)]] = (head, cfg.head)
    return chosen


@torch.no_grad()
def run_quantize_embeddings(handle: ModelHandle, cfg: QuantizeEmbeddingsConfig, run: RunContext,
                            next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """Round each chosen table to the nearest point of its GGUF type's grid; returns one report entry per table."""
    if not isinstance(handle.weights, EagerWeights):
        raise UserError("quantize_embeddings needs the embedding table in memory: run it without `lazy: true`")
    entries = {}
    for name, (module, label) in tables_to_round(handle.model, cfg).items():
        weight = weight_matrix(module)  # (rows, hidden): embedding rows, or head rows
        spec = GGUFSpec.from_label(label)
        check_gguf_columns(name, weight.shape[1], spec)
        if not torch.isfinite(weight).all():
            raise UserError(f"quantize_embeddings: {name} holds non-finite values; no grid can round them")
        record = quantize_gguf_rtn(weight, spec)
        entries[name] = {**write_back(name, module, record, run), "rows": weight.shape[0]}
    return entries
