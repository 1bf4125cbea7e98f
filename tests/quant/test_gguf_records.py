"""GGUF block types: our records dequantize exactly as llama.cpp's gguf package reads the bytes we write, GPTQ on a
type's fixed grid beats round-to-nearest on it, and what no GGUF type holds is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compress.quant.gguf_records import GGUFBlocks, GGUFSpec, check_gguf_columns, quantize_gguf_rtn  # noqa: E402
from compress.quant.gguf_types import GGUF_TYPES  # noqa: E402
from compress.quant.records import restore_record, saved_form  # noqa: E402
from compress.recipe.errors import UserError  # noqa: E402


def _weight(rows: int = 6, columns: int = 512) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, columns) * 0.05
    w[0, :40] += 0.3  # a block all on one side of zero: the minimum is exercised
    w[1, 100] = 1.5  # an outlier: a sub-scale at its limit
    w[2, 256:512] = 0  # an all-zero super-block: d = 0
    return w


def _gguf_dequantized(record: GGUFBlocks) -> np.ndarray:
    return gguf.quants.dequantize(record.gguf_bytes(), gguf.GGMLQuantizationType[record.spec.type_name.upper()])


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_written_blocks_dequantize_in_gguf_to_exactly_our_weights(name):
    gtype = GGUF_TYPES[name]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == (gtype.block, gtype.bytes_per_block)
    w = _weight()
    record = quantize_gguf_rtn(w, GGUFSpec(name))
    raw = record.gguf_bytes()
    assert raw.shape == (6, 512 // gtype.block * gtype.bytes_per_block)
    assert np.array_equal(_gguf_dequantized(record), record.dequantize().numpy())
    assert record.storage_bits().total == raw.size * 8
    # rounding on the grid is near: within the type's precision on random weights
    error = (record.dequantize() - w)[3:].norm() / w[3:].norm()
    assert error < {2: 0.4, 3: 0.2, 4: 0.1, 5: 0.05, 6: 0.025, 8: 0.006}[gtype.code_bits]
    restored = restore_record(saved_form(record)[1], lambda part: record.to_tensors()[part])
    assert torch.equal(restored.dequantize(), record.dequantize())


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q4_0", "q5_1"])
def test_gptq_on_the_fixed_grid_is_exact_in_gguf_and_beats_rtn(name):
    from compress.compressors.gptq import gptq_quantize_gguf

    torch.manual_seed(1)
    w = _weight(8, 256)
    # correlated inputs of uneven energy, as a layer's are: GPTQ's error feedback has something to work with
    x = (torch.randn(2048, 48) @ torch.randn(48, 256) + 0.3 * torch.randn(2048, 256)) * torch.linspace(0.2, 3.0, 256)
    hessian = x.T @ x / x.shape[0]
    rtn = quantize_gguf_rtn(w, GGUFSpec(name))
    result = gptq_quantize_gguf(w, hessian, GGUFSpec(name))
    assert np.array_equal(_gguf_dequantized(result.qweight), result.qweight.dequantize().numpy())

    def output_error(record: GGUFBlocks) -> float:
        return float(((x @ (record.dequantize() - w).T) ** 2).mean())

    assert output_error(result.qweight) < 0.9 * output_error(rtn)


def test_a_width_no_block_divides_is_refused_with_the_module_name():
    with pytest.raises(UserError, match=r"gguf:q4_k stores blocks of 256 input columns, and model.layers.0.mlp.down_proj "
                                        r"has 384"):
        check_gguf_columns("model.layers.0.mlp.down_proj", 384, GGUFSpec("q4_k"))
    check_gguf_columns("model.layers.0.mlp.down_proj", 384, GGUFSpec("q4_0"))  # 12 blocks of 32


def test_pruned_weights_stay_zero_on_symmetric_types_and_asymmetric_ones_refuse():
    w = _weight(4, 256)
    mask = torch.rand(4, 256) > 0.5
    kept = quantize_gguf_rtn(w * mask, GGUFSpec("q6_k")).keep_zeros(mask)
    assert (kept.dequantize()[~mask] == 0).all()
    with pytest.raises(UserError, match="gguf:q4_k has a minimum per block"):
        quantize_gguf_rtn(w, GGUFSpec("q4_k")).keep_zeros(mask)
