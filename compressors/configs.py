"""Every built-in pass's config, in a module that imports no torch: `compress validate` checks a recipe against
these, and `compress.app.builtins` declares each pass with its config here and its implementation by name
(`compress.compressors.gptq:run_gptq`), imported only when a run needs it. Each pass's module re-exports its config,
so `from compress.compressors.gptq import GPTQConfig` keeps working; the algorithms' docs stay with the configs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from compress.engine.settings import DEFAULT_LOGIT_CHUNK_MB, MAX_LOGIT_CHUNK_MB
from compress.quant.config import DEFAULT_IGNORE, PLAN_LABELS, ActivationQuantConfig, ObserverOptions, label_bits
from compress.recipe.errors import UserError
from compress.recipe.registry import ModulePatterns, PassKind, StrictConfig, module_pattern_problem
from compress.recipe.storage import BLOCK_SCALES, CODEBOOK, ELEMENT_FLOATS, GGUF_BLOCKS, SCALES

if TYPE_CHECKING:
    import torch

    from compress.engine.layer_sweep import LayerContext
    from compress.quant.float_records import WeightFormat


# -- sparsity.py

PATTERN_RE = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class NM:
    """Semi-structured sparsity: at most `n` nonzeros in every `m` consecutive weights along the input dimension."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str) -> NM | None:
    """`"unstructured"` -> None, `"2:4"` -> NM(2, 4); ValueError (a recipe error) for anything else."""
    if pattern == "unstructured":
        return None
    match = PATTERN_RE.match(pattern)
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (keep N of every M weights)")
    return NM(n, m)


# -- base.py

# compress/quant/gguf_types.py GGUF_LABELS, spelled out for the Literal
WeightFormatName = Literal["int", "fp8", "nvfp4", "mxfp4", "gguf:q4_0", "gguf:q8_0", "gguf:q4_1", "gguf:q5_1",
                           "gguf:q2_k", "gguf:q3_k", "gguf:q4_k", "gguf:q5_k", "gguf:q6_k"]
INTEGER_ONLY_KEYS = ("bits", "group_size", "symmetric")  # the element-float formats fix these themselves


class WeightQuantConfig(StrictConfig):
    """Weight quantization settings shared by rtn, gptq and awq.

    format: `int` (uniform integer codes, the default), or an element-float format (`activations` adds FP8 or
    FP4 activation quantization to any of them: FP8 W8A8, NVFP4 W4A4):
    `fp8` (E4M3 elements, float32 scales per `strategy`: tensor, channel (default) or block, i.e. 128x128 tiles),
    `nvfp4` (E2M1 elements, an FP8 scale per 16 and an FP32 global scale) or `mxfp4` (E2M1, an E8M0 scale per 32),
    or a llama.cpp GGUF block type, `gguf:q4_0 | q8_0 | q4_1 | q5_1 | q2_k | q3_k | q4_k | q5_k | q6_k` (the type's
    own float16 and integer sub-scales, compress/quant/gguf_records.py; for `export: {format: gguf}`).
    The float formats fix their element width and scales, so `bits`, `group_size` and `symmetric` are for `int`.
    group_size: input columns per scale; `null` or -1 means one scale per output channel. A width the group
    size does not divide gets a shorter last group. plan: a bit plan file (see compress/quant/bit_plan.py) whose
    entries override `bits` (or the format) per module; it wins over a plan from an earlier `allocate` pass.
    """

    path_fields: ClassVar[tuple[str, ...]] = ("plan",)  # resolved against the recipe's folder at load

    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, le=1_048_576)
    symmetric: bool = True
    format: WeightFormatName = "int"
    strategy: Literal["tensor", "channel", "block"] | None = None
    ignore: ModulePatterns = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    activations: ActivationQuantConfig | None = None
    plan: str | None = None

    @field_validator("group_size")
    @classmethod
    def _per_channel_spelling(cls, value: int | None) -> int | None:
        if value is None or value == -1:
            return None
        if value < 1:
            raise ValueError("group_size must be a positive number of columns, or null / -1 for per-channel")
        return value

    def settings_as_run(self) -> dict[str, Any]:
        # An element-float format fixes its element width and scales, and `strategy` is fp8's alone: showing
        # "bits: 4" beside nvfp4, or "strategy: null" beside int, would report settings that did nothing.
        settings = super().settings_as_run()
        unused: tuple[str, ...] = ("bits", "group_size", "symmetric") if self.format != "int" else ()
        unused += ("strategy",) if self.strategy is None else ()
        return {name: value for name, value in settings.items() if name not in unused}

    @property
    def calibrates(self) -> bool:
        """Calibration windows are needed for activation scales (static, or NVFP4's global scale) even by rtn."""
        return self.activations is not None and self.activations.calibrated

    @model_validator(mode="after")
    def _format_settings(self) -> "WeightQuantConfig":
        if self.format == "int":
            if self.strategy is not None:
                raise ValueError("strategy chooses fp8's scale layout (tensor, channel, block); integer formats take "
                                 "group_size (null for per channel)")
            return self
        given = [key for key in INTEGER_ONLY_KEYS if key in self.model_fields_set]
        if given:
            raise ValueError(f"format {self.format} fixes its element width and scales; {', '.join(given)} "
                             "apply to format int: drop them")
        if self.format.startswith("gguf:") and self.activations is not None:
            raise ValueError(f"format {self.format} is weight-only: llama.cpp has no fake-quantized activations to "
                             "match; drop `activations`")
        if self.strategy is not None and self.format != "fp8":
            raise ValueError(f"{self.format} has a fixed scale per {16 if self.format == 'nvfp4' else 32} columns; "
                             "strategy (tensor, channel, block) is for fp8")
        if self.activations is not None and self.activations.format == "int":
            raise ValueError(f"format {self.format} is weight-only here (W8A16 / W4A16) for integer activations, "
                             "which pair with format int; float ones pair with it: activations: {format: fp8 | "
                             "nvfp4 | mxfp4}")
        return self

    @property
    def float_label(self) -> str | None:
        """The element-float format as a bit plan names it (fp8, fp8-block, nvfp4, ...); None for integers."""
        if self.format == "int":
            return None
        if self.format == "fp8" and self.strategy not in (None, "channel"):
            return f"fp8-{self.strategy}"
        return self.format

    @property
    def stores(self) -> frozenset[str]:
        """What an element-float config stores, for the recipe's export check (integer codes every format holds)."""
        return frozenset() if self.float_label is None else label_stores(self.float_label)

    def spec(self, candidate: int | str | None = None) -> WeightFormat:
        """The format one module gets: this config's own (no candidate), `bits` wide integers with this config's
        group size and symmetry, or the element-float format a plan label names."""
        from compress.quant.float_records import FloatSpec  # torch: only when a pass runs
        from compress.quant.primitives import PerChannel, PerGroup, QuantSpec

        if candidate is None and self.float_label is not None:
            candidate = self.float_label
        if isinstance(candidate, str) and candidate.startswith("gguf:"):
            from compress.quant.gguf_records import GGUFSpec

            return GGUFSpec.from_label(candidate)
        if isinstance(candidate, str) and candidate.startswith("lut:"):
            from compress.quant.lookup_records import LookupSpec

            return LookupSpec.from_label(candidate)
        if isinstance(candidate, str):
            return FloatSpec.from_label(candidate)
        granularity = PerChannel() if self.group_size is None else PerGroup(self.group_size)
        return QuantSpec(self.bits if candidate is None else candidate, self.symmetric, granularity)


def label_stores(label: str) -> frozenset[str]:
    """The storage parts of an element-float or GGUF label (the words of compress/recipe/storage.py)."""
    if label.startswith("gguf:"):
        return frozenset({GGUF_BLOCKS})
    if label.startswith("lut:"):
        return frozenset({CODEBOOK})
    if label in ("fp8", "fp8-tensor"):
        return frozenset({ELEMENT_FLOATS, SCALES})
    return frozenset({ELEMENT_FLOATS, BLOCK_SCALES})


# -- rtn.py

class RTNConfig(WeightQuantConfig):
    """Recipe example:

        passes:
          - rtn: {bits: 4, group_size: 128, symmetric: true}
          - rtn: {bits: 8, group_size: null, activations: {bits: 8, per: token}}   # W8A8
          - rtn: {format: fp8, strategy: block}                                 # FP8 E4M3, 128x128 block scales
          - rtn: {format: nvfp4}                                                # NVFP4 W4A16
    """


# -- hessian.py

class HessianOptions(StrictConfig):
    """Config keys of the passes that solve with a layer Hessian (GPTQ, SparseGPT)."""

    hessian_dtype: Literal["float64", "float32"] = Field(
        "float64", description="precision of the running Hessian sum: float64 makes it independent of batch order "
        "and of the data-parallel split; float32 halves its memory (columns^2 x 4 bytes instead of 8)")

    @property
    def hessian_torch_dtype(self) -> torch.dtype:
        import torch  # only when a pass runs

        return torch.float64 if self.hessian_dtype == "float64" else torch.float32


# -- gptq.py

class GPTQConfig(WeightQuantConfig, HessianOptions):
    """GPTQ weight quantization (Frantar et al. 2022), calibrated layer by layer.

    damp: dampening added to the Hessian diagonal, as a fraction of its mean (raised automatically when the
    Hessian is still not factorizable; RTN is the recorded fallback). block_size: columns per lazy batch update
    (speed only; results do not depend on it). act_order: quantize columns by descending input energy.
    static_groups: group scales from the original weights up front, in the original column order; defaults to
    act_order, and must be true when act_order is used with groups. true_sequential: quantize the sublayers of
    a decoder layer in execution order ([q,k,v], [o], [gate,up], [down] for Llama), re-capturing inputs so later
    ones see the already-quantized earlier ones; false collects every Hessian in one forward pass.

    Recipe example:

        passes:
          - gptq: {bits: 4, group_size: 128, symmetric: true}
          - gptq: {bits: 3, group_size: 128, act_order: true, damp: 0.01, block_size: 128}
          - gptq: {format: nvfp4}      # GPTQ rounding onto the FP4 grid, scales fixed before the column loop
    """

    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1, le=1_048_576)
    act_order: bool = False
    static_groups: bool | None = None
    true_sequential: bool = True

    @model_validator(mode="after")
    def _storable_groups(self) -> "GPTQConfig":
        if self.act_order and self.group_size is not None and self.static_groups is False:
            raise ValueError(
                "act_order with group_size needs static_groups: true (or leave it unset): groups formed in "
                "act-order cannot be stored in the original column order"
            )
        return self

    @property
    def use_static_groups(self) -> bool:
        return self.act_order if self.static_groups is None else self.static_groups


# -- signround.py

def require_integer_grid(pass_name: str, fmt: str) -> None:
    """awq and signround round onto integer grids: uniform (`int`) or a GGUF type's; not the element floats."""
    if fmt != "int" and not fmt.startswith("gguf:"):
        raise ValueError(f"{pass_name} rounds to integer codes (format int, or a GGUF type such as gguf:q4_k); for "
                         f"format {fmt} use rtn or gptq")


class SignRoundConfig(WeightQuantConfig):
    """Learnable rounding and clipping (SignRound / AutoRound; Cheng et al. 2023, arXiv:2309.05516), layer by layer.

    For each decoder layer, the rounding offsets (one per weight, in [-0.5, 0.5]) and the clipping range (a
    multiplier per group on its max, and on its min when asymmetric, in [0.5, 1]) of all its linears are tuned
    together by signed gradient descent, so that the quantized layer's output matches the full-precision layer's
    output on the calibration windows (mean squared error, both computed from the same inputs). The result is an
    ordinary integer grid: every export format that holds GPTQ holds it. With a GGUF type (`format: "gguf:q4_k"`,
    or a bit plan naming one) the type's two-level grid is fixed first, as RTN chooses it, and only the rounding
    offsets are learned: the codes land on the type's grid, for `export: {format: gguf}`.

    iters: optimisation steps per decoder layer (0 is RTN). lr: the step size of the signed updates, decaying
    linearly to 0; default 1 / iters, as AutoRound. batch_size: calibration windows per step, drawn at random.
    seed: the draws' seed (with the layer index), so a resumed run gives the very same weights.

    Recipe example:

        calibration: {dataset: calib.txt, samples: 128, seq_len: 512}
        passes:
          - signround: {bits: 3, group_size: 128, iters: 200}
          - signround: {format: "gguf:q3_k"}          # onto Q3_K's grid, for export: {format: gguf}
    """

    iters: int = Field(200, ge=0, le=100_000)
    lr: float | None = Field(None, gt=0, le=1, description="signed step size; default 1 / iters")
    batch_size: int = Field(8, ge=1, le=65_536, description="calibration windows per optimisation step")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="torch generators take 0 to 2^63 - 1")

    @model_validator(mode="after")
    def _integer_format(self) -> "SignRoundConfig":
        require_integer_grid("signround", self.format)
        return self

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


# -- squeezellm.py

class SqueezeLLMConfig(StrictConfig):
    """SqueezeLLM (Kim et al. 2023, arXiv:2306.07629): a non-uniform grid per row, found by sensitivity-weighted
    k-means, plus the most important weights kept exactly as sparse float16 outliers (dense-and-sparse).

    Each row of a linear gets 2^bits float16 centroids, fitted by weighted k-means (Lloyd, `iters` rounds from
    the row's quantiles) where a weight's weight is the second moment of its input column on the calibration
    windows (the diagonal of the layer Hessian: SqueezeLLM's Fisher weighting, approximated without gradients).
    `outliers`: the share of each matrix's weights with the largest |w| x sqrt(input energy) kept exactly, out of
    the k-means. Sizes are exact: b bits per index, 16 per centroid, 48 per outlier (value + flat position).
    No runtime format holds a per-row table, so only `export: {format: dense}` saves it (dequantized).

    Recipe example:

        passes:
          - squeezellm: {bits: 3, outliers: 0.005}
    """

    bits: int = Field(3, ge=1, le=8)
    outliers: float = Field(0.005, ge=0, le=0.1)
    iters: int = Field(30, ge=0, le=1000)
    ignore: ModulePatterns = Field(default_factory=lambda: list(DEFAULT_IGNORE))


# -- low_rank.py

class LowRankConfig(StrictConfig):
    """Low-rank error compensation after a quantizer (ZeroQuant-V2's LoRC, Yao et al. 2023, arXiv:2303.08302; fitted
    to the activations as EoRA, Liu et al. 2024, arXiv:2410.21271): W ~ Q(W) + B A per linear, of rank `rank`.

    The quantizer's error E = W - Q(W) is approximated in the layer's own input space: with H = X^T X of the
    module's calibration inputs (seen with the layer already quantized), B A minimises ||(E - B A) X^T||, the
    output error, not the weight error: the truncated SVD of E H^(1/2), mapped back by H^(-1/2). B and A are kept
    in float16 and counted in the size (16 bits per entry); compressed-tensors and GPTQ exports write the
    quantized base plus a PEFT LoRA adapter (`adapter/`) that transformers + peft load, dense folds them in.

    rank: the rank per module; or bits_per_weight: the extra bits per weight to spend, rank = bits x out x in /
    (16 x (out + in)), rounded down (so every module gets the same share of its own size). damp: added to H's
    eigenvalues as a fraction of their mean, so directions the calibration never excited are not amplified.
    Must come right after the quantizer, in the same layer sweep; not with pruning (the correction is dense).

    Recipe example:

        passes:
          - gptq: {bits: 2, group_size: 128}
          - lorc: {bits_per_weight: 0.1}
    """

    rank: int | None = Field(None, ge=1, le=65_536)
    bits_per_weight: float | None = Field(None, gt=0, le=16)
    damp: float = Field(0.1, gt=0, le=10)
    ignore: ModulePatterns = Field(default_factory=lambda: list(DEFAULT_IGNORE))

    @model_validator(mode="after")
    def _one_size(self) -> "LowRankConfig":
        if (self.rank is None) == (self.bits_per_weight is None):
            raise ValueError("give exactly one of rank (per module) or bits_per_weight (extra bits per weight)")
        return self

    def rank_for(self, rows: int, columns: int) -> int:
        """The rank of a (rows, columns) module, at most min(rows, columns)."""
        if self.rank is not None:
            wanted = self.rank
        else:
            assert self.bits_per_weight is not None
            wanted = math.floor(self.bits_per_weight * rows * columns / (16 * (rows + columns)))
        return max(0, min(wanted, rows, columns))


# -- awq.py

class AWQConfig(WeightQuantConfig):
    """Activation-aware scaling, optional range clipping, then round-to-nearest.

    grid: α values tried for the scales (α = 0, 1/grid, ..., (grid-1)/grid; α = 0 is plain RTN).
    clip: also search a per-group range shrink (not for q/k projections), as the reference does.
    clip_grid: range steps; ratios 1, 1 - 1/clip_grid, ... down to 50%.
    max_tokens: evenly strided calibration tokens whose input Gram matrix both searches score against.
    quantize: false only searches and folds the scales and leaves the weights in fp, for a later pass
    (gptq) to round; the search still uses this pass's bits/group_size, so give gptq the same ones.

    Recipe example:

        calibration: {dataset: calib.txt, samples: 128, seq_len: 512}
        passes:
          - awq: {bits: 4, group_size: 128}
        # or onto a GGUF type's grid (export: {format: gguf}):
          - awq: {format: "gguf:q4_k"}
        # or AWQ scales + GPTQ rounding:
          - awq: {bits: 4, group_size: 128, quantize: false}
          - gptq: {bits: 4, group_size: 128}
    """

    grid: int = Field(20, ge=1, le=200)
    clip: bool = True
    clip_grid: int = Field(20, ge=2, le=200)
    max_tokens: int = Field(16384, ge=16, le=10_000_000)
    quantize: bool = True

    @property
    def acts_as(self) -> PassKind | None:
        """Without `quantize`, AWQ only folds scales: a transform, which a quantizer (gptq) may follow."""
        return None if self.quantize else "transform"

    @model_validator(mode="after")
    def _integer_format(self) -> "AWQConfig":
        require_integer_grid("awq", self.format)
        return self

    @model_validator(mode="after")
    def _activations_need_quantize(self) -> "AWQConfig":
        if not self.quantize and self.activations is not None:
            raise ValueError("activations are quantized by the pass that rounds the weights; "
                             "move `activations:` to it or set quantize: true")
        return self


# -- kv_cache.py

class KVCacheConfig(ObserverOptions):
    """A quantized KV cache: the key and value states attention reads (after RoPE, as the cache stores them) are
    fake-quantized to `format` with static scales calibrated on the calibration windows, in every forward after
    this pass (so perplexity and zero-shot include it); exported as compressed-tensors' `kv_cache_scheme` with
    the per-layer `self_attn.k_scale` / `v_scale` vLLM reads.

    strategy: `tensor` (one key and one value scale per layer: what vLLM's FP8 KV cache uses) or `head` (one per KV
    head, compressed-tensors' `attn_head`). observer: how each scale is chosen (see ObserverOptions; minmax is
    llm-compressor's default). It comes after the quantizer, so the scales see the keys and values of the
    quantized weights.

    Recipe example:

        passes:
          - rtn: {format: fp8, activations: {format: fp8, per: token}}
          - kv_cache: {format: fp8, strategy: tensor}
    """

    format: Literal["fp8"] = "fp8"
    strategy: Literal["tensor", "head"] = "tensor"


# -- smoothquant.py

class SmoothQuantConfig(StrictConfig):
    """alpha: how much of the outlier difficulty moves from activations to weights (0 = none, 1 = all).

    Recipe example (W8A8):

        calibration: {dataset: calib.txt, samples: 128, seq_len: 512}
        passes:
          - smoothquant: {alpha: 0.5}
          - rtn: {bits: 8, group_size: null, activations: {bits: 8, per: token}}
    """

    alpha: float = Field(0.5, ge=0.0, le=1.0)


# -- rotate.py

class RotateConfig(StrictConfig):
    """Rotate the residual stream (and each attention head's value/output path) by random orthogonal matrices fused
    into the weights (QuaRot / QuIP#-style incoherence): the model computes the same function, and outliers spread
    over all channels, so a quantizer after it loses less. seed: draws the random signs of the Hadamard matrices
    (a resumed run draws the same ones). untie_embeddings: a head tied to the input embeddings cannot take the final
    norm's gain without changing the embeddings, so such a model is refused unless this is true, which stores the
    head as a tensor of its own (the report says how many bytes that adds).

    Recipe example (W3 GPTQ on the rotated model):

        calibration: {dataset: calib.txt, samples: 128, seq_len: 512}
        passes:
          - rotate: {seed: 0}
          - gptq: {bits: 3, group_size: 128}
    """

    seed: int = Field(0, ge=0)
    untie_embeddings: bool = False


# -- embeddings.py

class QuantizeEmbeddingsConfig(StrictConfig):
    """Round the input embedding table and the output head onto a GGUF block type (round to nearest on the type's
    own two-level grid), so they are stored quantized as llama.cpp's Q4_K_M, Q3_K_M and Q2_K files store them
    (`token_embd` and `output` in Q6_K or Q4_K): in a model whose vocabulary is a large share of its weights, an
    F16 embedding would make the file larger than llama-quantize's at the same quality. The model is evaluated with
    the rounded tables, so what is exported is what was scored; only the gguf format holds them.

    embeddings: the type of the input embedding table (token_embd). head: the type of the output head (output).
    A head tied to the embeddings is one tensor, which takes `head`'s type if given (llama.cpp treats a tied
    token_embd as its output tensor), else `embeddings`'s. At least one of the two. Runs on a model held in memory
    (not `lazy: true`); the hidden size must be a multiple of the type's block (256 for the k-quants, 32 otherwise).

    Recipe example (llama.cpp's choice for Q4_K_M):

        passes:
          - gptq: {format: "gguf:q4_k"}
          - quantize_embeddings: {embeddings: "gguf:q4_k", head: "gguf:q6_k"}
        export: {format: gguf}
    """

    embeddings: str | None = None
    head: str | None = None

    @field_validator("embeddings", "head")
    @classmethod
    def _gguf_type(cls, value: str | None) -> str | None:
        if value is not None:
            from compress.quant.gguf_types import gguf_type

            gguf_type(value)  # ValueError naming the known types
        return value

    @model_validator(mode="after")
    def _something(self) -> "QuantizeEmbeddingsConfig":
        if self.embeddings is None and self.head is None:
            raise ValueError("give `embeddings`, `head` or both: the GGUF type each table is rounded onto, e.g. "
                             '{head: "gguf:q6_k"}')
        return self


# -- bnb.py

class BnbConfig(StrictConfig):
    """Recipe example:

        passes:
          - bnb: {mode: nf4, double_quant: true}        # 4-bit NormalFloat, scales quantized again
          - bnb: {mode: int8, int8_threshold: 6.0}      # LLM.int8(): outlier columns stay in float16
        export: {format: bitsandbytes}
    """

    mode: Literal["int8", "nf4", "fp4"] = "nf4"
    double_quant: bool = True
    int8_threshold: float = Field(6.0, gt=0, description="LLM.int8() outlier threshold on activation magnitude")
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    ignore: ModulePatterns = Field(default_factory=lambda: list(DEFAULT_IGNORE))


# -- pruning.py

class PruneConfig(StrictConfig):
    """Settings shared by the weight-pruning passes.

    sparsity: share of weights removed in every pruned matrix (0 to 1), or a list with one value per decoder
    layer (a schedule). With an N:M pattern it defaults to, and must equal, 1 - N/M.
    pattern: "unstructured", or "N:M" (keep N of every M consecutive weights along the input dimension;
    "2:4" and "4:8" are what sparse tensor cores and runtimes accelerate).
    ignore: module-name patterns left dense (glob or `re:`), as for the quantizers; lm_head by default.
    """

    sparsity: float | list[float] | None = None
    pattern: str = "unstructured"
    ignore: ModulePatterns = Field(default_factory=lambda: list(DEFAULT_IGNORE))

    @field_validator("pattern", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 2:4 as base-60: 2*60 + 4
            n, m = divmod(value, 60)
            raise ValueError(f'quote the pattern: YAML reads an unquoted {n}:{m} as the number {value}; '
                             f'write pattern: "{n}:{m}"')
        return value

    @field_validator("pattern")
    @classmethod
    def _known_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @field_validator("sparsity")
    @classmethod
    def _in_range(cls, value: float | list[float] | None) -> float | list[float] | None:
        values = value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(value, list) and not value:
            raise ValueError("a sparsity schedule needs one value per decoder layer, got an empty list")
        for v in values:
            if not 0 <= v < 1:
                raise ValueError(f"sparsity must be in [0, 1), got {v}")
        return value

    @model_validator(mode="after")
    def _pattern_matches_sparsity(self) -> "PruneConfig":
        nm = self.nm
        if nm is None and self.sparsity is None:
            raise ValueError("set `sparsity` (e.g. 0.5) or an N:M `pattern` (e.g. '2:4')")
        if nm is not None and self.sparsity is not None and (
            isinstance(self.sparsity, list) or abs(self.sparsity - nm.sparsity) > 1e-9
        ):
            raise ValueError(f"pattern {nm} prunes exactly {nm.sparsity:g} of the weights; "
                             f"drop `sparsity` or set it to {nm.sparsity:g}")
        return self

    @property
    def nm(self) -> NM | None:
        return parse_pattern(self.pattern)

    def sparsity_for(self, layer: LayerContext) -> float:
        """This decoder layer's target: an allocation pass's plan (OWL) first, then the schedule or the constant."""
        planned = layer.run.handoff.layer_sparsity.get(layer.prefix)
        if planned is not None and self.nm is None:
            return planned
        if self.nm is not None:
            return self.nm.sparsity
        if isinstance(self.sparsity, list):
            if layer.index >= len(self.sparsity):
                raise UserError(f"the sparsity schedule has {len(self.sparsity)} values but the model has more "
                                f"decoder layers (layer {layer.index}): give one value per layer")
            return self.sparsity[layer.index]
        assert self.sparsity is not None  # guaranteed by the validator
        return self.sparsity


# -- magnitude.py

class MagnitudeConfig(PruneConfig):
    """Magnitude pruning, no calibration.

    Recipe example:

        passes:
          - magnitude: {sparsity: 0.5}
          - magnitude: {pattern: "2:4", ignore: [lm_head, "*.down_proj"]}
    """


# -- wanda.py

class WandaConfig(PruneConfig):
    """Wanda pruning from calibration activations; the sublayers of a decoder layer are scored on one forward.

    Recipe example:

        passes:
          - wanda: {sparsity: 0.5}
          - wanda: {pattern: "2:4"}
    """


# -- sparsegpt.py

class SparseGPTConfig(PruneConfig, HessianOptions):
    """SparseGPT pruning with OBS weight reconstruction, calibrated layer by layer.

    damp: dampening added to the Hessian diagonal as a fraction of its mean (raised automatically when needed;
    magnitude pruning is the recorded fallback). block_size: columns per mask decision and lazy update (the
    paper's B_s = 128; a multiple of M for N:M). The sublayers of a decoder layer share one forward, as in the
    reference; `gptq` right after `sparsegpt` in the same recipe keeps the mask (the paper's 50% + 4-bit mode).

    Recipe example:

        passes:
          - sparsegpt: {sparsity: 0.5, block_size: 128, damp: 0.01}
          - sparsegpt: {pattern: "2:4"}
    """

    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1, le=1_048_576)


# -- owl.py

class OWLConfig(StrictConfig):
    """Recipe example (OWL's defaults: lambda 0.08, M 5):

        passes:
          - owl: {sparsity: 0.7, spread: 0.08, threshold: 5}
          - wanda: {sparsity: 0.7}
    """

    sparsity: float = Field(gt=0, lt=1)
    spread: float = Field(0.08, ge=0, lt=0.5)
    threshold: float = Field(5.0, gt=1)
    ignore: ModulePatterns = Field(default_factory=lambda: list(DEFAULT_IGNORE))


# -- layer_drop.py

class LayerDropConfig(StrictConfig):
    """Remove whole decoder layers with the lowest block influence on the calibration windows.

    count: how many layers to remove; or ratio: the share of layers (rounded to the nearest count). At least one
    layer always stays.

    Recipe example:

        passes:
          - layer_drop: {count: 1}
          - layer_drop: {ratio: 0.25}
    """

    count: int | None = Field(None, ge=1, le=10_000)
    ratio: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self) -> "LayerDropConfig":
        if (self.count is None) == (self.ratio is None):
            raise ValueError("set exactly one of `count` (layers to remove) or `ratio` (share of layers to remove)")
        return self

    def count_for(self, layers: int) -> int:
        count = self.count if self.count is not None else int(round((self.ratio or 0) * layers))
        if count >= layers:
            raise UserError(f"layer_drop would remove {count} of the model's {layers} decoder layers; keep at least one")
        return count


# -- width_prune.py

Metric = Literal["fluctuation", "magnitude"]


class WidthPruneConfig(StrictConfig):
    """Remove a share of every layer's KV groups (attention heads) and MLP intermediate channels.

    attention_ratio / mlp_ratio: share to remove per layer (the same count in every layer, since a Hugging Face
    config has one head count and one intermediate size); at least one group stays. channel_multiple: the
    kept intermediate size is rounded to a multiple of this (8 keeps matmuls aligned). metric: see module
    docstring. compensate: add the removed channels' mean output as a bias (FLAP; Llama-style configs only).

    Recipe example:

        passes:
          - width_prune: {attention_ratio: 0.25, mlp_ratio: 0.25, metric: fluctuation, compensate: true}
    """

    attention_ratio: float = Field(0.0, ge=0, lt=1)
    mlp_ratio: float = Field(0.0, ge=0, lt=1)
    channel_multiple: int = Field(8, ge=1, le=65_536)
    metric: Metric = "fluctuation"
    compensate: bool = False


# -- allocate.py

Estimator = Literal["hessian_trace", "delta_loss", "fisher", "io_similarity"]


class BudgetConfig(StrictConfig):
    """Exactly one of:
    avg_bits: storage bits per allocated weight, scales and zero points included (uniform W3 g128 is 3.125);
    bytes: storage of the allocated weights; ratio: of their size at the checkpoint's own precision.
    """

    avg_bits: float | None = Field(None, gt=0, le=32)
    bytes: int | None = Field(None, gt=0, le=10**15)
    ratio: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetConfig":
        given = [k for k in ("avg_bits", "bytes", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of avg_bits, bytes, ratio (got {', '.join(given) or 'none'})")
        return self

    def describe(self) -> tuple[str, float]:
        kind = next(k for k in ("avg_bits", "bytes", "ratio") if getattr(self, k) is not None)
        return kind, float(getattr(self, kind))

    def limit_bits(self, parameters: int, reference_bits: int) -> int:
        if self.avg_bits is not None:
            return math.floor(self.avg_bits * parameters)
        if self.bytes is not None:
            return self.bytes * 8
        assert self.ratio is not None
        return math.floor(self.ratio * parameters * reference_bits)


class ConstraintsConfig(StrictConfig):
    """min_bits: per-pattern floors, e.g. {"*down_proj": 3} (globs or re:, as in `ignore`; the highest matching
    floor wins). max_bops: a second limit on bit operations per token, sum of rows*cols*weight_bits*activation_bits.
    """

    min_bits: dict[str, int] = Field(default_factory=dict)
    max_bops: int | None = Field(None, gt=0, le=10**21)
    activation_bits: int = Field(16, ge=2, le=32)

    @field_validator("min_bits")
    @classmethod
    def _floors_in_range(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, bits in value.items():
            problem = module_pattern_problem(pattern)
            if problem:
                raise ValueError(f"min_bits: {problem}")
            if not 2 <= bits <= 8:
                raise ValueError(f"min_bits[{pattern!r}] must be from 2 to 8, got {bits}")
        return value


class AllocateConfig(StrictConfig):
    """Mixed-precision bit allocation under an exact budget.

    samples: calibration windows the estimator uses (default: all); tol / max_probes: Hutchinson's stopping rule
    (hessian_trace). sensitivity_file: reuse costs saved by `compress sensitivity` instead of computing them.
    logit_chunk_mb: how many MiB of float32 logits (positions x vocabulary x 4 bytes) the loss holds at once; at a
    128k vocabulary hessian_trace then differentiates a batch a few hundred positions at a time (more forwards,
    same numbers) instead of holding every position's softmax for the second derivative.

    Recipe example:

        passes:
          - allocate:
              granularity: module          # module (each linear) | layer (each decoder layer)
              candidates: [2, 3, 4, 8]     # group size and symmetry come from the quantizer below; element-float
                                           # formats by name: [4, nvfp4, fp8, fp8-block, mxfp4]
              sensitivity: hessian_trace   # hessian_trace | delta_loss | fisher | io_similarity
              solver: ilp                  # ilp | pareto | greedy
              budget: {avg_bits: 3.0}      # or {bytes: N} or {ratio: 0.25}; counts scales and zero points
              constraints: {min_bits: {"*down_proj": 3}}
          - gptq: {bits: 4, group_size: 128}
    """

    path_fields: ClassVar[tuple[str, ...]] = ("sensitivity_file",)

    granularity: Literal["module", "layer"] = "module"
    candidates: list[int | str] = Field(default_factory=lambda: list[int | str]([2, 3, 4, 8]), min_length=1)
    sensitivity: Estimator = "hessian_trace"
    solver: Literal["ilp", "pareto", "greedy"] = "ilp"
    budget: BudgetConfig
    constraints: ConstraintsConfig = Field(default_factory=ConstraintsConfig)
    sensitivity_file: str | None = None
    samples: int | None = Field(None, ge=1, le=100_000)
    tol: float = Field(1e-2, gt=0, lt=1)
    max_probes: int = Field(32, ge=1, le=10_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    logit_chunk_mb: int = Field(DEFAULT_LOGIT_CHUNK_MB, ge=1, le=MAX_LOGIT_CHUNK_MB,
                                description="MiB of float32 vocabulary-wide logits the estimators hold at once")

    @field_validator("candidates")
    @classmethod
    def _widths(cls, value: list[int | str]) -> list[int | str]:
        bad = [b for b in value if (b not in PLAN_LABELS if isinstance(b, str) else not 2 <= b <= 8)]
        if bad:
            raise ValueError(f"candidate widths must be from 2 to 8, got {bad} (or name a format: "
                             f"{', '.join(PLAN_LABELS)})")
        # integer widths first, narrowest first, then the named formats in PLAN_LABELS order
        return sorted(set(value), key=lambda b: (1, PLAN_LABELS.index(b)) if isinstance(b, str) else (0, b))

    @property
    def stores(self) -> frozenset[str]:
        """Float candidates make the plan store element floats, whatever the following quantizer's own format."""
        return frozenset().union(*(label_stores(b) for b in self.candidates if isinstance(b, str)))


class QuantizePlanConfig(StrictConfig):
    """Recipe example:

        passes:
          - quantize_plan: {file: bit_plan.yaml}   # e.g. an allocate run's plan, edited by hand
          - gptq: {group_size: 128}
    """

    path_fields: ClassVar[tuple[str, ...]] = ("file",)

    file: str
