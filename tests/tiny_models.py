"""Tiny random models of each supported family, built on the fly (nothing downloaded, nothing committed)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the model layer weight scale group token python function return value list dict string file "
    "import class object error test data bit zero one two three four eight quantize prune sparse dense"
).split()


def synthetic_text(words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while words > 0:
        length = rng.randint(4, 12)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
        words -= length
    return " ".join(sentences)


def save_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([synthetic_text(3000, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


# Attention models share these tiny sizes: 2 layers, hidden 64, 4 query heads on 2 key-value heads (GQA).
_ATTENTION = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
_MOE = dict(_ATTENTION, intermediate_size=96, num_experts_per_tok=2)


def tiny_config(family: str, vocab_size: int):
    """A 2-layer, 64-wide config of `family` (a key of FAMILY_CONFIGS), keeping what makes the family itself."""
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(FAMILY_CONFIGS)}")
    return FAMILY_CONFIGS[family](dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1))


def _llama(common):
    import transformers as tf

    return tf.LlamaConfig(**_ATTENTION, **common)


def _llama3(common):
    """Llama 3.1: GQA and llama3 rope scaling (original context 64 positions so the scaling acts inside 256)."""
    import transformers as tf

    return tf.LlamaConfig(**_ATTENTION, rope_theta=500_000.0, **common, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})


def _mistral(common):
    import transformers as tf

    return tf.MistralConfig(**_ATTENTION, sliding_window=None, **common)


def _qwen2(common):
    import transformers as tf

    return tf.Qwen2Config(**_ATTENTION, **common)


def _qwen3(common):
    import transformers as tf

    return tf.Qwen3Config(**_ATTENTION, head_dim=16, **common)  # q/k norms per head


def _gemma2(common):
    """Gemma 2: sliding-window layers alternating with global ones (window 16 < the tests' 32-token windows),
    logit soft-capping, tied embeddings scaled by sqrt(hidden)."""
    import transformers as tf

    return tf.Gemma2Config(**_ATTENTION, head_dim=16, sliding_window=16, **common)


def _gemma3_text(common):
    import transformers as tf

    return tf.Gemma3TextConfig(**_ATTENTION, head_dim=16, sliding_window=16, **common)


def _phi3(common):
    import transformers as tf

    return tf.Phi3Config(**_ATTENTION, pad_token_id=1, **common)  # fused qkv_proj and gate_up_proj


def _opt(common):
    import transformers as tf

    return tf.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1, **common)


def _gpt2(common):
    import transformers as tf

    return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)  # Conv1D, not nn.Linear


def _gpt_neox(common):
    import transformers as tf

    return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, **common)  # fused query_key_value, partial rotary


def _mixtral(common):
    import transformers as tf

    return tf.MixtralConfig(**_MOE, num_local_experts=4, **common)


def _qwen3_moe(common):
    import transformers as tf

    return tf.Qwen3MoeConfig(**_MOE, head_dim=16, moe_intermediate_size=32, num_experts=4, decoder_sparse_step=1,
                             **common)


def _qwen2_moe(common):
    import transformers as tf

    return tf.Qwen2MoeConfig(**_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                             decoder_sparse_step=1, **common)


def _deepseek_v3(common):
    import transformers as tf

    # multi-head latent attention: one kv head per query head; kv_lora_rank 32, a multiple of the tests' group
    # size, since compressed-tensors refuses at load a group that does not divide a matrix's columns
    moe = dict(_MOE, num_key_value_heads=4)
    return tf.DeepseekV3Config(**moe, moe_intermediate_size=32, n_routed_experts=4, n_group=1, topk_group=1,
                               first_k_dense_replace=0, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=32,
                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)


FAMILY_CONFIGS = {
    "llama": _llama, "llama3": _llama3, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
    "gemma3_text": _gemma3_text, "phi3": _phi3, "opt": _opt, "gpt2": _gpt2, "gpt_neox": _gpt_neox,
    "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3,
}
# The engine tests' families (tests/core/test_engine.py); the whole matrix is tests/scale/test_families.py.
FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")


def save_tiny_model(folder: Path, family: str = "llama", seed: int = 0, layers: int | None = None) -> Path:
    """A randomly initialised model of `family` with a small BPE tokenizer, saved as safetensors."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = tiny_config(family, vocab_size=320)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
