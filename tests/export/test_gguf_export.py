"""`export: {format: gguf}` without llama.cpp: what the file holds, read back with llama.cpp's gguf package, and
what it refuses (by name) before writing anything. tests/export/test_gguf_llama_cpp.py runs the file in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compress.export import CompressedModel, export_checkpoint  # noqa: E402
from compress.quant.gguf_records import GGUFSpec, quantize_gguf_rtn  # noqa: E402
from compress.quant.primitives import PerGroup, QuantSpec  # noqa: E402
from compress.quant.records import quantize_rtn  # noqa: E402
from compress.recipe.errors import UserError  # noqa: E402
from tests.tiny_models import save_tiny_model  # noqa: E402


def _compressed(folder, family: str = "llama", quantize=lambda w: quantize_gguf_rtn(w, GGUFSpec("q4_0"))):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    records = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            records[name] = quantize(module.weight.data)
            module.weight.data = records[name].dequantize()
    return CompressedModel(model, AutoTokenizer.from_pretrained(folder), torch.float32, records)


def _field(reader, key):
    field = reader.fields[key]
    return field.contents()


def test_llama_file_holds_our_blocks_permuted_rows_and_the_tokenizer(tmp_path):
    compressed = _compressed(save_tiny_model(tmp_path / "m", "llama"))
    summary = export_checkpoint(compressed, "gguf", tmp_path / "out")
    assert summary["tensor_types"]["Q4_0"] == 14  # 7 linears x 2 layers
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[:2] == ["<s>", "</s>"] and len(tokens) == 320
    tensors = {t.name: t for t in reader.tensors}
    # a tied lm_head is left out (llama.cpp reuses token_embd); this tiny model's is its own
    assert ("output.weight" in tensors) == (not compressed.model.config.tie_word_embeddings)
    model = compressed.model.model.layers[0]
    down = gguf.quants.dequantize(tensors["blk.0.ffn_down.weight"].data, tensors["blk.0.ffn_down.weight"].tensor_type)
    assert np.array_equal(down, model.mlp.down_proj.weight.data.numpy())
    # q rows in GGML's rotary order: per head, row i of the first half then row i of the second
    q = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, tensors["blk.0.attn_q.weight"].tensor_type)
    ours = model.self_attn.q_proj.weight.data.numpy().reshape(4, 2, 8, 64)
    assert np.array_equal(q.reshape(4, 8, 2, 64), ours.swapaxes(1, 2))


def test_an_architecture_llama_cpp_does_not_know_is_refused_by_name(tmp_path):
    compressed = _compressed(save_tiny_model(tmp_path / "m", "opt"))
    with pytest.raises(UserError, match="this model is OPTForCausalLM"):
        export_checkpoint(compressed, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_integer_codes_no_gguf_type_holds_are_refused_with_the_module_name(tmp_path):
    # int W3 g128 (or any uniform-affine record): float32 scales on no GGUF grid; never re-rounded silently
    compressed = _compressed(save_tiny_model(tmp_path / "m", "llama"),
                             quantize=lambda w: quantize_rtn(w, QuantSpec(3, True, PerGroup(32))))
    with pytest.raises(UserError, match=r"the GGUF format cannot hold integer codes.*\(model.layers.0.self_attn.q_proj, "
                                        r"and 13 more modules\)"):
        export_checkpoint(compressed, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
