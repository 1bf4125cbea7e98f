"""The model families compress supports, each proven end to end, and a refusal by name for every other one.

Supported means tests/scale/test_families.py runs a tiny random model of the family through RTN and GPTQ recipes,
perplexity and a zero-shot task, an export reloaded by plain transformers with the same logits, and a SIGKILL
followed by a bit-identical `--resume`. A family outside the table might load and even run, but nothing has shown
that its layers are walked, grouped and exported correctly, so it is refused before its weights are read, with its
name and the reason; `COMPRESS_UNTESTED_FAMILIES=1` lets a user try one anyway, at their own risk.

The check reads only config.json (`model_type`, `is_encoder_decoder`), so it costs nothing and runs before the load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from compress.recipe.errors import UserError

UNTESTED_ENV = "COMPRESS_UNTESTED_FAMILIES"


@dataclass(frozen=True)
class Family:
    name: str  # as users call it


# model_type (config.json) -> family. Keep in step with tests/tiny_models.py FAMILY_CONFIGS and the README.
SUPPORTED: dict[str, Family] = {
    "llama": Family("Llama 2 / Llama 3 (GQA, llama3 rope scaling)"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2 / Qwen2.5"),
    "qwen3": Family("Qwen3"),
    "gemma2": Family("Gemma 2"),
    "gemma3_text": Family("Gemma 3 (text-only)"),
    "phi3": Family("Phi-3"),
    "opt": Family("OPT"),
    # GPT-2 keeps its weights in Conv1D (in, out) modules, which compressed-tensors does not target: its
    # compressed-tensors export is refused naming the module (export dense); dense reloads exactly.
    "gpt2": Family("GPT-2"),
    "gpt_neox": Family("GPT-NeoX / Pythia"),
    "mixtral": Family("Mixtral (MoE)"),
    "qwen2_moe": Family("Qwen2-MoE"),
    "qwen3_moe": Family("Qwen3-MoE"),
    "deepseek_v3": Family("DeepSeek-V3 (MoE, multi-head latent attention)"),
}

# Families people try whose layout we know we do not handle, with what is missing.
REFUSED: dict[str, str] = {
    "gemma3": "a vision-language checkpoint (Gemma3ForConditionalGeneration); compress walks text-only causal LMs. "
              "Text-only Gemma 3 checkpoints (model_type gemma3_text, e.g. gemma-3-1b) are supported",
    "mamba": "a state-space model: its blocks have no attention or MLP linears laid out as compress walks them",
    "mamba2": "a state-space model: its blocks have no attention or MLP linears laid out as compress walks them",
}


def supported_names() -> str:
    return ", ".join(f"{family.name} ({model_type})" for model_type, family in SUPPORTED.items())


def refusal(config: dict[str, object]) -> str | None:
    """Why a model with this config.json is not supported; None when its family is (a pure function of the config)."""
    model_type = str(config.get("model_type") or "unknown")
    if config.get("is_encoder_decoder"):
        return (f"model_type '{model_type}' is an encoder-decoder model; compress compresses decoder-only causal LMs "
                "layer by layer (supported: " + supported_names() + ")")
    if model_type in SUPPORTED:
        return None
    if model_type in REFUSED:
        return f"model_type '{model_type}' is not supported: it is {REFUSED[model_type]}"
    return (f"model_type '{model_type}' is not a supported family (supported: {supported_names()}); its layers, "
            f"sublayer groups and export are untested. Set {UNTESTED_ENV}=1 to try it anyway")


def check_supported_family(ref: str, config: dict[str, object]) -> None:
    """Refuse (UserError, exit 2) a model whose family is not supported, naming it and what is missing.

    `config` is the model's config as a dict (`PretrainedConfig.to_dict()`), read before any weight.
    """
    reason = refusal(config)
    if reason is None:
        return
    if os.environ.get(UNTESTED_ENV) == "1" and not config.get("is_encoder_decoder"):
        return
    raise UserError(f"{ref}: {reason}")
