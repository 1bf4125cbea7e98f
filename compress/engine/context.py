"""State that one run owns and its passes share, in four parts with one direction each.

- `RunInputs`: what every pass reads and none writes (device, calibration windows, reporter, checkpointing).
- `Handoff`: what a pass hands the passes after it (bit plan, pruning masks, per-layer sparsity).
- `RunResults`: what the run collects for report.json, the run folder and the export.
- `RunCache`: values computed once per run and read again (an evaluation text's token ids, a plan file), and the
  user's cache of token ids across runs.

`RunContext` holds the four, so every pass still takes one `run: RunContext`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from compress.engine.activations import OffloadSettings
from compress.engine.cache import Cache, canonical_json, key_of
from compress.engine.data import load_text, text_sha256, tokenize_text, tokenizer_identity
from compress.engine.checkpoint import Checkpointer
from compress.engine.progress import SILENT, Reporter
from compress.quant.bit_plan import PlanEntry, read_plan
from compress.quant.float_records import WeightFormat
from compress.quant.records import WeightRecord
from compress.recipe.errors import UserError

T = TypeVar("T")


@dataclass
class RunInputs:
    """What a pass reads; the caller sets it up before the first pass and no pass writes it.

    - `device`: where the layer being processed (and evaluation) runs.
    - `calibration`: (samples, seq_len) token windows, or None when no pass needs inputs; under torchrun, this
      rank's share of them (compress/engine/distributed.py).
    - `calibration_batch_size`: windows per forward pass while calibrating.
    - `reporter`: progress bars and notes (compress/engine/progress.py); silent by default.
    - `checkpoint`: saves each finished decoder layer so an interrupted run can `--resume` (None: no checkpoints).
    - `offload`: where a sweep keeps its calibration activations (`calibration.offload`;
      compress/engine/activations.py). The default keeps them on the compute device; the runner passes the
      recipe's choice.
    """

    device: torch.device
    calibration: torch.Tensor | None = None
    calibration_batch_size: int = 8
    reporter: Reporter = SILENT
    checkpoint: Checkpointer | None = None
    offload: OffloadSettings = field(default_factory=OffloadSettings)


@dataclass
class Handoff:
    """What a pass hands the passes after it; each channel has one kind of writer and one kind of reader.

    - `bit_plan`: module fqn -> QuantSpec or FloatSpec (compress/quant/float_records.py), written by allocation
      passes (allocate, quantize_plan) and read by the quantizers.
    - `masks`: module fqn -> bool tensor (out, in), True where a weight survived pruning; written by pruning
      passes, read by quantizers (which keep pruned weights at exactly zero) and by the export.
    - `layer_sparsity`: decoder-layer prefix -> sparsity, written by a sparsity allocation pass (OWL) and read
      by the pruning passes, as `bit_plan` is by the quantizers.
    """

    bit_plan: dict[str, WeightFormat] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResults:
    """What the run collects: report.json, the run folder and the export are made from it.

    - `records`: module fqn -> the weight record of a quantized linear (compress/quant/records.py), kept for export
      (a lazy run keeps only their shapes once a layer is written).
    - `activation_quant`: module fqn -> activation quantization settings installed as forward hooks (with the
      calibrated scales of static formats, compress/quant/activation.py).
    - `kv_cache`: attention module fqn -> its quantized KV cache's settings and scales (compressors/kv_cache.py).
    - `fallbacks`: every place a pass degraded (e.g. a Cholesky failure), reported, never silent.
    - `report_sections`: whole-run results a pass adds to report.json under its own key (e.g. "allocation":
      the bit plan, sensitivities and Pareto frontier), beyond the per-module entries every pass returns.
    - `run_files`: files a pass wants in the run directory, relative name -> text (e.g. "bit_plan.yaml");
      written into the staging folder, so they appear only with a complete run.
    """

    records: dict[str, WeightRecord] = field(default_factory=dict)
    activation_quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv_cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    report_sections: dict[str, Any] = field(default_factory=dict)
    run_files: dict[str, str] = field(default_factory=dict)


TextSource = tuple[str, str | None]
"""An evaluation or calibration text as `load_text` reads it: (dataset reference, data_dir)."""

TOKEN_IDS_KIND = "token-ids"


class RunCache:
    """Values computed once per run and read again: the baseline and the compressed evaluation (and the calibration,
    when it reads the same file) tokenize the same text once, and every module of a quantizer reads the same plan
    file. With a `store` (the user's cache, compress/engine/cache.py), token ids are also kept across runs, keyed by
    the text's digest and the tokenizer's identity."""

    def __init__(self, store: Cache | None = None) -> None:
        self.store = store
        self._text_digests: dict[TextSource, str] = {}
        self._unread: dict[TextSource, str] = {}  # texts read for their digest and not tokenized yet
        self._token_ids: dict[tuple[str, str], torch.Tensor] = {}
        self._tokenizers: dict[int, tuple[Any, str | None]] = {}
        self._plans: dict[str, dict[str, PlanEntry]] = {}
        self._task_docs: dict[tuple[str, str, int | None], Any] = {}
        # what an evaluator's baseline run leaves for its compressed run to compare with (kl_divergence's records)
        self.evaluator_state: dict[str, Any] = {}
        self.token_ids_from_store = 0  # how many texts' ids came from `store` (report.json `cache`)

    def text_digest(self, source: TextSource) -> str:
        """SHA-256 of the text `source` names, read once per run (and kept until it is tokenized)."""
        if source not in self._text_digests:
            self._unread[source] = self._read(source)
        return self._text_digests[source]

    def token_ids(self, source: TextSource, tokenizer: Any) -> torch.Tensor:
        """The token ids of text `source` (`tokenize_text`), tokenized at most once per run and tokenizer."""
        digest = self.text_digest(source)
        identity = self._tokenizer_identity(tokenizer)
        memo = (digest, identity or f"object-{id(tokenizer)}")  # a tokenizer without an identity: this object only
        if memo not in self._token_ids:
            stored = self._stored_token_ids(digest, identity)
            if stored is None:
                text = self._unread.pop(source, None)
                stored = tokenize_text(tokenizer, text if text is not None else self._read(source))
                self._store_token_ids(digest, identity, stored)
            self._token_ids[memo] = stored
        self._unread.pop(source, None)
        return self._token_ids[memo]

    def _read(self, source: TextSource) -> str:
        text = load_text(*source)
        digest = text_sha256(text)
        if self._text_digests.setdefault(source, digest) != digest:
            raise UserError(f"dataset {source[0]} changed while this run was reading it; run again once it is written")
        return text

    def _tokenizer_identity(self, tokenizer: Any) -> str | None:
        # the tokenizer is kept beside its identity, so its id() cannot be reused by another object meanwhile
        known = self._tokenizers.get(id(tokenizer))
        if known is None or known[0] is not tokenizer:
            known = self._tokenizers[id(tokenizer)] = (tokenizer, tokenizer_identity(tokenizer))
        return known[1]

    def _token_material(self, digest: str, identity: str) -> dict[str, Any]:
        return {"entry": "token_ids/1", "text_sha256": digest, "tokenizer": identity}

    def _stored_token_ids(self, digest: str, identity: str | None) -> torch.Tensor | None:
        if self.store is None or identity is None:
            return None
        material = self._token_material(digest, identity)
        path = self.store.path(TOKEN_IDS_KIND, key_of(material), "safetensors")
        data = self.store.read_bytes(path)
        if data is None:
            return None
        from safetensors.torch import load

        try:
            ids = load(data)["token_ids"]
            stored_for = json.loads(safetensors_metadata(data).get("material", "null"))
        except Exception as exc:  # truncated or foreign bytes: a miss, whatever safetensors says about them
            self.store.warn(f"cache entry {path} is not readable ({type(exc).__name__}: {exc}); ignoring it "
                            "(it is recomputed and rewritten)")
            return None
        if stored_for != material or ids.dtype != torch.int64 or ids.dim() != 1:
            self.store.warn(f"cache entry {path} does not hold these token ids; ignoring it (it is recomputed and rewritten)")
            return None
        self.token_ids_from_store += 1
        return ids

    def _store_token_ids(self, digest: str, identity: str | None, ids: torch.Tensor) -> None:
        if self.store is None or identity is None:
            return
        from safetensors.torch import save

        material = self._token_material(digest, identity)
        data = save({"token_ids": ids.contiguous()}, metadata={"material": canonical_json(material)})
        self.store.write_bytes(self.store.path(TOKEN_IDS_KIND, key_of(material), "safetensors"), data)

    def bit_plan_file(self, path: str | Path) -> dict[str, PlanEntry]:
        """The bit plan file at `path` (module name or pattern -> bits), read once."""
        key = str(path)
        if key not in self._plans:
            self._plans[key] = read_plan(path)
        return self._plans[key]

    def task_docs(self, task: str, data_dir: str, limit: int | None, load: Callable[[], T]) -> T:
        """The documents of a zero-shot task (read from `data_dir`, at most `limit`), from `load()` the first time."""
        key = (task, data_dir, limit)
        if key not in self._task_docs:
            self._task_docs[key] = load()
        docs: T = self._task_docs[key]
        return docs


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory (its 8-byte length, then the JSON header)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata: dict[str, str] = header.get("__metadata__") or {}
    return metadata


@dataclass
class RunContext:
    """Owned by the caller of a run; nothing here is global. See the module docstring for the four parts."""

    inputs: RunInputs
    handoff: Handoff = field(default_factory=Handoff)
    results: RunResults = field(default_factory=RunResults)
    cache: RunCache = field(default_factory=RunCache)
