"""Loading a causal LM safely and finding its decoder layers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, cast
from pathlib import Path

import torch
from torch import nn

from compress.engine.eager import EagerWeights
from compress.engine.families import check_supported_family
from compress.recipe.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Where the decoder-layer list lives in the families we test (Llama, Mistral, Qwen2, OPT, GPT-2, NeoX);
# other models fall back to the longest ModuleList of identical blocks.
KNOWN_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")


LayerWritten = Callable[[int, str, nn.Module], None]  # (index, prefix, layer), e.g. a streaming export's writer


class ModelWeights(Protocol):
    """Where a model's parameters live between uses, and what each step of a run does about it.

    Two kinds: `EagerWeights` (compress/engine/eager.py: all in host memory, saved at the end of the run) and
    `LazyWeights` (compress/engine/lazy.py: on `meta`, read one decoder layer at a time from memory-mapped shards,
    each finished layer written to the output shards and freed). Callers go through `ModelHandle`'s methods
    and never ask which kind they have.
    """

    # True when each finished layer goes to the output shards and leaves memory (lazy): the run cannot save the
    # model, or export its codes, at the end, so an export is packed layer by layer through `on_layer_written`.
    saves_layers_as_they_finish: bool
    on_layer_written: LayerWritten | None  # called for each finished layer, before it is put away

    def bring_in(self, handle: ModelHandle, index: int, device: torch.device) -> nn.Module: ...

    def put_away(self, handle: ModelHandle, index: int) -> None: ...

    def layer_done(self, handle: ModelHandle, index: int) -> bool: ...

    def outside_layers_on(self, handle: ModelHandle, device: torch.device, *,
                          with_head: bool = True) -> contextlib.AbstractContextManager[None]: ...

    def runnable_on(self, handle: ModelHandle, device: torch.device) -> contextlib.AbstractContextManager[None]: ...

    def outside_tensors(self, handle: ModelHandle) -> Iterator[tuple[str, torch.Tensor]]: ...

    def finish(self, handle: ModelHandle) -> Path | None: ...

    def weights_digest(self, handle: ModelHandle) -> str: ...


@dataclass
class ModelHandle:
    """A loaded model plus what the engine needs to walk it layer by layer."""

    model: nn.Module
    tokenizer: object
    name: str
    layers_prefix: str  # fully qualified name of the decoder-layer ModuleList, e.g. "model.layers"
    device: torch.device  # where the layer being processed (and evaluation) runs
    checkpoint_dtype: torch.dtype  # precision the weights are stored in, which may differ from the compute dtype
    # in host memory (load_model) or read layer by layer from the shards (compress.engine.lazy.load_lazy)
    weights: ModelWeights = field(default_factory=EagerWeights)
    max_memory: dict[str, str] | None = None  # evaluation: accelerate device map budget per device ("0", "cpu")

    @property
    def layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.model.get_submodule(self.layers_prefix))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- delegated to `weights` -------------------------------------------------------------------

    def bring_in(self, index: int, device: torch.device) -> nn.Module:
        """Decoder layer `index`, with its weights, on `device`."""
        return self.weights.bring_in(self, index, device)

    def put_away(self, index: int) -> None:
        """Decoder layer `index` is not needed for now (unchanged): off the compute device."""
        self.weights.put_away(self, index)

    def layer_done(self, index: int) -> bool:
        """Decoder layer `index` is compressed: off the compute device, and (lazy) written to the output shards.

        Returns True when the layer has left memory, so what was kept only for saving it at the end (its
        quantization codes) can go too.
        """
        return self.weights.layer_done(self, index)

    def outside_layers_on(self, device: torch.device, *,
                          with_head: bool = True) -> contextlib.AbstractContextManager[None]:
        """For a `with` block: the parameters outside the decoder layers (embeddings, norms, lm_head) on `device`.

        with_head=False allows leaving a lm_head that no forward will reach where it is (a lazy model's stays on
        `meta`: for a 128k vocabulary it is 2 GB in float32).
        """
        return self.weights.outside_layers_on(self, device, with_head=with_head)

    def runnable_on(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        """For a `with` block: the whole model runnable on `device` (evaluation), put back afterwards."""
        return self.weights.runnable_on(self, device)

    def outside_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors outside the decoder layers, one at a time, tied ones once (a streaming export's last shards)."""
        return self.weights.outside_tensors(self)

    def finish_saving(self) -> Path | None:
        """Complete what was saved layer by layer into a loadable folder (lazy) and return it; None when nothing
        was (eager: the runner saves the model from memory)."""
        return self.weights.finish(self)

    def weights_digest(self) -> str:
        """SHA-256 of the weights, from memory or (once written layer by layer) from the written shards."""
        return self.weights.weights_digest(self)


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
    check_supported_family(ref)  # before any weight is read: an unproven family is refused by name
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
