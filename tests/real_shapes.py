"""Random-weight models at real shapes, built on the fly from configs (no download, seconds to create).

The widths stay small so a model builds and runs in seconds on a CPU; what is real is what breaks tools at scale:
a 128,256-token vocabulary (Llama 3) or 151,936 (Qwen2.5), grouped-query attention, tied or untied heads, bf16
weights on disk, rope scaling and long positions. The tokenizer is the tests' small BPE: token ids above its size
are never produced, but every logit row is vocabulary-wide, which is what the evaluators' memory depends on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_models import save_tokenizer

LLAMA3_VOCAB = 128_256
QWEN_VOCAB = 151_936


def llama3_shaped_config(*, layers: int = 2, hidden: int = 64):
    """Llama-3.1 layout: untied head, GQA (8 query heads, 2 key-value) at small width, llama3 rope scaling to 131,072 positions."""
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=LLAMA3_VOCAB, hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, max_position_embeddings=131_072,
        rope_theta=500_000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, dtype="bfloat16",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


def qwen_tied_config(*, layers: int = 2, hidden: int = 64):
    """Qwen2.5-0.5B layout: tied embeddings, GQA, 151,936-token vocabulary, 32k positions."""
    import transformers as tf

    return tf.Qwen2Config(
        vocab_size=QWEN_VOCAB, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32_768, rope_theta=1_000_000.0,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, dtype="bfloat16",
    )


SHAPES = {"llama3": llama3_shaped_config, "qwen-tied": qwen_tied_config}


def save_real_shape_model(folder: Path, shape: str = "llama3", *, seed: int = 0, **sizes) -> Path:
    """Save a random model of `shape` (a key of SHAPES) in bf16 safetensors, with the tests' small tokenizer."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(SHAPES[shape](**sizes)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
