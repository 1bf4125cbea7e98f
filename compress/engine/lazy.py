"""Models larger than host memory: build on the `meta` device, materialise one decoder layer at a time.

`load_lazy` builds the model skeleton with accelerate's `init_empty_weights` (parameters on `meta`, no memory)
and keeps a map from each tensor name to the safetensors shard that holds it. The engine then asks for one
decoder layer at a time (`bring_in`): its tensors are read from the memory-mapped shards, converted to the
compute dtype and placed on the compute device; when the layer's passes are done, `layer_done` writes it to
the output shards (see compress/engine/shards.py) and puts it back on `meta`. The tensors outside the decoder
layers (embeddings, final norm, lm_head) are materialised only while a forward pass needs them. `LazyWeights` is
the handle's `ModelWeights`, with the same methods as `EagerWeights` (compress/engine/eager.py).

Peak host memory is therefore one layer (in the compute dtype) plus the embeddings while inputs are captured
plus the calibration activations, never the model. Evaluation streams the layers the same way.

Scope: the checkpoint's tensor names must be the model's own parameter names (true for Llama, Mistral, Qwen2,
OPT, GPT-2 and most dense decoders); checkpoints that need transformers' load-time key conversion are refused
up front, and only layer passes (no whole-model passes) can run on a lazy model. Tied embeddings
(`tie_word_embeddings`: Llama-3.2-1B/3B, Qwen2.5's small models, Gemma, the demo model) are tied as
`from_pretrained` ties them (`tie_as_from_pretrained`): lm_head.weight is the input embedding's one parameter, read
once per evaluation or input capture, and the output stores it once, so it reloads tied. An untied model whose checkpoint lacks
lm_head.weight is still refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

import torch
from torch import nn

from compress.recipe.errors import UserError
from compress.engine.digest import shards_digest, weights_digest
from compress.engine.checkpoint_files import StoredTensor, describe_names, stored_tensors
from compress.engine.families import check_supported_family
from compress.engine.model_io import (
    DTYPES,
    ModelHandle,
    PositionsNeeded,
    accept_loading_problems,
    check_finite,
    check_positions,
    find_decoder_layers,
    pick_device,
    pick_dtype,
    read_config,
)
from compress.engine.shards import ShardWriter

OUTSIDE_SHARD = "model-outside.safetensors"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when there is one, else from every shard's header.

    Every header is checked against its file first (compress/engine/checkpoint_files.py).
    """
    return {name: stored.file for name, stored in _shard_tensors(folder).items()}


def _shard_tensors(folder: Path) -> dict[str, StoredTensor]:
    found = stored_tensors(folder, every_file=True)
    if not found:
        raise UserError(f"{folder} holds no model weights (*.safetensors); lazy loading reads safetensors shards only")
    return found


def _tied_groups(module: nn.Module, skip_prefix: str | None = None) -> list[list[str]]:
    """Parameter names grouped by the tensor they share (tied embeddings give one group of two names).

    skip_prefix: leave out parameters under this module name (the decoder layers, when only the rest is wanted).
    """
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if skip_prefix is not None and name.startswith(skip_prefix + "."):
            continue
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def _assign(root: nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    """Make every name in `names` one shared parameter holding `tensor` (tied names stay tied)."""
    param = nn.Parameter(tensor, requires_grad=False)
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        (root.get_submodule(owner_name) if owner_name else root)._parameters[attr] = param


class LazyWeights:
    """Where each tensor of a meta-device model currently lives on disk, and the writer for finished layers."""

    saves_layers_as_they_finish = True  # finished layers go to `writer` and leave memory

    def __init__(self, source: dict[str, Path], compute_dtype: torch.dtype, save_dtype: torch.dtype,
                 writer: ShardWriter | None):
        self.source = source  # tensor name -> shard; a layer's entries move to the output once it is written
        self.compute_dtype = compute_dtype
        self.save_dtype = save_dtype
        self.writer = writer
        self.loaded_bytes_peak = 0  # largest set of tensors materialised at once (for the report)
        # called with (index, prefix, layer) for each finished layer before it is freed: a streaming export
        self.on_layer_written: Callable[[int, str, nn.Module], None] | None = None
        self.written: Path | None = None  # the finished output folder, once `finish` wrote its index
        self.checked: set[str] = set()  # tensors read from the input checkpoint and found free of NaN/Inf

    def _check_finite_once(self, name: str, tensor: torch.Tensor) -> None:
        """A decoder layer's tensors are first read when its turn comes: checked then, as eager loading checks all."""
        if name not in self.checked:
            check_finite([(name, tensor)], str(self.source[name]))
            self.checked.add(name)

    # --- reading and freeing ---------------------------------------------------------------------

    def read(self, names: list[str], device: torch.device, *, convert: bool = True) -> dict[str, torch.Tensor]:
        """Read tensors from their shards (one open per file), converted to the compute dtype on `device`.

        Each file is opened and closed per call so the memory map does not keep pages resident afterwards.
        """
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.source[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in file_names:
                    raw = handle.get_tensor(name)
                    self._check_finite_once(name, raw)
                    if convert:
                        raw = raw.to(device, self.compute_dtype if raw.is_floating_point() else raw.dtype)
                    tensors[name] = raw
        return tensors

    def materialize(self, root: nn.Module, prefix: str, device: torch.device,
                    groups: list[list[str]] | None = None) -> None:
        """Give the parameters of `root` (named `prefix.*` in the checkpoint) their real values on `device`."""
        groups = _tied_groups(root) if groups is None else groups
        stored = [next((n for n in g if self._key(prefix, n) in self.source), None) for g in groups]
        missing = [g[0] for g, name in zip(groups, stored) if name is None]
        if missing:
            raise UserError(f"lazy loading: no tensor for {self._key(prefix, missing[0])} in the checkpoint")
        tensors = self.read([self._key(prefix, cast(str, n)) for n in stored], device)
        self.loaded_bytes_peak = max(self.loaded_bytes_peak, sum(t.numel() * t.element_size() for t in tensors.values()))
        for group, name in zip(groups, stored):
            _assign(root, group, tensors.pop(self._key(prefix, cast(str, name))))

    @staticmethod
    def free(root: nn.Module, groups: list[list[str]] | None = None) -> None:
        """Put the parameters back on `meta`, releasing their memory (shapes and dtypes stay)."""
        for group in _tied_groups(root) if groups is None else groups:
            _assign(root, group, torch.empty_like(root.get_parameter(group[0]), device="meta"))
        return_freed_memory()

    @staticmethod
    def _key(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    # --- decoder layers ----------------------------------------------------------------------------

    def bring_in(self, handle: ModelHandle, index: int, device: torch.device) -> nn.Module:
        layer = cast(nn.Module, handle.layers[index])
        self.materialize(layer, f"{handle.layers_prefix}.{index}", device)
        return layer

    def put_away(self, handle: ModelHandle, index: int) -> None:
        """Free layer `index` unchanged: it is read from its shard again when needed."""
        self.free(cast(nn.Module, handle.layers[index]))

    def layer_done(self, handle: ModelHandle, index: int) -> bool:
        """Write layer `index` to the output shards (read from there from now on), then free it.

        Returns True: the layer left memory."""
        layer = cast(nn.Module, handle.layers[index])
        if self.writer is not None:
            prefix = f"{handle.layers_prefix}.{index}"
            tensors = {f"{prefix}.{name}": p.data.to(self.save_dtype) for name, p in layer.named_parameters()}
            path = self.writer.write(f"model-layer-{index:05d}.safetensors", tensors)
            self.source.update({name: path for name in tensors})
            if self.on_layer_written is not None:
                self.on_layer_written(index, prefix, layer)
        self.free(layer)
        return True

    # --- everything outside the decoder layers -----------------------------------------------------

    @contextlib.contextmanager
    def outside_layers_on(self, handle: ModelHandle, device: torch.device, *, with_head: bool = True) -> Iterator[None]:
        """Materialise the parameters outside the decoder layers on `device` for the duration of the block.

        with_head=False leaves an untied lm_head on `meta`: capturing layer 0's inputs never reaches it, and for
        a 128k vocabulary it is 2 GB in float32.
        """
        groups = _tied_groups(handle.model, skip_prefix=handle.layers_prefix)
        if not with_head:
            head = _output_embedding_prefix(handle.model)
            if head is not None:
                groups = [g for g in groups if not all(n.startswith(head + ".") for n in g)]
        self.materialize(handle.model, "", device, groups)
        try:
            yield
        finally:
            self.free(handle.model, groups)

    @contextlib.contextmanager
    def runnable_on(self, handle: ModelHandle, device: torch.device) -> Iterator[None]:
        """Make the whole model runnable for evaluation: each layer is read just before its forward and freed after."""
        prefix = handle.layers_prefix
        hooks = []
        for index, layer in enumerate(handle.layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda module, _args, index=index: self.materialize(module, f"{prefix}.{index}", device)))
            hooks.append(layer.register_forward_hook(lambda module, _args, _out: self.free(module)))
        try:
            with self.outside_layers_on(handle, device):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            for layer in handle.layers:  # an exception mid-forward may leave one layer loaded
                self.free(layer)

    def outside_tensors(self, handle: ModelHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors outside the decoder layers, one at a time in their stored dtype; tied ones once, by the
        name the model lists first (as `unique_state_dict` keeps them)."""
        for group in _tied_groups(handle.model, skip_prefix=handle.layers_prefix):
            stored = next((name for name in group if name in self.source), None)
            if stored is not None:
                yield group[0], self.read([stored], torch.device("cpu"), convert=False)[stored]

    def finish(self, handle: ModelHandle) -> Path | None:
        """Write the tensors outside the layers, the config and the tokenizer, then the index: a loadable folder."""
        if self.writer is None:
            return None
        # One shard per tensor, copied in its stored dtype: a 128k-vocabulary embedding is 1 GB in bf16 but
        # 2 GB in float32, and embeddings plus lm_head at once would be the run's peak. A tied head is not
        # written: the embedding is stored once, as save_pretrained stores a tied model, and from_pretrained ties
        # lm_head to it again (config.json keeps tie_word_embeddings).
        for number, (name, tensor) in enumerate(self.outside_tensors(handle)):
            self.writer.write(OUTSIDE_SHARD.replace(".safetensors", f"-{number:03d}.safetensors"),
                              {name: tensor.to(self.save_dtype)})
            del tensor
        config: Any = handle.model.config
        config.dtype = self.save_dtype
        config.save_pretrained(self.writer.folder)
        generation = getattr(handle.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.writer.folder)
        save_tokenizer = getattr(handle.tokenizer, "save_pretrained", None)
        if save_tokenizer is not None:
            save_tokenizer(self.writer.folder)
        index = self.writer.finish()
        self.written = index.parent
        return index

    def weights_digest(self, handle: ModelHandle) -> str:
        """The digest of what `finish` wrote, one tensor at a time: the model itself is on `meta` by now."""
        if self.written is None:
            return weights_digest(handle.model)
        return shards_digest(self.written)


def return_freed_memory() -> None:
    """Give the host memory freed with a layer back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    glibc serves allocations below its mmap threshold from its heaps, and raises that threshold (up to 32 MB)
    each time a larger block is freed, so a layer's 4-16 MB tensors come from the heaps; freed there, they stay
    in the process. A lazy GPTQ run over 40 layers of a 2048-wide model peaked at 3.95 GiB RSS without this,
    1.04 GiB with it (0.87 GiB with the threshold pinned by MALLOC_MMAP_THRESHOLD_), and 290 such layers
    reached 19.5 GiB: memory grew with the model, not with a layer.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def resolve_local(ref: str) -> Path:
    """A local folder, or the cached snapshot of a hub id (downloaded when online)."""
    local = Path(ref)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, missing repo, auth: all mean "not available" to the user
        raise UserError(f"lazy loading needs the checkpoint on disk: could not find '{ref}' ({exc})") from exc


def load_lazy(
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    save_to: Path | None = None,
    strict_weights: bool = True,
    positions: Sequence[PositionsNeeded] = (),
) -> ModelHandle:
    """Build the model on `meta` and return a handle whose `weights` read layers from the shards on demand.

    save_to: the folder the compressed layers are written to as they finish (see compress/engine/shards.py).
    The checks of `load_model` apply, against the shards' headers: positions, corrupt files, missing, unexpected
    or reshaped tensors (only unexpected ones can be let through with `strict_weights=False`: there is nothing
    to read for a missing one), and NaN/Inf: in the tensors outside the layers now, in each layer's when it is read.
    """
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    folder = resolve_local(ref)
    compute_device = pick_device(device)
    config = read_config(str(folder), trust_remote_code)
    check_supported_family(ref, config.to_dict())  # as load_model: an unproven family is refused by name
    check_positions(config, positions, ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model '{ref}': {exc}") from exc
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = DTYPES.get(str(declared).replace("torch.", ""), torch.float32)
    picked = pick_dtype(dtype, compute_device)
    compute_dtype = stored if picked == "auto" else cast(torch.dtype, picked)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    tensors = _shard_tensors(folder)
    tie_as_from_pretrained(model, tensors)
    notes = _check_names(model, tensors, ref, strict_weights)
    lazy = LazyWeights({name: t.file for name, t in tensors.items()}, compute_dtype, stored,
                       ShardWriter(save_to) if save_to is not None else None)
    handle = ModelHandle(model, tokenizer, ref, find_decoder_layers(model), compute_device, stored, weights=lazy,
                         load_notes=notes)
    # NaN/Inf: the embeddings, final norm and head are checked now, read one at a time and dropped (a layer's
    # tensors are checked when the layer is first read; reading the whole checkpoint here would double the I/O).
    for _name, _tensor in lazy.outside_tensors(handle):
        pass
    return handle


def tie_as_from_pretrained(model: nn.Module, stored: dict[str, StoredTensor]) -> None:
    """Tie the parameters transformers ties (with `tie_word_embeddings`, lm_head.weight is the input embedding).

    `init_empty_weights` undoes the ties the model's `post_init` made: under it every `register_parameter` puts a
    new meta Parameter in place, so a tied head becomes a parameter of its own that the checkpoint has no tensor
    for. `tie_weights`, called outside it, ties again by the model's own mapping (`_tied_weights_keys`, honouring
    config.tie_word_embeddings), so an untied model keeps its own lm_head and is refused when that is missing. As
    from_pretrained does, a checkpoint that stores both names with different values is left untied: each name
    reads its own tensor, never the other's.
    """
    cast(Any, model).tie_weights()  # every transformers model has it
    for group in _tied_groups(model):
        names_stored = [name for name in group if name in stored]
        if len(names_stored) > 1 and not _stored_equal(stored, names_stored):
            for name in group:
                _assign(model, [name], torch.empty_like(model.get_parameter(name), device="meta"))


def _stored_equal(stored: dict[str, StoredTensor], names: list[str]) -> bool:
    """Whether the checkpoint holds the same values under every one of `names` (two tensors in memory at a time)."""
    from safetensors import safe_open

    def value(name: str) -> torch.Tensor:
        with safe_open(str(stored[name].file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    first = value(names[0])
    return all(torch.equal(first, value(name)) for name in names[1:])


def _output_embedding_prefix(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


def _check_names(model: nn.Module, stored: dict[str, StoredTensor], ref: str, strict: bool) -> list[dict[str, Any]]:
    """Every parameter (or one name of each tied group) must be stored under its own name with its own shape.

    Returns the report's fallbacks for unexpected tensors let through by `strict=False`.
    """
    groups = _tied_groups(model)
    missing = [g[0] for g in groups if not any(n in stored for n in g)]
    if missing:
        head = _output_embedding_prefix(model)
        untied = (f" config.json leaves the head untied (tie_word_embeddings: false), so {head}.weight needs a "
                  "tensor of its own; if the head is meant to be the input embedding, set tie_word_embeddings: true."
                  if head is not None and f"{head}.weight" in missing else "")
        raise UserError(
            f"model '{ref}': lazy loading found no tensor for {describe_names(missing)} in the checkpoint.{untied} "
            "Check config.json (num_hidden_layers, model_type) against the weights; a checkpoint whose names need "
            "transformers' key conversion loads without `lazy`."
        )
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    mismatched = sorted((name, stored[name].shape, shape) for name, shape in shapes.items()
                        if name in stored and stored[name].shape != shape)
    if mismatched:
        shown = ", ".join(f"{n} (checkpoint {list(a)}, config {list(b)})" for n, a, b in mismatched[:5])
        raise UserError(f"model '{ref}': {len(mismatched)} tensors are of another shape than config.json gives "
                        f"them: {shown}{' and more' if len(mismatched) > 5 else ''}. Fix config.json or the weights.")
    expected = set(shapes) | {name for name, _ in model.named_buffers()}
    # what transformers' own loader ignores (see PreTrainedModel._adjust_missing_and_unexpected_keys)
    patterns = [r"rotary_emb\.inv_freq", r"(^|\.)position_ids$", *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    ignored = re.compile("|".join(patterns))
    unexpected = [name for name in stored if name not in expected and not ignored.search(name)]
    problems = [f"in the checkpoint but not in the model (they would be dropped): {describe_names(unexpected)}"] \
        if unexpected else []
    return accept_loading_problems(problems, type(model).__name__, ref, strict, names_differ=False)
