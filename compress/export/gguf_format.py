"""`gguf` format: one `model.gguf` file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) loads, written with
llama.cpp's own `gguf` package.

What goes in, as llama.cpp's convert_hf_to_gguf.py writes it for the architecture (Llama and Mistral as `llama`,
Qwen2 as `qwen2`, Qwen3 as `qwen3`; any other is refused by name):
- hyperparameters (`llama.block_count`, `llama.rope.freq_base`, ...), tensor names from gguf's TensorNameMap,
  and Llama's q/k rows permuted into GGML's rotary layout (the converter's `LlamaModel.permute`);
- every quantized linear in the GGUF block type its `GGUFBlocks` record holds, byte for byte (a record of any other
  kind, integer or float codes, is refused with its module name: never re-rounded); norms and biases in F32, the
  other tensors in the export dtype (F16 / BF16 / F32; `auto` keeps the checkpoint's);
- the tokenizer: byte-level BPE as `tokenizer.ggml.model = gpt2` with tokens, token types, merges, special ids and
  a `tokenizer.ggml.pre` llama.cpp knows whose split regex is this tokenizer's (the converter refuses a tokenizer
  whose pre-tokenizer it does not recognise by hash; we recognise it by its regex instead). Other tokenizer kinds
  are refused.

Recipe example:

    passes:
      - gptq: {format: "gguf:q4_k"}
    export: {format: gguf}          # RUN_DIR/export-gguf/model.gguf
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.export.common import export_dtype, writable_records
from compress.export.state import CompressedModel, unique_state_dict
from compress.quant.gguf_records import GGUFBlocks
from compress.recipe.errors import UserError

GGUF_FILE = "model.gguf"

# HF architecture -> (llama.cpp architecture, whether q/k rows are permuted to GGML's rotary layout), as
# convert_hf_to_gguf.py registers them (LlamaModel covers Mistral; Qwen2Model and Qwen3Model do not permute).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}

# Pre-tokenizer split regexes -> the `tokenizer.ggml.pre` whose regex llama.cpp applies (src/llama-vocab.cpp).
GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {GPT2_REGEX: "gpt-2", LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType


def write_gguf(compressed: CompressedModel, folder: Path, dtype_name: str) -> dict[str, Any]:
    """Write `folder/model.gguf`; returns the tensor types written (type -> count) and notes."""
    import gguf

    config = compressed.model.config
    arch, permute = _architecture(config)
    records = writable_records(compressed.quantized, "gguf", GGUFBlocks, lambda fqn, record: "the GGUF format")
    tokenizer = _tokenizer_metadata(compressed.tokenizer, config)  # refused before the file is opened
    writer = gguf.GGUFWriter(str(folder / GGUF_FILE), arch)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer)
    counts = _add_tensors(writer, compressed, records, arch, permute, export_dtype(dtype_name, compressed))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = [f"activation quantization of {len(compressed.activation_quant)} modules is not stored (weight-only)"] \
        if compressed.activation_quant else []
    return {"file": GGUF_FILE, "tensor_types": dict(sorted(counts.items())), "notes": notes}


def _architecture(config: Any) -> tuple[str, bool]:
    names = list(getattr(config, "architectures", None) or [])
    known = [name for name in names if name in ARCHITECTURES]
    if not known:
        raise UserError(f"GGUF export writes {', '.join(ARCHITECTURES)} models (llama.cpp's llama, qwen2, qwen3); "
                        f"this model is {', '.join(names) or getattr(config, 'model_type', 'of unknown architecture')}")
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"GGUF export writes plain RoPE only; this {known[0]} uses rope type "
                        f"{rope.get('rope_type', rope.get('type'))!r} (its frequency table is not written)")
    return ARCHITECTURES[known[0]]


def _rope_parameters(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _add_hyperparameters(writer: Any, config: Any) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_parameters(config)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "compressed model"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # the converter writes these only when they differ
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_metadata(tokenizer: Any, config: Any) -> dict[str, Any]:
    """tokens, token types, merges, pre, special ids and add_bos/add_eos of a byte-level BPE tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizer.json) tokenizer saved with the model")
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 kind); this one is "
                        f"{model.get('type')}{' with byte fallback (sentencepiece kind)' if model.get('byte_fallback') else ''}")
    pre = _pre_tokenizer(data.get("pre_tokenizer"))
    vocab: dict[str, int] = {**model["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    size = max(config.vocab_size, max(vocab.values()) + 1)
    by_id = {index: token for token, index in vocab.items()}
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{index}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(by_id[index])
        types.append(TOKEN_CONTROL if index in special else TOKEN_USER_DEFINED if index in added else TOKEN_NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre,
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id, "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
            "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def _pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer name whose split regex is this tokenizer's."""
    if pre is None:
        raise UserError("GGUF export: the tokenizer has no pre-tokenizer; llama.cpp would split text differently")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [step["pattern"].get("Regex") for step in steps if step.get("type") == "Split"]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if not byte_level:
        raise UserError(f"GGUF export writes byte-level BPE tokenizers; this pre-tokenizer is {pre.get('type')}")
    if byte_level[0].get("add_prefix_space"):
        raise UserError("GGUF export: this tokenizer adds a prefix space, which llama.cpp's gpt2 tokenizers do not")
    if not regexes and byte_level[0].get("use_regex", True):
        regexes = [GPT2_REGEX]  # ByteLevel's own split is GPT-2's
    if len(regexes) != 1 or regexes[0] not in PRE_TOKENIZERS:
        raise UserError(f"GGUF export: llama.cpp knows no pre-tokenizer with this split ({regexes}); its text would "
                        f"be tokenized differently (known: {', '.join(PRE_TOKENIZERS.values())})")
    return PRE_TOKENIZERS[regexes[0]]


def _add_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if meta[key] is not None:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# ---------------------------------------------------------------------------------------------------
# Tensors


def _add_tensors(writer: Any, compressed: CompressedModel, records: dict[str, GGUFBlocks], arch: str, permute: bool,
                 dtype: torch.dtype) -> dict[str, int]:
    import gguf

    config = compressed.model.config
    names = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    tensors, _tied = unique_state_dict(compressed.model)  # a tied lm_head is left out: llama.cpp reuses token_embd
    counts: dict[str, int] = {}
    for hf_name, tensor in tensors.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise UserError(f"GGUF export: no llama.cpp tensor name for {hf_name} in the {arch} architecture")
        rows = _row_order(hf_name, tensor.shape[0], config) if permute else None
        record = records.get(hf_name.removesuffix(".weight")) if hf_name.endswith(".weight") else None
        if record is not None:
            data = record.gguf_bytes()
            qtype = gguf.GGMLQuantizationType[record.spec.type_name.upper()]
            writer.add_tensor(gguf_name, data if rows is None else data[rows], raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            continue
        array, qtype = _float_array(tensor, dtype)
        writer.add_tensor(gguf_name, array if rows is None else array[rows], raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def _arch_enum(arch: str) -> Any:
    import gguf

    return next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)


def _row_order(hf_name: str, rows: int, config: Any) -> np.ndarray | None:
    """Llama's q/k output rows in GGML's rotary layout: per head, the two rotated halves interleaved (the
    converter's `LlamaModel.permute`); None for every other tensor."""
    heads = config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        heads = getattr(config, "num_key_value_heads", None) or heads
    elif ".self_attn.q_proj." not in hf_name:
        return None
    index = np.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _float_array(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, Any]:
    """1-D tensors (norms, biases) in F32, as the converter writes them; matrices in the export dtype."""
    import gguf

    tensor = tensor.detach().cpu()
    if tensor.ndim <= 1 or dtype == torch.float32:
        return tensor.float().numpy(), gguf.GGMLQuantizationType.F32
    if dtype == torch.bfloat16:  # numpy has no bfloat16: the raw 16-bit patterns, which BF16 is
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(tensor.shape[0], -1), \
            gguf.GGMLQuantizationType.BF16
    return tensor.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
