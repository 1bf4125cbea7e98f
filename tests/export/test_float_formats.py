"""Element-float weights (FP8, NVFP4, MXFP4) end to end on the tiny Llama: recipes refuse bad combinations naming
the file and line, the compressed-tensors export parses with the library's own config model and reloads in
transformers, `inspect` reports the formats and the report's bytes, a mixed-format allocator plan exports and
reloads, and a killed run resumes bit-identically."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from compress.cli.main import app
from compress.app.runner import run_recipe
from compress.engine.checkpoint import FAULT_ENV
from compress.engine.context import RunContext, RunInputs
from compress.engine.data import load_text, tokenize_text
from compress.engine.layer_sweep import SweepStep, run_sweep
from compress.engine.model_io import load_model
from compress.export import CompressedModel, export_checkpoint
from compress.export.inspect import inspect_checkpoint
from compress.quant.float_records import ElementFloat
from compress.recipe.errors import RecipeError
from compress.recipe.schema import parse_recipe
from compress.report.summary import model_size
from compress.compressors.rtn import RTNConfig, run_rtn
from compress.evaluators.perplexity import perplexity_of
from tests.conftest import recipe_text

LAYOUT = {"fp8": "float-quantized (channel)", "fp8-tensor": "float-quantized (tensor)",
          "fp8-block": "float-quantized (block)", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def parse_quantization_config(qconfig: dict) -> object:
    """compressed-tensors' own parsing of config.json's quantization_config (what transformers and vLLM call)."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate({k: v for k, v in qconfig.items()
                                              if k not in ("version", "sparsity_config", "transform_config")})


def loaded_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def sample_logits(model) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randint(0, 300, (2, 24)), use_cache=False).logits.float()


@pytest.mark.parametrize("label", list(LAYOUT))
def test_export_parses_reloads_and_inspects_as_stored(tiny_llama, tmp_path, label):
    from transformers import AutoModelForCausalLM

    name, _, strategy = label.partition("-")
    handle = load_model(str(tiny_llama), device="cpu")
    run = RunContext(RunInputs(device=torch.device("cpu")))
    cfg = RTNConfig(format=name, **({"strategy": strategy} if strategy else {}))
    run_sweep(handle, [SweepStep("rtn", run_rtn, cfg, False)], run)
    assert all(isinstance(r, ElementFloat) for r in run.results.records.values()) and len(run.results.records) == 14
    compressed = CompressedModel(handle.model, handle.tokenizer, torch.float32, run.results.records)
    export_checkpoint(compressed, "compressed-tensors", tmp_path / "ct")

    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = parse_quantization_config(qconfig)
    assert qconfig["format"] == LAYOUT[label].split(" ")[0] and len(parsed.config_groups) == 1  # type: ignore[attr-defined]

    summary = inspect_checkpoint(tmp_path / "ct")
    rows = {row.module: row for row in summary.modules}
    down = rows["model.layers.0.mlp.down_proj"]
    assert (down.format, down.bits, down.parameters) == (LAYOUT[label], 8 if name == "fp8" else 4, 64 * 160)
    size = model_size(handle.model, run.results.records, torch.float32)
    assert summary.totals["bytes"] == size["bytes"]  # scales counted at their stored width on both sides

    # transformers runs both compressed on the CPU, dequantizing in each forward: FP8 in the float32 model, exactly
    # ours; the FP4 layouts only in bfloat16 (their decompression makes bfloat16 weights, tested exact in
    # tests/quant/test_float_records.py), so they are ours up to bfloat16 arithmetic
    ours = sample_logits(handle.model)
    if name == "fp8":
        assert torch.equal(sample_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)), ours)
    else:
        reloaded = sample_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16))
        assert (reloaded - ours).norm() / ours.norm() < 0.01


@pytest.mark.parametrize("passes,export,message", [
    ("  - rtn: {format: fp8, bits: 4}", "", "format fp8 fixes its element width and scales; bits apply to format int"),
    ("  - rtn: {format: nvfp4, strategy: block}", "", "nvfp4 has a fixed scale per 16 columns"),
    ("  - rtn: {strategy: block}", "", "strategy chooses fp8's scale layout"),
    ("  - rtn: {format: fp4}", "", "'int', 'fp8', 'nvfp4', 'mxfp4', 'gguf:q4_0'"),
    ("  - awq: {format: fp8}", "", "awq rounds to integer codes"),
    ("  - rtn: {format: mxfp4, activations: {bits: 8}}", "", "format mxfp4 is weight-only here"),
    ("  - rtn: {format: fp8, strategy: block}", "export: {format: gptq}",
     "the rtn pass produces element float codes (FP8/FP4), which only the 'compressed-tensors' or 'dense' format saves"),
    ("  - allocate: {budget: {avg_bits: 4}, candidates: [4, fp9]}\n  - rtn: {}", "",
     "got ['fp9'] (or name a format: fp8, fp8-tensor, fp8-block, nvfp4, mxfp4, gguf:q4_0"),
])
def test_recipe_refuses_bad_combinations_at_their_line(tiny_llama, text_file, passes, export, message):
    text = recipe_text(tiny_llama, text_file, passes, text_file) + export + "\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text)
    assert message in str(caught.value)


def test_cli_validate_names_the_file_and_line(tiny_llama, text_file, write_recipe):
    path = write_recipe(recipe_text(tiny_llama, text_file, "  - gptq: {format: nvfp4, group_size: 16}", text_file))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "recipe.yaml:5" in result.output and "group_size apply to format int" in result.output


def test_mixed_format_plan_at_a_byte_budget_exports_and_reloads(tiny_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    # 14 matrices, 61,440 weights: all fp8 (float32 scale per row) is 66,048 bytes, all int4 g32 48,384; 56,000
    # makes the allocator mix 8-bit FP8 with 4-bit modules
    passes = ("  - allocate: {sensitivity: io_similarity, candidates: [4, nvfp4, fp8], budget: {bytes: 56000}}\n"
              "  - rtn: {group_size: 32}")
    text = recipe_text(tiny_llama, text_file, passes, text_file) + "export: {format: compressed-tensors}\n"
    report = run_recipe(parse_recipe(text), tmp_path / "out")
    allocation = report["allocation"]
    assert allocation["used"]["bytes"] <= 56000 and "fp8" in allocation["plan"].values()
    assert set(allocation["plan"].values()) & {4, "nvfp4"}
    folder = tmp_path / "out" / "export-compressed-tensors"
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    parse_quantization_config(qconfig)
    formats = {group["format"] for group in qconfig["config_groups"].values()}
    assert qconfig["format"] == "mixed-precision" and len(formats) == len(qconfig["config_groups"]) > 1
    summary = inspect_checkpoint(folder)
    quantized = [row for row in summary.modules if not row.format.startswith("dense")]
    # the plan's bits as stored, less what inspect itemises as layout overhead (the int4 layout's shape tensors)
    assert 8 * sum(row.bytes - row.overhead_bytes for row in quantized) == allocation["used"]["bits"]
    # the FP4 groups decompress to bfloat16 only, so the whole mix reloads in bfloat16: perplexity within 1%
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    token_ids = tokenize_text(loaded_tokenizer(folder), load_text(str(text_file)))
    reloaded, _ = perplexity_of(loaded, token_ids, seq_len=32, batch_size=4, device=torch.device("cpu"), max_windows=4)
    in_memory = report["metrics"]["perplexity"]["text"]["compressed"]
    assert abs(reloaded / in_memory - 1) < 0.01


def test_killed_gptq_nvfp4_run_resumes_bit_identically(tiny_llama, text_file, tmp_path, monkeypatch):
    passes = "  - gptq: {format: nvfp4}"
    (tmp_path / "recipe.yaml").write_text(recipe_text(tiny_llama, text_file, passes, text_file), encoding="utf-8")

    def run(*args: str) -> object:
        return CliRunner().invoke(app, ["run", str(tmp_path / "recipe.yaml"), "--json", *args])

    straight = run("--output", str(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    monkeypatch.setenv(FAULT_ENV, "0:INT")  # Ctrl-C right after layer 0's checkpoint
    stopped = run("--output", str(tmp_path / "resumed"))
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.delenv(FAULT_ENV)
    resumed = run("--output", str(tmp_path / "resumed"), "--resume")
    assert resumed.exit_code == 0, resumed.output
    reference, again = json.loads(straight.stdout), json.loads(resumed.stdout)
    assert again["weights_sha256"] == reference["weights_sha256"] and again["metrics"] == reference["metrics"]
    assert again["passes"][0]["modules"] == reference["passes"][0]["modules"]
    assert "resuming at decoder layer 1 of 2" in (tmp_path / "resumed" / "run.log").read_text()
    assert os.path.isdir(tmp_path / "resumed" / "state")


def test_lazy_run_streams_the_same_float_export_as_an_eager_one(text_file, tmp_path):
    """`lazy: true` packs each layer as it finishes (compress/export/streaming.py): FP8 blocks and NVFP4 in one
    plan give the eager export's tensors exactly, and the same config."""
    from safetensors.torch import load_file

    from tests.scale.helpers import run_lazy_and_eager, save_sharded_bf16

    model = save_sharded_bf16(tmp_path / "sharded", layers=2)
    (tmp_path / "plan.yaml").write_text('"*mlp*": nvfp4\n"*self_attn*": fp8-block\n', encoding="utf-8")

    def recipe(lazy: bool) -> str:
        return (f"model: {model}\nlazy: {str(lazy).lower()}\npasses:\n  - rtn: {{plan: {tmp_path / 'plan.yaml'}}}\n"
                f"evaluate:\n  perplexity:\n    - {{dataset: {text_file}, seq_len: 32, max_windows: 2}}\n"
                "export: {format: compressed-tensors}\n")

    runs = run_lazy_and_eager(tmp_path, recipe)
    streamed, whole = ({k: v for f in sorted((out / "export-compressed-tensors").glob("*.safetensors"))
                        for k, v in load_file(str(f)).items()} for out, _ in (runs[True], runs[False]))
    assert set(streamed) == set(whole) and any(k.endswith("weight_global_scale") for k in whole)
    for name, tensor in whole.items():
        assert torch.equal(streamed[name], tensor), name
    configs = [json.loads((out / "export-compressed-tensors" / "config.json").read_text())["quantization_config"]
               for out, _ in (runs[True], runs[False])]
    assert configs[0] == configs[1]
    assert sorted(g["format"] for g in configs[0]["config_groups"].values()) == ["float-quantized",
                                                                                 "nvfp4-pack-quantized"]
