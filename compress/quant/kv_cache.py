"""A quantized KV cache inside attention, through transformers' attention-interface registry.

Attention modules of transformers' current families compute q/k/v, apply RoPE, update the cache and then call
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, ...)`: the key and value states
there are exactly what the cache stores (after RoPE; all positions, cached or new). `route_through_kv_hook`
registers `compress-kv:<original>` (the original implementation, with its mask function) and points the module's
config at it; the registered function fake-quantizes key and value with the module's `KVCacheQuant` (an attribute,
not a buffer, so state dicts are unchanged) and calls the original. A module without one passes through untouched,
which is also how calibration observes: `KVCacheQuant.observe` sees the states instead.

Quantizing every position at each call equals quantizing once when stored: with a fixed scale, the fake
quantization of a value already on the grid is that value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from compress.quant.element_float import fake_quantize_fp8

ATTRIBUTE = "_compress_kv_cache"
PREFIX = "compress-kv:"

Observe = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class KVCacheQuant:
    """One attention module's KV-cache quantization: scales of shape (1,) (per tensor) or (kv_heads, 1, 1) (per
    head, broadcast against (batch, kv_heads, positions, head_dim)); or, while calibrating, an `observe` callback."""

    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    observe: Observe | None = None
    calls: int = 0  # how often attention handed this module's states over: 0 after a forward means no hook applies

    def apply(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.observe is not None:
            self.observe(key, value)
        if self.k_scale is None or self.v_scale is None:
            return key, value
        return (fake_quantize_fp8(key, self.k_scale.to(key.device)),
                fake_quantize_fp8(value, self.v_scale.to(value.device)))


def _original_function(module: nn.Module, original: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    # "eager" is not in the registry: each family's attention falls back to its own module's eager function
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise LookupError(f"no attention function {original!r} for {type(module).__name__}")
    return eager


def _hooked(original: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  *args: Any, **kwargs: Any) -> Any:
        state: KVCacheQuant | None = getattr(module, ATTRIBUTE, None)
        if state is not None:
            key, value = state.apply(key, value)
        return _original_function(module, original)(module, query, key, value, *args, **kwargs)

    return attention


def route_through_kv_hook(config: Any) -> None:
    """Point `config` (a model's, shared by its attention modules) at the hooked copy of its attention function."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = config._attn_implementation
    if current.startswith(PREFIX):
        return
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _hooked(current))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name


def attach(module: nn.Module, state: KVCacheQuant) -> KVCacheQuant:
    object.__setattr__(module, ATTRIBUTE, state)  # a plain attribute: nn.Module would not register a dataclass anyway
    return state


def kv_state(module: nn.Module) -> KVCacheQuant | None:
    return getattr(module, ATTRIBUTE, None)


def per_group_rows(states: torch.Tensor, strategy: str) -> torch.Tensor:
    """(batch, kv_heads, positions, head_dim) states as an observer's (groups, n): one group, or one per head."""
    if strategy == "head":
        return states.transpose(0, 1).reshape(states.shape[1], -1)
    return states.reshape(1, -1)


def scale_shape(strategy: str, groups: int) -> tuple[int, ...]:
    """compressed-tensors' k_scale/v_scale shape: (1,) per tensor, (kv_heads, 1, 1) per head (`attn_head`)."""
    return (groups, 1, 1) if strategy == "head" else (1,)


def install_kv_cache(fqn: str, module: nn.Module, settings: dict[str, Any], installed: dict[str, dict[str, Any]]) -> None:
    """Attach the scales of `settings` (fqn's entry in `run.results.kv_cache`: strategy, `k_scale` and `v_scale` as
    lists of floats) to an attention module and record them in `installed`; also how a resumed run restores them."""
    shape = scale_shape(settings["strategy"], len(settings["k_scale"]))
    route_through_kv_hook(module.config)
    state = kv_state(module) or attach(module, KVCacheQuant())
    state.k_scale = torch.tensor(settings["k_scale"], dtype=torch.float32).reshape(shape)
    state.v_scale = torch.tensor(settings["v_scale"], dtype=torch.float32).reshape(shape)
    installed[fqn] = settings
