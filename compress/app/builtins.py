"""The built-in passes and evaluators, listed in one place above the core.

Each is declared with its config (from `compress.compressors.configs` / `compress.evaluators.configs`, which import
no torch) and the facts recipes are checked against, and names its implementation as "module:function": that module,
and torch with it, is imported when the pass first runs. So a recipe validates (`compress validate`, a typo reported
in under a second of CPU) without importing torch or transformers. The core never imports plugins; whatever runs
recipes (the runner, the CLI, tests) imports this module first. bitsandbytes and lm-eval are imported only inside
their pass or evaluator.
"""

from compress.compressors.configs import (
    AllocateConfig,
    AWQConfig,
    BnbConfig,
    GPTQConfig,
    KVCacheConfig,
    LayerDropConfig,
    LowRankConfig,
    MagnitudeConfig,
    OWLConfig,
    QuantizeEmbeddingsConfig,
    QuantizePlanConfig,
    RotateConfig,
    RTNConfig,
    SignRoundConfig,
    SmoothQuantConfig,
    SparseGPTConfig,
    SqueezeLLMConfig,
    WandaConfig,
    WidthPruneConfig,
)
from compress.evaluators.configs import KLDivergenceConfig, LmEvalConfig, PerplexityConfig, ZeroShotConfig
from compress.recipe.registry import declare_evaluator, declare_pass
from compress.recipe.storage import BITSANDBYTES_MODULES, CODEBOOK, GGUF_BLOCKS, SPARSE_OUTLIERS

PASSES = "compress.compressors"
EVALUATORS = "compress.evaluators"

# quantizers
declare_pass("rtn", RTNConfig, f"{PASSES}.rtn:run_rtn", scope="layer", kind="quantize")
declare_pass("gptq", GPTQConfig, f"{PASSES}.gptq:run_gptq", scope="layer", kind="quantize", needs_calibration=True,
             data_parallel=True)
declare_pass("signround", SignRoundConfig, f"{PASSES}.signround:run_signround", scope="layer", kind="quantize",
             needs_calibration=True)
declare_pass("awq", AWQConfig, f"{PASSES}.awq:run_awq", scope="layer", kind="quantize", needs_calibration=True)
declare_pass("squeezellm", SqueezeLLMConfig, f"{PASSES}.squeezellm:run_squeezellm", scope="layer", kind="quantize",
             needs_calibration=True, stores={CODEBOOK, SPARSE_OUTLIERS})
declare_pass("lorc", LowRankConfig, f"{PASSES}.low_rank:run_lorc", scope="layer", kind="compensate",
             needs_calibration=True)
declare_pass("bnb", BnbConfig, f"{PASSES}.bnb:run_bnb", scope="model", kind="quantize", stores={BITSANDBYTES_MODULES})
declare_pass("quantize_embeddings", QuantizeEmbeddingsConfig, f"{PASSES}.embeddings:run_quantize_embeddings",
             scope="model", kind="quantize_embeddings", stores={GGUF_BLOCKS})
declare_pass("smoothquant", SmoothQuantConfig, f"{PASSES}.smoothquant:run_smoothquant", scope="layer",
             kind="transform", needs_calibration=True)
declare_pass("kv_cache", KVCacheConfig, f"{PASSES}.kv_cache:run_kv_cache", scope="layer", kind="quantize_cache",
             needs_calibration=True)
# pruning
declare_pass("magnitude", MagnitudeConfig, f"{PASSES}.magnitude:run_magnitude", scope="layer", kind="prune")
declare_pass("wanda", WandaConfig, f"{PASSES}.wanda:run_wanda", scope="layer", kind="prune", needs_calibration=True,
             data_parallel=True)
declare_pass("sparsegpt", SparseGPTConfig, f"{PASSES}.sparsegpt:run_sparsegpt", scope="layer", kind="prune",
             needs_calibration=True, data_parallel=True)
declare_pass("owl", OWLConfig, f"{PASSES}.owl:run_owl", scope="model", kind="allocate_sparsity", needs_calibration=True)
# structured pruning
declare_pass("layer_drop", LayerDropConfig, f"{PASSES}.layer_drop:run_layer_drop", scope="model", kind="restructure",
             needs_calibration=True)
declare_pass("width_prune", WidthPruneConfig, f"{PASSES}.width_prune:run_width_prune", scope="model",
             kind="restructure", needs_calibration=True)
# rotation (whole model, before everything that reads the weights)
declare_pass("rotate", RotateConfig, f"{PASSES}.rotate:run_rotate", scope="model", kind="rotate")
# bit allocation
declare_pass("allocate", AllocateConfig, f"{PASSES}.allocate:run_allocate", scope="model", kind="allocate",
             needs_calibration=True)
declare_pass("quantize_plan", QuantizePlanConfig, f"{PASSES}.allocate:run_quantize_plan", scope="model",
             kind="allocate")

# cache_inputs: the digest of what they score, so a baseline is reused from the cache (compress/app/baseline.py).
# lm_eval has none: lm-eval reads its tasks' data itself, so a cached number could not tell that data changed.
declare_evaluator("perplexity", PerplexityConfig, f"{EVALUATORS}.perplexity:evaluate_perplexity",
                  cache_inputs=f"{EVALUATORS}.perplexity:perplexity_cache_inputs")
declare_evaluator("zero_shot", ZeroShotConfig, f"{EVALUATORS}.zero_shot:evaluate_zero_shot",
                  cache_inputs=f"{EVALUATORS}.zero_shot:zero_shot_cache_inputs")
# kl_divergence has none either: its baseline run records what the compressed run compares against
declare_evaluator("kl_divergence", KLDivergenceConfig, f"{EVALUATORS}.kl_divergence:evaluate_kl_divergence")
declare_evaluator("lm_eval", LmEvalConfig, f"{EVALUATORS}.lm_eval_adapter:evaluate_lm_eval")
