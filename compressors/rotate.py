"""Rotations fused into the weights (QuaRot, Ashkboos et al. 2024; QuIP#'s incoherence, Tseng et al. 2024).

A few residual-stream channels carry most of the magnitude, so a per-group integer grid spends its range on them.
Multiplying the residual stream by an orthogonal matrix Q spreads every channel over all of them, and nothing the
model computes changes, provided Q is fused into the weights on both sides:

    embedding                        E <- E Q                (each token's row)
    readers  (q/k/v, gate/up, head)  W <- diag-gain-folded W, then W Q   (they see x Q, undo it by Q^T)
    writers  (o_proj, down_proj)     W <- Q^T W, bias <- bias Q          (their output joins x Q)

RMSNorm commutes with Q (it divides by the vector's norm, which Q keeps) but not with its per-channel gain, so each
gain is first folded into the linears it feeds and set to 1. Inside attention each head's values get a rotation R
of their own (head_dim): v_proj's rows of a head <- R^T rows, o_proj's columns of the head <- columns R; attention
mixes values linearly per head, so R cancels inside o_proj (GQA: every query head uses its key-value head's R,
which is the same R). Q and R are randomised Hadamard matrices, diag(±1) H / sqrt(n): `rotation_matrix`.

What stays exact is a table per family (`LAYOUTS`); a family outside it is refused by name (`REFUSED` says why):
LayerNorm subtracts the mean, which does not commute with Q; Gemma's norms multiply by 1 + gain and its post-norms
sit on the sublayer outputs, where no linear can take the gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from compress.engine.context import RunContext
from compress.engine.eager import EagerWeights
from compress.engine.model_io import ModelHandle
from compress.recipe.errors import UserError
from compress.recipe.registry import StrictConfig
from compress.compressors.configs import RotateConfig  # noqa: F401  (re-exported; defined without torch)

# Rows of the embedding / head rotated at a time, so a 128k vocabulary never needs a float64 copy of the matrix.
ROW_CHUNK = 4096


# -- the kernel: Hadamard matrices and the products that fuse them ------------------------------------------------

def _paley_hadamard(q: int) -> torch.Tensor | None:
    """A Hadamard matrix of order q + 1 (Paley construction I) when q is a prime = 3 mod 4, else None."""
    if q < 3 or q % 4 != 3 or any(q % d == 0 for d in range(2, math.isqrt(q) + 1)):
        return None
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]  # (q, q), antisymmetric for q = 3 mod 4
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, jacobsthal
    return skew + torch.eye(q + 1, dtype=torch.float64)


def hadamard_matrix(size: int) -> torch.Tensor:
    """A normalised Hadamard matrix (size, size) in float64: orthogonal, every entry ±1/sqrt(size).

    Powers of 2 are Sylvester's (scipy.linalg.hadamard); other sizes are 2^k times a Paley order q + 1 (Kronecker
    product), which covers 12, 20, 24, 28, 44, 48, ..., 1536, 3072, 5120 and 896 = 4 x 224. Raises ValueError for a
    size none of these make (e.g. 36).
    """
    from scipy.linalg import hadamard

    power = 1
    while size % (power * 2) == 0:
        power *= 2
    for sylvester in _descending_powers(power):
        rest = size // sylvester
        base = torch.ones(1, 1, dtype=torch.float64) if rest == 1 else _paley_hadamard(rest - 1)
        if base is not None:
            matrix = torch.kron(torch.from_numpy(hadamard(sylvester).astype("float64")), base)
            return matrix / math.sqrt(size)
    raise ValueError(f"no Hadamard matrix of size {size} is known here (sizes 2^k, or 2^k times a prime + 1 with "
                     "the prime = 3 mod 4)")


def _descending_powers(power: int) -> list[int]:
    return [power >> shift for shift in range(power.bit_length())]


def rotation_matrix(size: int, generator: torch.Generator) -> torch.Tensor:
    """diag(random ±1) @ normalised Hadamard (size, size), float64: orthogonal, and incoherent for any input."""
    signs = torch.randint(0, 2, (size,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard_matrix(size)


def rotate_columns(weight: torch.Tensor, rotation: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """A reader's (out, in) weight for inputs rotated by `rotation` (in, in): W diag(gain) Q, in float64."""
    w = weight.to(torch.float64)
    if gain is not None:
        w = w * gain.to(torch.float64)[None, :]
    return w @ rotation.to(w.device)


def rotate_rows(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """A writer's (out, in) weight whose outputs join the rotated stream: Q^T W, in float64 (a bias: Q^T b)."""
    return rotation.to(weight.device).T @ weight.to(torch.float64)


def rotate_head_rows(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """(heads * head_dim, ...) rows, each head's block multiplied by R^T (head_dim, head_dim): R^T W_h."""
    head_dim = rotation.shape[0]
    w = weight.to(torch.float64)
    blocks = w.reshape(-1, head_dim, *w.shape[1:])  # (heads, head_dim, ...)
    return torch.einsum("ji,hj...->hi...", rotation.to(w.device), blocks).reshape(w.shape)


def rotate_head_columns(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """(out, heads * head_dim) columns, each head's block multiplied by R on the right: W_h R."""
    head_dim = rotation.shape[0]
    w = weight.to(torch.float64)
    out = w.shape[0]
    return (w.reshape(out, -1, head_dim) @ rotation.to(w.device)).reshape(out, -1)


# -- which weights read and write the residual stream, per family --------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Names relative to a decoder layer. `value` holds the value heads' rows, starting after `value_after` rows
    (Phi-3's fused qkv_proj: after the query and key rows, counted in heads of query + key-value)."""

    attention_norm: str
    attention_readers: tuple[str, ...]
    value: str
    attention_writer: str
    mlp_norm: str
    mlp: str
    fused_qkv: bool = False


LLAMA = Layout("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.v_proj",
               "self_attn.o_proj", "post_attention_layernorm", "mlp")
PHI3 = Layout("input_layernorm", ("self_attn.qkv_proj",), "self_attn.qkv_proj", "self_attn.o_proj",
              "post_attention_layernorm", "mlp", fused_qkv=True)

LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "mixtral": LLAMA, "qwen2_moe": LLAMA, "qwen3_moe": LLAMA,  # routers, experts and shared experts all read `mlp`'s input
    "phi3": PHI3,
}
REFUSED: dict[str, str] = {
    "gemma2": "its norms scale by 1 + gain and its post-attention / post-feedforward norms sit on the sublayer "
              "outputs, where no linear can take their gain",
    "gemma3_text": "its norms scale by 1 + gain and its post-attention / post-feedforward norms sit on the sublayer "
                   "outputs, where no linear can take their gain",
    "opt": "LayerNorm subtracts each vector's mean, which does not commute with a rotation",
    "gpt2": "LayerNorm subtracts each vector's mean, which does not commute with a rotation",
    "gpt_neox": "LayerNorm subtracts each vector's mean, which does not commute with a rotation",
    "deepseek_v3": "multi-head latent attention normalises its compressed keys and values (kv_a_layernorm) between "
                   "the residual and the value heads, so neither rotation can be fused there",
}
MLP_WRITERS = ("down_proj", "w2")  # the expert/MLP projections whose output joins the residual stream


def layout_for(model_type: str) -> Layout:
    if model_type in LAYOUTS:
        return LAYOUTS[model_type]
    why = REFUSED.get(model_type, "its layout is not in compressors/rotate.py's table (LAYOUTS)")
    raise UserError(f"rotate: model_type '{model_type}' cannot be rotated exactly: {why}. Rotatable families: "
                    f"{', '.join(sorted(LAYOUTS))}; drop the rotate pass for this model")


# -- the pass ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def run_rotate(handle: ModelHandle, cfg: RotateConfig, run: RunContext,
               next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """rotate: fold the norms' gains and fuse random Hadamard rotations into every weight (same function)."""
    if not isinstance(handle.weights, EagerWeights):
        raise UserError("rotate changes every tensor of the model at once, so it needs the whole model in memory: "
                        "run it without `lazy: true`")
    return rotate_model(handle.model, handle.layers_prefix, cfg, stored_dtype=handle.checkpoint_dtype)


@torch.no_grad()
def rotate_model(model: nn.Module, layers_prefix: str, cfg: RotateConfig,
                 stored_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Rotate a causal LM in place; returns the report entries ({name: facts}). Raises UserError for what cannot be
    rotated exactly (the family, a tied head without `untie_embeddings`, a size with no Hadamard matrix).

    `stored_dtype`: the precision the checkpoint stores weights in, which an untied head's extra bytes are counted in
    (default: the head's own dtype in memory)."""
    config: Any = model.config
    layout = layout_for(str(getattr(config, "model_type", "unknown")))
    hidden, heads, kv_heads, head_dim = _attention_shape(config)
    generator = torch.Generator().manual_seed(cfg.seed)
    residual = _rotation(hidden, generator, "hidden_size")
    per_head = _rotation(head_dim, generator, "head_dim")
    untied_bytes = _untie_head(model, cfg, stored_dtype)
    layers = cast(nn.ModuleList, model.get_submodule(layers_prefix))
    for layer in layers:
        _rotate_attention(layer, layout, residual, per_head, (heads, kv_heads, head_dim))
        _rotate_mlp(layer, layout, residual, hidden)
    _rotate_outside_layers(model, residual)
    orthogonality = (residual.T @ residual - torch.eye(hidden, dtype=torch.float64)).abs().max().item()
    model_entry = {"seed": cfg.seed, "residual_rotation": hidden, "head_rotation": head_dim,
                   "untied_head_bytes": untied_bytes, "max_orthogonality_error": orthogonality}
    return {layers_prefix: model_entry, **{f"{layers_prefix}.{i}": {"rotated": True} for i in range(len(layers))}}


def _attention_shape(config: Any) -> tuple[int, int, int, int]:
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return hidden, heads, kv_heads, head_dim


def _rotation(size: int, generator: torch.Generator, what: str) -> torch.Tensor:
    try:
        return rotation_matrix(size, generator)
    except ValueError as err:
        raise UserError(f"rotate: the model's {what} is {size}, and {err}; drop the rotate pass for this model") from None


def _untie_head(model: nn.Module, cfg: RotateConfig, stored_dtype: torch.dtype | None) -> int:
    """Give a head tied to the input embeddings a tensor of its own (or refuse); returns the bytes that adds."""
    causal_lm: Any = model  # a transformers PreTrainedModel
    head, embeddings = causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return 0
    extra = head.weight.numel() * (stored_dtype or head.weight.dtype).itemsize
    if not cfg.untie_embeddings:
        raise UserError(f"rotate: the model's lm_head is tied to its input embeddings, and folding the final norm's "
                        f"gain into the head would change the embeddings too. Set `untie_embeddings: true` to store "
                        f"the head as its own tensor ({extra:,} more bytes), or drop the rotate pass")
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for part in {id(c): c for c in (causal_lm.config, causal_lm.config.get_text_config())}.values():
        part.tie_word_embeddings = False  # save_pretrained and from_pretrained must not tie them again
    return extra


def _rotate_attention(layer: nn.Module, layout: Layout, residual: torch.Tensor, per_head: torch.Tensor,
                      shape: tuple[int, int, int]) -> None:
    heads, kv_heads, head_dim = shape
    gain = _take_gain(layer.get_submodule(layout.attention_norm))
    for name in layout.attention_readers:
        weight = _tensor(layer.get_submodule(name), "weight")
        _set(weight, rotate_columns(weight, residual, gain))
    value = layer.get_submodule(layout.value)
    start = (heads + kv_heads) * head_dim if layout.fused_qkv else 0
    rows = slice(start, start + kv_heads * head_dim)
    for part in ("weight", "bias"):
        if getattr(value, part, None) is not None:
            _set(_tensor(value, part), rotate_head_rows(_tensor(value, part)[rows], per_head), rows)
    writer = layer.get_submodule(layout.attention_writer)
    _set(_tensor(writer, "weight"), rotate_rows(rotate_head_columns(_tensor(writer, "weight"), per_head), residual))
    if getattr(writer, "bias", None) is not None:
        _set(_tensor(writer, "bias"), rotate_rows(_tensor(writer, "bias"), residual))


def _rotate_mlp(layer: nn.Module, layout: Layout, residual: torch.Tensor, hidden: int) -> None:
    """Every 2-D weight under the MLP (experts, shared experts, routers, their gates) reads the normed residual,
    except the down projections, which write it."""
    gain = _take_gain(layer.get_submodule(layout.mlp_norm))
    for name, module in layer.get_submodule(layout.mlp).named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or "weight" not in module._parameters:
            continue
        if weight.dim() != 2:
            raise UserError(f"rotate: {layout.mlp}.{name} holds a {weight.dim()}-D weight; rotate handles one "
                            "matrix per linear (experts as separate linears)")
        if name.rpartition(".")[2] in MLP_WRITERS:
            _set(weight, rotate_rows(weight, residual))
            bias = getattr(module, "bias", None)
            if bias is not None:
                _set(bias, rotate_rows(bias, residual))
        elif weight.shape[1] == hidden:
            _set(weight, rotate_columns(weight, residual, gain))
        else:
            raise UserError(f"rotate: {layout.mlp}.{name} neither reads the residual stream ({hidden} inputs) nor is "
                            f"a down projection ({', '.join(MLP_WRITERS)}); its rotation is unknown")


def _rotate_outside_layers(model: nn.Module, residual: torch.Tensor) -> None:
    """Embedding rows E Q; the head takes the final norm's gain, then W Q. Row chunks keep memory at one chunk."""
    causal_lm: Any = model  # a transformers PreTrainedModel
    embedding = _tensor(causal_lm.get_input_embeddings(), "weight")
    gain = _take_gain(model.get_submodule(_final_norm_name(model)))
    head = _tensor(causal_lm.get_output_embeddings(), "weight")
    for start in range(0, embedding.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        _set(embedding, rotate_columns(embedding[rows], residual), rows)
    for start in range(0, head.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        _set(head, rotate_columns(head[rows], residual, gain), rows)


def _final_norm_name(model: nn.Module) -> str:
    base = getattr(model, "base_model_prefix", "model")
    return f"{base}.norm"


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    return cast(torch.Tensor, getattr(module, name))


def _take_gain(norm: nn.Module) -> torch.Tensor:
    """The RMSNorm's per-channel gain (float64), which the norm then gives up (its weight becomes 1)."""
    weight = cast(torch.Tensor, norm.weight)
    if getattr(norm, "bias", None) is not None:
        raise UserError(f"rotate: {type(norm).__name__} has a bias, which a rotation would move off the residual")
    gain = weight.detach().to(torch.float64).clone()
    weight.data.fill_(1.0)
    return gain


def _set(target: torch.Tensor, value: torch.Tensor, rows: slice | None = None) -> None:
    """Write a float64 result into a parameter (or its rows), in the parameter's own dtype and device."""
    data = target.data if rows is None else target.data[rows]
    data.copy_(value.to(dtype=data.dtype, device=data.device))
