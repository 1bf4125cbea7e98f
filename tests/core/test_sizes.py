"""True sizes: the report's baseline is the model as loaded, its bytes are what each export format stores
(bytes on disk less the itemised overhead, which `compress inspect` lists), and report.html / report.md say what
they measure, with no Python `None` on the page.

Overhead counted apart from the report's bytes: the safetensors header of every file; compressed-tensors'
`weight_shape` tensors, packing padding and scales stored wider than 16 bits; GPTQ's `g_idx` and the zero points it
stores for symmetric codes. config.json, tokenizer files, README.md and compress_report.json are not weights at all
(`bytes_on_disk` counts the safetensors files only).
"""

from __future__ import annotations

import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from compress.app.runner import run_recipe
from compress.export import export_run
from compress.export.inspect import inspect_checkpoint
from compress.recipe.schema import parse_recipe
from tests.conftest import DEMO_MODEL, recipe_text, requires_demo_model


def header_bytes(folder: Path) -> int:
    """The safetensors headers (8-byte length + JSON) of a checkpoint, read here without the library."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            total += 8 + struct.unpack("<Q", handle.read(8))[0]
    return total


def disk(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def loaded_bytes(model_dir: Path) -> tuple[int, int]:
    """(weights, bytes) of a checkpoint as saved: every tensor once, at its stored width."""
    from safetensors import safe_open

    weights = stored = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                weights += count
                stored += count * {"F32": 4, "F16": 2, "BF16": 2}[tensor.get_dtype()]
    return weights, stored


@pytest.fixture(scope="module")
def dropped(tiny_llama, text_file, tmp_path_factory):
    """layer_drop alone (a pruning-only run) with a dense export."""
    out = tmp_path_factory.mktemp("dropped") / "run"
    text = recipe_text(tiny_llama, text_file, "  - layer_drop: {count: 1}", text_file) + "export: {format: dense}\n"
    recipe = out.parent / "drop.yaml"
    recipe.write_text(text)
    from compress.recipe.schema import load_recipe

    run_recipe(load_recipe(recipe), out)
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def narrowed(tiny_llama, text_file, tmp_path_factory):
    """width_prune then RTN W4 g16, exported as compressed-tensors by the run, then gptq and dense from its state."""
    out = tmp_path_factory.mktemp("narrowed") / "run"
    passes = "  - width_prune: {attention_ratio: 0.5, mlp_ratio: 0.5}\n  - rtn: {bits: 4, group_size: 16}"
    text = recipe_text(tiny_llama, text_file, passes, text_file) + "export: {format: compressed-tensors}\n"
    recipe = out.parent / "narrow.yaml"
    recipe.write_text(text)
    from compress.recipe.schema import load_recipe

    run_recipe(load_recipe(recipe), out)
    exports = {"gptq": export_run(out, "gptq", out.parent / "gptq"), "dense": export_run(out, "dense", out.parent / "dense")}
    return out, json.loads((out / "report.json").read_text()), exports


def test_layer_drop_baseline_is_the_model_as_loaded_and_bytes_are_the_dense_export(dropped, tiny_llama):
    out, report = dropped
    size = report["size"]
    weights, stored = loaded_bytes(tiny_llama)
    assert size["baseline_bytes"] == stored and size["baseline_parameters"] == weights  # before the layer went
    assert size["parameters"] == report["passes"][0]["modules"]["model.layers"]["parameters_after"] < weights
    assert size["bytes"] == size["parameters"] * 4 < size["baseline_bytes"]  # float32 checkpoint
    export = out / "export-dense"
    summary = inspect_checkpoint(export)
    assert summary.overhead["safetensors_header"] == header_bytes(export) == summary.totals["overhead_bytes"]
    assert summary.totals["bytes_on_disk"] == disk(export) == size["bytes"] + header_bytes(export)
    assert summary.totals["bytes"] == report["export"]["stored"]["bytes"] == size["bytes"]
    assert summary.totals["original_bytes"] == size["baseline_bytes"]  # the ratio counts the dropped layer


def test_width_prune_rtn_bytes_are_what_compressed_tensors_and_gptq_store(narrowed, tiny_llama):
    out, report, exports = narrowed
    size = report["size"]
    weights, stored = loaded_bytes(tiny_llama)
    assert size["baseline_bytes"] == stored and size["baseline_parameters"] == weights
    assert size["parameters"] < weights and size["quantized_parameters"] > 0
    for folder in (out / "export-compressed-tensors", out.parent / "gptq"):
        summary = inspect_checkpoint(folder)
        extras = {k: v for k, v in summary.overhead.items() if k != "safetensors_header"}
        assert summary.overhead["safetensors_header"] == header_bytes(folder)
        assert summary.totals["bytes_on_disk"] == disk(folder) == size["bytes"] + header_bytes(folder) + sum(extras.values())
        assert summary.totals["bits_per_weight"] == size["bits_per_weight"]
        assert summary.totals["quantized_bits_per_weight"] == size["quantized_bits_per_weight"] == 4 + 16 / 16
    ct = inspect_checkpoint(out / "export-compressed-tensors").overhead
    assert ct["scales_beyond_16_bits"] > 0  # a float32 model's scales are stored in float32; the report counts 16
    assert report["export"]["stored"]["bytes"] == size["bytes"]
    # dense stores the dequantized weights as floats: its own bytes, not the codes'
    dense = exports["dense"]["stored"]
    assert dense["bytes"] == size["parameters"] * 4 and dense["bits_per_weight"] == 32.0
    assert dense["bytes"] == disk(out.parent / "dense") - header_bytes(out.parent / "dense")


@pytest.fixture(scope="module")
def half_tiny(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama stored in float16: bitsandbytes runs compute in float32, the export must write float16."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("half")
    AutoModelForCausalLM.from_pretrained(tiny_llama).half().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama / name).is_file():
            shutil.copy(tiny_llama / name, folder / name)
    return folder


def test_bnb_nf4_report_and_inspect_count_the_stored_tensors(half_tiny, text_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open

    from tests.compressors.test_bnb import _bnb_quantizes_4bit_here

    if not _bnb_quantizes_4bit_here({(64, 64), (160, 64), (64, 160), (32, 64)}):
        pytest.skip("this bitsandbytes cannot run the tiny shapes in 4 bits on this CPU (see _bnb_quantizes_4bit_here)")
    text = recipe_text(half_tiny, text_file, "  - bnb: {mode: nf4}", text_file) + "export: {format: bitsandbytes}\n"
    report = run_recipe(parse_recipe(text), tmp_path / "run")
    size, export = report["size"], tmp_path / "run" / "export-bitsandbytes"
    quantized = everything = 0
    state_json: dict[str, int] = {}
    with safe_open(str(export / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        # a bitsandbytes linear m: m.weight (codes), m.weight.absmax, .nested_absmax, .quant_map, .nested_quant_map,
        # .quant_state.bitsandbytes__nf4 (JSON); its bias, if any, is m.bias
        quantized_modules = {n.removesuffix(".weight.absmax") for n in names if n.endswith(".weight.absmax")}
        for name in names:
            tensor = handle.get_tensor(name)
            module = next((m for m in quantized_modules if name.startswith(f"{m}.weight")), None)
            if module is not None:
                quantized += tensor.numel() * tensor.element_size()
                if ".weight.quant_state." in name:
                    state_json[module] = tensor.numel()
            else:
                assert tensor.dtype == torch.float16, name  # unquantized tensors in the checkpoint's precision
            everything += tensor.numel() * tensor.element_size()
    weights, stored = loaded_bytes(half_tiny)
    assert size["bytes"] == everything == disk(export) - header_bytes(export)
    assert size["parameters"] == weights and size["baseline_bytes"] == stored  # weights, not packed bytes
    assert size["quantized_bytes"] == quantized
    summary = inspect_checkpoint(export)
    for row in summary.modules:
        if row.format == "bitsandbytes nf4":  # n weights: 4-bit codes, an 8-bit absmax per 64, a float32 scale of
            n = row.parameters                # those per 256, the 16 NF4 values and the 256 absmax code values
            assert row.bytes == n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + 16 * 4 + 256 * 4 + state_json[row.module]
    assert size["quantized_bits_per_weight"] == round(8 * quantized / size["quantized_parameters"], 4)
    assert summary.totals["parameters"] == size["parameters"]
    assert summary.totals["bytes"] == size["bytes"] and summary.overhead["safetensors_header"] == header_bytes(export)
    assert summary.totals["bits_per_weight"] == size["bits_per_weight"]
    assert summary.totals["quantized_bits_per_weight"] == size["quantized_bits_per_weight"]
    assert {row.format for row in summary.modules if not row.format.startswith("dense")} == {"bitsandbytes nf4"}


@requires_demo_model()
def test_demo_model_as_loaded_is_8917504_bytes():
    from compress.engine.model_io import load_model
    from compress.report.summary import loaded_size

    handle = load_model(str(DEMO_MODEL), device="cpu")  # tied embeddings: the shared tensor counts once
    assert loaded_size(handle.model, handle.checkpoint_dtype) == {"parameters": 4_458_752, "bytes": 8_917_504}


class Page(HTMLParser):
    """The <title>, and every <section id> as rows of cell texts."""

    def __init__(self, text: str):
        super().__init__()
        self.title, self.sections, self._where, self._section = "", {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self._section = dict(attrs)["id"]
            self.sections[self._section] = []
        elif tag == "tr" and self._section:
            self.sections[self._section].append([])
        elif tag in ("td", "th") and self._section:
            self.sections[self._section][-1].append("")
        self._where = tag

    def handle_data(self, data):
        if self._where == "title" and self._section is None:  # the page's own, not a chart's hover <title>
            self.title += data
        elif self._where in ("td", "th") and self._section:
            self.sections[self._section][-1][-1] += data

    def handle_endtag(self, tag):
        self._where = None if tag in ("td", "th", "title") else self._where
        if tag == "section":
            self._section = None


def test_pruning_only_report_says_no_layer_is_quantized_and_never_none(dropped):
    from rich.console import Console

    from compress.report.summary import summary_table

    out, report = dropped
    console = Console(record=True, width=200)
    console.print(summary_table(report))
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text(), console.export_text()):
        assert "None" not in text
    rows = dict(row[:2] for row in Page((out / "report.html").read_text()).sections["summary"])
    assert rows["bits per weight, quantized layers"] == "no layer is quantized"
    assert rows["bits per weight, whole model"].startswith("32.0 over all")


def test_report_html_title_labels_parameters_protocol_and_time(narrowed, tiny_llama):
    out, report, _ = narrowed
    page = Page((out / "report.html").read_text())
    assert page.title == f"{tiny_llama.name} · narrow · compress run" and str(tiny_llama) not in page.title
    summary = dict(row[:2] for row in page.sections["summary"])
    assert summary["bits per weight, quantized layers"].startswith(f"{report['size']['quantized_bits_per_weight']} over ")
    assert summary["bits per weight, whole model"].startswith(f"{report['size']['bits_per_weight']} over all ")
    assert "unquantized (embeddings, head, norms)" in summary["bits per weight, whole model"]
    passes = {row[0]: row[1] for row in page.sections["passes"][1:]}
    assert passes["rtn"].startswith("bits: 4, group_size: 16") and "attention_ratio: 0.5" in passes["width_prune"]
    (protocol,) = page.sections["protocol"][1:]
    assert protocol == ["perplexity", report["metrics"]["perplexity"]["text"]["protocol"]["dataset"], "token_ppl v1",
                        "32", "seq_len", f"4 windows, {report['metrics']['perplexity']['text']['protocol']['scored_tokens']:,} tokens",
                        "first 4 windows",
                        "from the cache" if report["cache"]["baseline_from_cache"]["perplexity"]["text"] else "computed"]
    time = {row[0].strip(): float(row[1]) for row in page.sections["time"][1:]}
    for phase in ("load the model", "baseline evaluation", "passes", "width_prune", "rtn", "final evaluation",
                  "save the run state and the export", "other (report.json, between phases)", "total"):
        assert phase in time
    top = ("load the model", "baseline evaluation", "continuations (baseline before the passes, compressed after)",
           "passes", "final evaluation", "save the run state and the export", "other (report.json, between phases)")
    assert sum(time[p] for p in top) == pytest.approx(time["total"], abs=0.03)
    # the page is drawn before report.json is written, whose timings add the drawing (`report`) to the total
    assert time["total"] == pytest.approx(report["timings"]["total"] - report["timings"]["report"], abs=0.01)
    assert 0 < report["timings"]["report"] < report["timings"]["total"]


def test_model_label_is_never_an_absolute_path():
    from compress.report.summary import model_label

    assert model_label("/home/me/models/Llama-3.2-1B") == "Llama-3.2-1B"
    assert model_label("/work/compress/recipes/demo/model") == "demo/model"
    assert model_label("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
