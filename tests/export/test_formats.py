"""Export formats on tiny models: packing against independent decoders, loading in transformers, atomicity,
the recipe check, and `inspect`'s byte accounting against the report's bits per weight."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compress.cli.main import app
from compress.engine.context import RunContext, RunInputs
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.recipe.errors import RecipeError
from compress.export import CompressedModel, export_checkpoint, export_run, load_state, save_state
from compress.export.compressed_tensors_format import pack_weight, sparsity_config
from compress.export.gptq_format import pack_gptq
from compress.export.inspect import inspect_checkpoint
from compress.engine.model_io import load_model
from compress.quant.primitives import PerChannel, PerGroup, QuantSpec
from compress.quant.records import quantize_rtn
from compress.recipe.schema import parse_recipe
from compress.report.summary import model_size
from compress.compressors.rtn import RTNConfig, run_rtn


def random_record(bits: int, symmetric: bool, group: int | None, rows: int = 16, columns: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    spec = QuantSpec(bits, symmetric, PerGroup(group) if group else PerChannel())
    return quantize_rtn(torch.randn(rows, columns), spec)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_packing_decodes_to_our_weights(bits, symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compress.export.compressed_tensors_format import build_scheme

    record = random_record(bits, symmetric, 32)
    packed = pack_weight(record, torch.float32)
    scheme = build_scheme(record, None, ["m"])
    decoded = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    torch.testing.assert_close(decoded.float(), record.dequantize(), rtol=0, atol=1e-6)


def unpack_gptq_reference(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Decode the HF GPTQ v1 layout as documented (AutoGPTQ's dequantization): (out, in) float weights."""
    qweight, qzeros = (tensors[k].to(torch.int64) & 0xFFFFFFFF for k in ("qweight", "qzeros"))
    scales, g_idx = tensors["scales"].float(), tensors["g_idx"].long()
    per_word, mask = 32 // bits, (1 << bits) - 1
    rows = torch.arange(qweight.shape[0] * per_word)
    codes = (qweight[rows // per_word] >> (bits * (rows % per_word))[:, None]) & mask  # (in, out)
    columns = torch.arange(qweight.shape[1])
    zeros = ((qzeros[:, columns // per_word] >> (bits * (columns % per_word))[None, :]) & mask) + 1  # (groups, out)
    return ((codes - zeros[g_idx]).float() * scales[g_idx]).t()


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, False, 16), (2, True, None), (8, True, 64)])
def test_gptq_layout_decodes_to_our_weights(bits, symmetric, group):
    record = random_record(bits, symmetric, group)
    tensors = pack_gptq(record)
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (64 * bits // 32, 16)
    assert tensors["scales"].dtype == torch.float16
    expected = record.dequantize()
    scales16 = record.scale.half().float()  # the layout stores float16 scales
    torch.testing.assert_close(unpack_gptq_reference(tensors, bits), expected * 0 + _with_scales(record, scales16),
                               rtol=0, atol=1e-6)


def _with_scales(record, scales):
    from compress.quant.records import UniformAffine

    return UniformAffine(record.codes, scales, record.zero, record.spec).dequantize()


def test_sparsity_config_marks_two_four_only_when_every_mask_is():
    two_four = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert sparsity_config({"a": two_four})["sparsity_structure"] == "2:4"
    assert sparsity_config({"a": two_four})["global_sparsity"] == 0.5
    three_of_four = torch.tensor([[1, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert sparsity_config({"a": two_four, "b": three_of_four})["sparsity_structure"] == "unstructured"


@pytest.fixture(scope="module")
def quantized_tiny(tiny_llama):
    """The tiny Llama after RTN W4 g32, with a 2:4 mask on one projection; weights stored in float32."""
    handle = load_model(str(tiny_llama), device="cpu")
    run = RunContext(RunInputs(device=torch.device("cpu")))
    fqn = "model.layers.0.mlp.up_proj"
    weight = handle.model.get_submodule(fqn).weight.data
    keep = weight.abs().reshape(weight.shape[0], -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros(weight.shape[0], weight.shape[1] // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(weight.shape)
    weight.mul_(mask)
    run.handoff.masks[fqn] = mask
    run_sweep(handle, [SweepStep("rtn", run_rtn, RTNConfig(bits=4, group_size=32), False)], run)
    return handle, run


def compressed_of(handle, run) -> CompressedModel:
    return CompressedModel(handle.model, handle.tokenizer, torch.float32, run.results.records, run.handoff.masks, run.results.activation_quant)


def logits(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randint(0, 300, (2, 24)), use_cache=False).logits


def test_compressed_tensors_export_loads_in_transformers_with_identical_logits(quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    handle, run = quantized_tiny
    summary = export_checkpoint(compressed_of(handle, run), "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["version"] == summary["compressed_tensors_version"] != ""
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert config["ignore"] == ["lm_head"] and len(config["config_groups"]) == 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(handle.model), rtol=0, atol=1e-5)
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "vllm serve" in card and "compressed-tensors 0.20" in card


def test_dense_export_and_state_round_trip(quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    handle, run = quantized_tiny
    save_state(compressed_of(handle, run), tmp_path / "run" / "state")
    restored = load_state(tmp_path / "run" / "state")
    assert set(restored.quantized) == set(run.results.records) and torch.equal(restored.masks["model.layers.0.mlp.up_proj"],
                                                                        run.handoff.masks["model.layers.0.mlp.up_proj"])
    torch.testing.assert_close(logits(restored.model), logits(handle.model), rtol=0, atol=0)
    export_run(tmp_path / "run", "dense", tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(handle.model), rtol=0, atol=1e-5)


def test_interrupted_export_leaves_no_folder(quantized_tiny, tmp_path, monkeypatch):
    import compress.export.compressed_tensors_format as ct_format

    def die_after_weights(*args, **kwargs):
        raise KeyboardInterrupt

    handle, run = quantized_tiny
    monkeypatch.setattr(ct_format, "write_config", die_after_weights)  # weights are written, config is not
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(compressed_of(handle, run), "compressed-tensors", tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_inspect_bytes_equal_report_bits_plus_itemised_overhead(quantized_tiny, tmp_path):
    handle, run = quantized_tiny
    export_checkpoint(compressed_of(handle, run), "compressed-tensors", tmp_path / "ct", dtype="float16")
    size = model_size(handle.model, run.results.records, torch.float16)
    summary = inspect_checkpoint(tmp_path / "ct")
    assert summary.totals["parameters"] == size["parameters"]
    assert summary.totals["bytes_on_disk"] == size["bytes"] + summary.totals["overhead_bytes"]
    up = next(row for row in summary.modules if row.module == "model.layers.0.mlp.up_proj")
    assert (up.bits, up.group_size, up.format) == (4, 32, "pack-quantized") and up.sparsity >= 0.5


def test_gptq_export_itemises_its_extra_bytes(quantized_tiny, tmp_path):
    handle, run = quantized_tiny
    unmasked = CompressedModel(handle.model, handle.tokenizer, torch.float32, run.results.records)
    export_checkpoint(unmasked, "gptq", tmp_path / "gptq", dtype="float16")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == \
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    size = model_size(handle.model, run.results.records, torch.float16)
    summary = inspect_checkpoint(tmp_path / "gptq")
    assert summary.overhead["stored_symmetric_zero_points"] > 0 and summary.overhead["shape_and_index_tensors"] > 0
    assert summary.totals["bytes_on_disk"] == size["bytes"] + summary.totals["overhead_bytes"]


@pytest.mark.parametrize("export,passes,message", [
    ("{format: gptq}", "  - rtn: {bits: 8, activations: {bits: 8}}", "the GPTQ layout holds weight-only quantization"),
    ("{format: gptq}", "  - rtn: {bits: 3}", "the GPTQ layout is written for 2, 4, 8 bits"),
    ("{format: compressed-tensors}", "  - bnb: {mode: nf4}", "only the 'bitsandbytes' format saves"),
    ("{format: bitsandbytes}", "  - rtn: {bits: 4}", "format 'bitsandbytes' saves a model quantized by the bnb pass"),
])
def test_recipe_check_rejects_formats_that_cannot_hold_the_scheme(tiny_llama, export, passes, message):
    text = f"model: {tiny_llama}\npasses:\n{passes}\nexport: {export}\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text)
    assert message in str(caught.value) and "export.format" in str(caught.value)


def test_cli_inspect_json_and_export_errors(quantized_tiny, tmp_path):
    handle, run = quantized_tiny
    export_checkpoint(compressed_of(handle, run), "dense", tmp_path / "dense")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "dense"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "dense"
    missing = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "gptq"])
    assert missing.exit_code == 2 and "no state/ folder" in missing.output
    bad = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "onnx"])
    assert bad.exit_code == 2
