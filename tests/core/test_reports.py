"""report.json against its schema, report.html in a real browser, `compress report` and `compress compare`."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app
from compress.report.html import layer_grid, module_field
from tests.conftest import recipe_text

SCHEMA = Path(__file__).resolve().parents[2] / "compress" / "report" / "report.schema.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def compress_run(recipe: Path, output: Path) -> dict:
    from compress.recipe.schema import load_recipe
    from compress.app.runner import run_recipe

    return run_recipe(load_recipe(recipe), output)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, text_file) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reports")
    found = {}
    for name, bits in (("w4", 4), ("w8", 8)):
        recipe = root / f"{name}.yaml"
        recipe.write_text(recipe_text(tiny_llama, text_file, f"  - rtn: {{bits: {bits}, group_size: 32}}", text_file)
                          + "report: {new_tokens: 2}\n")
        compress_run(recipe, root / name)
        found[name] = root / name
    return found


def with_other_passes(report: dict) -> dict:
    """What pruning and allocation passes (other issues) add: per-module sparsity and an allocation section."""
    modules = report["passes"][0]["modules"]
    report["passes"].append({"name": "wanda", "params": {}, "seconds": 0.1, "summary": {"modules": len(modules)},
                             "modules": {fqn: {"sparsity": 0.5} for fqn in modules}})
    parameters = 1000 * len(modules)
    report["allocation"] = {  # the shape compressors/allocate.py writes
        "estimator": "hessian_trace", "solver": "ilp", "granularity": "module", "group_size": 32,
        "parameters": parameters, "cost": 0.25,
        "budget": {"avg_bits": 3.0, "bits": 3 * parameters, "bytes": 3 * parameters // 8},
        "used": {"bits": 3 * parameters, "bytes": 3 * parameters // 8, "avg_bits": 3.0},
        "plan": {fqn: 4 if i % 2 else 2 for i, fqn in enumerate(modules)},
        "units": {fqn: {"modules": [fqn], "parameters": 1000, "bits": 4 if i % 2 else 2} for i, fqn in enumerate(modules)},
        "module_scores": {fqn: 1.0 / (i + 1) for i, fqn in enumerate(modules)},
        "frontier": [{"bits": b * parameters, "avg_bits": b, "cost": 1.0 / b} for b in (2.5, 3.0, 3.5, 4.0)],
    }
    return report


def test_report_json_matches_its_schema(runs):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    report = json.loads((runs["w4"] / "report.json").read_text())
    jsonschema.validate(report, schema)
    assert report["schema_version"] == schema["properties"]["schema_version"]["const"]
    broken = {k: v for k, v in report.items() if k != "size"}
    with pytest.raises(jsonschema.ValidationError, match="'size' is a required property"):
        jsonschema.validate(broken, schema)
    broken = {**report, "weights_sha256": "not-a-digest"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_run_folder_records_what_reproduces_it(runs):
    report = json.loads((runs["w4"] / "report.json").read_text())
    assert report["seed"] == 0 and report["model"]["device"] == "cpu"
    assert report["versions"]["torch"] and report["versions"]["safetensors"] != "not installed"
    assert report["peak_memory"]["cpu_rss_bytes"] > 2**20
    assert report["passes"][0]["seconds"] > 0 and report["timings"]["total"] >= report["timings"]["passes"]
    resolved = (runs["w4"] / "recipe.yaml").read_text()
    assert "bits: 4" in resolved and "symmetric: true" in resolved  # defaults filled in
    log = (runs["w4"] / "run.log").read_text()
    assert "passes[0].rtn: 2 layers" in log and "perplexity" in log


def test_bits_heatmap_grid_is_layers_by_module_type(runs):
    report = json.loads((runs["w4"] / "report.json").read_text())
    layers, kinds, grid = layer_grid(module_field(report, "bits"))
    assert layers == [0, 1]
    assert kinds[:3] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] and len(kinds) == 7
    assert all(value == 4 for row in grid for value in row)
    _, _, partial = layer_grid({"model.layers.1.mlp.up_proj": 3.0, "model.layers.0.self_attn.q_proj": 8.0})
    assert partial[0][0] == 8.0 and math.isnan(partial[0][1]) and partial[1][1] == 3.0


def test_report_command_rerenders_html_with_every_plot(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["w4"], run_dir)
    report = with_other_passes(json.loads((run_dir / "report.json").read_text()))
    (run_dir / "report.json").write_text(json.dumps(report))
    (run_dir / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    ppl = report["metrics"]["perplexity"]["text"]
    assert f"{ppl['baseline']:.4f}" in page and f"{ppl['compressed']:.4f}" in page
    for title in ("Bits per module", "Sparsity per module", "Sensitivities", "Pareto frontier"):
        assert f'alt="{title}" src="data:image/png;base64,' in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    plain = (runs["w4"] / "report.html").read_text()
    assert 'alt="Bits per module"' in plain and 'alt="Sparsity per module"' not in plain  # absent data, no plot


def test_report_command_refuses_a_folder_without_report(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no report.json" in result.output


def test_compare_page_plots_quality_against_size_and_puts_runs_side_by_side(runs, tmp_path):
    page = tmp_path / "compare.html"
    result = CliRunner().invoke(app, ["compare", str(runs["w4"]), str(runs["w8"]), "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    reports = [json.loads((runs[n] / "report.json").read_text()) for n in ("w4", "w8")]
    points = re.findall(r'class="point" data-x="([^"]+)" data-y="([^"]+)"', text)
    assert [(float(x), float(y)) for x, y in points] == [
        (r["size"]["bytes"] / 2**20, r["metrics"]["perplexity"]["text"]["compressed"]) for r in reports]
    assert 'id="side-by-side"' in text and text.count('aria-label="bytes by part"') == 2


def test_compare_lists_each_run_and_writes_html(runs, tmp_path):
    page = tmp_path / "compare.html"
    result = CliRunner().invoke(app, ["compare", str(runs["w4"]), str(runs["w8"]), "--json", "--html", str(page)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    reports = [json.loads((runs[n] / "report.json").read_text()) for n in ("w4", "w8")]
    assert [row["bits/weight"] for row in rows] == [str(r["size"]["bits_per_weight"]) for r in reports]
    ppl_column = next(key for key in rows[0] if key.startswith("perplexity[text]"))
    assert [float(row[ppl_column]) for row in rows] == [round(r["metrics"]["perplexity"]["text"]["compressed"], 4) for r in reports]
    assert float(rows[0]["size MiB"]) < float(rows[1]["size MiB"])
    assert "perplexity [text] against size" in page.read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium (apt-get install chromium); .ci/run installs it")
def test_report_html_renders_in_a_real_browser_without_console_errors(runs, tmp_path):
    import matplotlib.image

    page = tmp_path / "report.html"
    from compress.report.html import render_html

    page.write_text(render_html(with_other_passes(json.loads((runs["w4"] / "report.json").read_text()))))
    shot = tmp_path / "shot.png"
    browser = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400",
         "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), browser.stderr[-2000:]
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1200
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page
    assert (pixels[..., :3].min(axis=2) < 0.5).mean() > 0.01  # a visible share of dark (drawn) pixels


def test_unsupported_architecture_names_the_class_and_what_is_supported():
    from torch import nn

    from compress.recipe.errors import UserError
    from compress.engine.model_io import find_decoder_layers

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(4, 4, 3))

    with pytest.raises(UserError, match=r"ConvNet is not supported.*model\.layers.*Llama"):
        find_decoder_layers(ConvNet())
