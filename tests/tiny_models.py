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


def tiny_config(family: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")


def save_tiny_model(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A randomly initialised model of `family` with a small BPE tokenizer, saved as safetensors."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=320))
    model.save_pretrained(folder, safe_serialization=True)
    return folder
