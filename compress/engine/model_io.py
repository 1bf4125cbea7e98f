"""Loading a causal LM safely and finding its decoder layers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from pathlib import Path

import torch
from torch import nn

from compress.recipe.errors import UserError

if TYPE_CHECKING:
    from compress.engine.lazy import LazyWeights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Where the decoder-layer list lives in the families we test (Llama, Mistral, Qwen2, OPT, GPT-2, NeoX);
# other models fall back to the longest ModuleList of identical blocks.
KNOWN_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")


@dataclass
class ModelHandle:
    """A loaded model plus what the engine needs to walk it layer by layer."""

    model: nn.Module
    tokenizer: object
    name: str
    layers_prefix: str  # fully qualified name of the decoder-layer ModuleList, e.g. "model.layers"
    device: torch.device  # where the layer being processed (and evaluation) runs
    checkpoint_dtype: torch.dtype  # precision the weights are stored in, which may differ from the compute dtype
    lazy: LazyWeights | None = None  # set by compress.engine.lazy.load_lazy: parameters live on `meta` until a layer is needed
    max_memory: dict[str, str] | None = None  # evaluation: accelerate device map budget per device ("0", "cpu")

    @property
    def layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.model.get_submodule(self.layers_prefix))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' was requested but CUDA is not available on this machine")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype | str:
    if requested != "auto":
        return DTYPES[requested]
    # Half precision on CPU is slow and loses accuracy in matmuls; the checkpoint's own dtype is right on GPU.
    return torch.float32 if device.type == "cpu" else "auto"


def find_decoder_layers(model: nn.Module) -> str:
    """Qualified name of the ModuleList that holds the decoder layers."""
    names = dict(model.named_modules())
    for path in KNOWN_LAYER_PATHS:
        if isinstance(names.get(path), nn.ModuleList):
            return path
    candidates = [
        (len(module), name)
        for name, module in names.items()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise UserError(
            f"{type(model).__name__} is not supported: no list of decoder layers found in it. compress walks causal "
            f"LMs layer by layer and supports models whose decoder layers are an nn.ModuleList at one of "
            f"{', '.join(KNOWN_LAYER_PATHS)} (Llama, Mistral, Qwen2, OPT, GPT-2, GPT-NeoX and similar), or any "
            "model with a ModuleList of identical blocks"
        )
    return max(candidates)[1]


def load_model(
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load a causal LM and its tokenizer from a local folder or hub id, on the CPU.

    Only safetensors weights are read unless `allow_pickle` (pickle can run arbitrary code); remote code
    runs only with `trust_remote_code`. Layers move to `device` one at a time during compression.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Our own progress display and report cover loading; transformers' bars would interleave on stderr.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    compute_device = pick_device(device)
    local = Path(ref)
    if local.is_dir():
        _check_local_weights(local, allow_pickle)
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in ref and not local.exists():
        raise UserError(f"model '{ref}' is neither a local folder nor reachable: offline mode is on (HF_HUB_OFFLINE=1)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref,
            dtype=pick_dtype(dtype, compute_device),
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            low_cpu_mem_usage=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model '{ref}': {exc}") from exc
    stored_dtype = _stored_dtype(model)  # read before anything rewrites config.dtype
    from compress.engine.moe import unfuse_experts

    unfuse_experts(model)  # fused MoE experts become nn.Linears, so quantizers do not skip them silently
    model.eval()
    model.config.use_cache = False
    return ModelHandle(model, tokenizer, ref, find_decoder_layers(model), compute_device, stored_dtype)


def _stored_dtype(model: nn.Module) -> torch.dtype:
    """The checkpoint's dtype from its config.json (transformers overwrites config.dtype with the load dtype)."""
    from transformers import PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(str(model.name_or_path))
    declared = raw.get("dtype") or raw.get("torch_dtype")
    return DTYPES.get(str(declared), next(model.parameters()).dtype)


def _check_local_weights(folder: Path, allow_pickle: bool) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if not allow_pickle:
            raise UserError(
                f"{folder} has only pickle weights (*.bin/*.pt), which can run arbitrary code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the source."
            )
        return
    raise UserError(f"{folder} holds no model weights (*.safetensors)")
