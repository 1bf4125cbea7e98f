"""Loading a causal LM safely and finding its decoder layers."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, cast
from pathlib import Path

import torch
from torch import nn

from compress.engine.checkpoint_files import INDEX_NAME, describe_names, stored_tensors
from compress.engine.eager import EagerWeights
from compress.engine.families import check_supported_family
from compress.recipe.errors import UserError
from compress.recipe.model_ref import ModelRef, offline_hub_problem

log = logging.getLogger("compress")

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
    # what `strict_weights=False` let through (missing, unexpected or reshaped tensors): the report lists it
    load_notes: list[dict[str, Any]] = field(default_factory=list)

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
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{requested}' was requested but CUDA is not available on this machine")
        index = torch.device(requested).index
        if index is not None and index >= torch.cuda.device_count():
            raise UserError(f"device '{requested}' was requested but this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' was requested but MPS (Apple silicon) is not available on this machine")
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


@dataclass(frozen=True)
class PositionsNeeded:
    """A sequence length some part of the run feeds the model, and where it was asked for (for the message)."""

    tokens: int
    where: str  # e.g. "recipe.yaml:4 calibration.seq_len" or "--seq-len"


POSITION_LIMITS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def max_positions(config: Any) -> tuple[int, str] | None:
    """The most positions the model was built for, and the config key that says so; None when it declares none.

    With rope scaling the config's max_position_embeddings is already the scaled limit (Llama 3.1: 131,072).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_LIMITS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_positions(config: Any, needs: Sequence[PositionsNeeded], ref: str) -> None:
    """Refuse sequence lengths beyond the model's positions: past them a model reads garbage, and the metric with it."""
    limit = max_positions(config)
    if limit is None:
        return
    too_long = [need for need in needs if need.tokens > limit[0]]
    if too_long:
        lines = [f"{need.where}: {need.tokens} tokens, but model '{ref}' has {limit[0]} positions "
                 f"({limit[1]} in its config.json); use at most {limit[0]}" for need in too_long]
        raise UserError("sequence longer than the model's positions:\n  " + "\n  ".join(lines))


def load_model(
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    strict_weights: bool = True,
    positions: Sequence[PositionsNeeded] = (),
    local_candidate: Path | None = None,
) -> ModelHandle:
    """Load a causal LM and its tokenizer from a local folder or hub id, on the CPU.

    local_candidate: where a folder named `ref` was looked for (a recipe's folder + ref) when `ref` is a hub id,
    so that a hub id missing offline is reported with both readings; default: `ref` under the current folder.

    Only safetensors weights are read unless `allow_pickle` (pickle can run arbitrary code); remote code
    runs only with `trust_remote_code`. Layers move to `device` one at a time during compression.

    Nothing is loaded silently wrong: the config is read first and `positions` checked against it; a local
    folder's safetensors headers are checked before transformers opens them (compress/engine/checkpoint_files.py);
    tensors missing from the checkpoint (which transformers would initialise randomly), left over in it (dropped)
    or of another shape are a UserError naming them, unless `strict_weights=False` (then they are logged and kept
    in `handle.load_notes`); and no weight may hold NaN or Inf.
    """
    import transformers

    # Our own progress display and report cover loading; transformers' bars would interleave on stderr.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    compute_device = pick_device(device)
    local = Path(ref)
    if not local.is_dir():
        problem = offline_hub_problem(ModelRef(ref, (local_candidate or local).absolute(), hub_id=ref))
        if problem:  # said now, without transformers' network attempts and its message about repo names
            raise UserError(problem)
    # What the config alone can refuse is refused before gigabytes of weights are read.
    config = read_config(ref, trust_remote_code)
    if local.is_dir():
        _check_local_weights(local, allow_pickle)
    check_supported_family(ref, config.to_dict())  # an unproven family is refused by name
    check_positions(config, positions, ref)
    model, info, tokenizer = _from_pretrained(ref, config, pick_dtype(dtype, compute_device), allow_pickle,
                                              trust_remote_code)
    notes = accept_loading_problems(loading_problems(info), type(model).__name__, ref, strict_weights,
                                    names_differ=bool(info.get("missing_keys") and info.get("unexpected_keys")))
    check_finite(model.named_parameters(), ref)
    stored_dtype = _stored_dtype(model)  # read before anything rewrites config.dtype
    from compress.engine.moe import unfuse_experts

    unfuse_experts(model)  # fused MoE experts become nn.Linears, so quantizers do not skip them silently
    model.eval()
    model.config.use_cache = False
    return ModelHandle(model, tokenizer, ref, find_decoder_layers(model), compute_device, stored_dtype,
                       load_notes=notes)


def _from_pretrained(ref: str, config: Any, dtype: torch.dtype | str, allow_pickle: bool,
                     trust_remote_code: bool) -> tuple[Any, dict[str, Any], Any]:
    """transformers' model, its loading info (what did not fit) and the tokenizer."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            ref,
            config=config,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            low_cpu_mem_usage=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # a shape mismatch comes back in `info` (then a UserError), not as a RuntimeError
        )
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model '{ref}': {exc}") from exc
    except SafetensorError as exc:  # a hub download's files are not checked beforehand as a local folder's are
        raise UserError(f"could not load model '{ref}': a safetensors file is damaged ({exc}); re-download it") from exc
    model, info = loaded  # with output_loading_info, (model, info)
    return model, info, tokenizer


def read_config(ref: str, trust_remote_code: bool) -> Any:
    """The model's config, read before any weight (so what it implies can be checked first)."""
    from transformers import AutoConfig

    if Path(ref).is_dir() and not (Path(ref) / "config.json").is_file():
        raise UserError(f"{ref} has no config.json: a model folder needs one beside its weights (save_pretrained writes it)")
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # not JSON, not UTF-8 (a ValueError), unknown model_type, missing file
        raise UserError(f"could not read the config of model '{ref}': {exc}") from exc


def loading_problems(info: dict[str, Any]) -> list[str]:
    """What transformers' loading info says went wrong, one phrase per kind (empty when every tensor fit).

    `info` is from_pretrained's `output_loading_info`: missing_keys (initialised randomly), unexpected_keys
    (dropped) and mismatched_keys (name, checkpoint shape, model shape: initialised randomly too). Tied weights
    and the buffers a class deliberately ignores (rotary inv_freq) are not listed there.
    """
    problems = []
    if info.get("missing_keys"):
        problems.append(f"not in the checkpoint (they would be randomly initialised): {describe_names(list(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"in the checkpoint but not in the model (they would be dropped): "
                        f"{describe_names(list(info['unexpected_keys']))}")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = ", ".join(f"{name} (checkpoint {list(stored)}, config {list(built)})" for name, stored, built in mismatched[:5])
        more = f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""
        problems.append(f"of another shape than config.json gives them: {len(mismatched)} tensors: {shapes}{more}")
    return problems


def accept_loading_problems(problems: list[str], architecture: str, ref: str, strict: bool, *,
                            names_differ: bool) -> list[dict[str, Any]]:
    """Raise on what did not load, unless not `strict`; then return it as fallbacks for the report.

    names_differ: both missing and unexpected tensors, the mark of a `model_type` that builds another class.
    """
    if not problems:
        return []
    hint = " Some tensor names differ: does `model_type` in config.json match the weights?" if names_differ else ""
    if strict:
        raise UserError(
            f"model '{ref}': the checkpoint does not match the {architecture} its config.json describes. Tensors "
            + "; tensors ".join(problems) + "." + hint + " Fix config.json (num_hidden_layers, model_type, sizes) "
            "or the weights; to load anyway, set `strict_weights: false` in the recipe (`--no-strict-weights` for "
            "compress eval)."
        )
    for problem in problems:
        log.warning("model %s loaded with strict_weights off: tensors %s", ref, problem)
    return [{"pass": "load", "module": ref, "fallback": "strict_weights: false", "reason": f"tensors {problem}"}
            for problem in problems]


CHECK_CHUNK = 1 << 22  # elements per isfinite(): a 4 MB temporary, not a bool copy of a 1 GB embedding


def non_finite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a tensor, read in chunks; (0, 0) for integer tensors or finite ones."""
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return 0, 0
    flat = tensor.detach().reshape(-1)
    if all(bool(torch.isfinite(flat[i:i + CHECK_CHUNK]).all()) for i in range(0, flat.numel(), CHECK_CHUNK)):
        return 0, 0
    nan = sum(int(torch.isnan(flat[i:i + CHECK_CHUNK]).sum()) for i in range(0, flat.numel(), CHECK_CHUNK))
    inf = sum(int(torch.isinf(flat[i:i + CHECK_CHUNK]).sum()) for i in range(0, flat.numel(), CHECK_CHUNK))
    return nan, inf


def check_finite(named: Iterable[tuple[str, torch.Tensor]], ref: str) -> None:
    """Refuse a model with NaN or Inf in any weight: every later number would be NaN or a silent wrong result."""
    for name, tensor in named:
        nan, inf = non_finite_counts(tensor)
        if nan or inf:
            raise UserError(f"model '{ref}': {name} holds {nan} NaN and {inf} Inf values (of {tensor.numel()}); the "
                            "checkpoint is damaged or overflowed its dtype: re-download or re-save it")


def _stored_dtype(model: nn.Module) -> torch.dtype:
    """The checkpoint's dtype from its config.json (transformers overwrites config.dtype with the load dtype)."""
    from transformers import PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(str(model.name_or_path))
    declared = raw.get("dtype") or raw.get("torch_dtype")
    return DTYPES.get(str(declared), next(model.parameters()).dtype)


def _check_local_weights(folder: Path, allow_pickle: bool) -> None:
    if any(folder.glob("*.safetensors")) or (folder / INDEX_NAME).exists():
        stored_tensors(folder)  # every header checked against its file: a UserError naming a corrupt one
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if not allow_pickle:
            raise UserError(
                f"{folder} has only pickle weights (*.bin/*.pt), which can run arbitrary code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the source."
            )
        return
    raise UserError(f"{folder} holds no model weights (*.safetensors)")
