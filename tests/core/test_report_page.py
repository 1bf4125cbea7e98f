"""report.html for a GPTQ, a pruning and a mixed-precision run: where the damage is, where the bytes are (to the
byte of `compress inspect`), what the model now says (checked against transformers' own greedy decoding), metrics
with their standard errors; and the three pages in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.export.inspect import inspect_checkpoint
from compress.recipe.errors import RecipeError
from tests.conftest import recipe_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SECTIONS = ("summary", "metrics", "damage", "bytes", "continuations", "protocol", "passes", "time")
PASSES = {
    "gptq": ("  - gptq: {bits: 4, group_size: 32}", "compressed-tensors"),
    "pruning": ("  - wanda: {sparsity: 0.5}", "dense"),
    "mixed": ("  - allocate: {sensitivity: io_similarity, candidates: [2, 4, 8], budget: {avg_bits: 4.5}}\n"
              "  - gptq: {bits: 4, group_size: 32}", "compressed-tensors"),
}
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def pages(tmp_path_factory, tiny_llama, text_file) -> dict[str, Path]:
    from compress.app.runner import run_recipe
    from compress.recipe.schema import load_recipe

    root = tmp_path_factory.mktemp("pages")
    found = {}
    for name, (passes, fmt) in PASSES.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text(recipe_text(tiny_llama, text_file, passes, text_file)
                          + f"export: {{format: {fmt}}}\nreport: {{new_tokens: {NEW_TOKENS}}}\n")
        run_recipe(load_recipe(recipe), root / name)
        found[name] = root / name
    return found


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_byte_chart_total_is_compress_inspect_bytes(pages):
    for name, (_, fmt) in PASSES.items():
        page = (pages[name] / "report.html").read_text()
        charted = int(re.search(r'data-total-bytes="(\d+)"', page).group(1))
        bars = dict(re.findall(r'<g class="bar" data-label="([^"]+)" data-total="([^"]+)"', page))
        inspected = inspect_checkpoint(pages[name] / f"export-{fmt}", sparsity=False).totals["bytes"]
        assert charted == inspected, name
        assert int(float(bars["total after"])) == inspected, name  # the drawn bar, not only the label
        size = _report(pages[name])["size"]
        assert float(bars["total before"]) == size["baseline_bytes"], name
        if name == "gptq":  # 4-bit codes of every linear, 16-bit scales per 32 weights
            assert float(bars["q_proj after"]) == 2 * (64 * 64 * 4 + 64 * 2 * 16) / 8


def test_damage_of_layer_0_matches_the_uncompressed_layer_recomputed(pages, tiny_llama, text_file):
    """Layer 0 reads the embeddings, which no pass changes, so its measured output error can be recomputed
    from the original model and the dense export alone."""
    from compress.engine.damage import relative_error, sampled_positions
    from compress.engine.data import load_text, sample_windows, tokenize_text

    report = _report(pages["pruning"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    cal = report["recipe"]["calibration"]
    windows = sample_windows(tokenize_text(tokenizer, load_text(str(text_file))), cal["samples"], cal["seq_len"], cal["seed"])
    first_batch = windows[: cal["batch_size"]]

    def layer0_output(folder: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        caught = []
        model.model.layers[0].register_forward_hook(lambda _m, _a, out: caught.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            model(first_batch, use_cache=False)
        return caught[0].reshape(-1, caught[0].shape[-1])

    positions = sampled_positions(first_batch.numel())
    expected = relative_error(layer0_output(pages["pruning"] / "export-dense")[positions], layer0_output(tiny_llama)[positions])
    measured = report["damage"]["sweeps"][0]["layers"]["model.layers.0"]
    assert measured["windows"] == 4 and measured["positions"] == first_batch.numel()
    assert measured["output_rel_error"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert expected > 0.01  # half the weights gone: a visible error, not a zero that would pass anything
    worst = report["damage"]["worst"]
    assert len(worst) == 10 and [w["output_rel_error"] for w in worst] == sorted((w["output_rel_error"] for w in worst), reverse=True)


def test_continuations_are_the_baseline_and_compressed_models_own_greedy_decoding(pages, tiny_llama):
    said = _report(pages["pruning"])["continuations"]
    assert said["new_tokens"] == NEW_TOKENS and len(said["prompts"]) == 3
    assert said["source"].startswith("the first sentences of the calibration text")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)

    def greedy(folder: Path, prompt: str) -> list[int]:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens = out[0, ids.shape[1]:].tolist()
        return tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens

    for item in said["prompts"]:
        assert item["baseline"]["tokens"] == greedy(tiny_llama, item["prompt"])  # made before the passes
        assert item["compressed"]["tokens"] == greedy(pages["pruning"] / "export-dense", item["prompt"])
        assert len(item["top1_agreement"]) == len(item["baseline"]["tokens"])
        # agreement is teacher-forced on the baseline, so it holds at least up to the first differing token
        first = item["first_difference"]
        assert all(item["top1_agreement"][:first])
        if first is not None:
            assert item["top1_agreement"][first] is False


def test_change_is_marked_only_beyond_its_standard_error():
    from compress.report.summary import change_verdict

    acc = {"baseline": 0.60, "compressed": 0.55, "baseline_stderr": 0.03, "compressed_stderr": 0.03}
    assert change_verdict("acc", acc) == "worse"  # 0.05 beyond hypot(0.03, 0.03) = 0.042
    assert change_verdict("acc", {**acc, "compressed": 0.57}) == "within noise"  # 0.03 is not
    assert change_verdict("acc", {**acc, "compressed": 0.66}) == "better"
    assert change_verdict("perplexity", {"baseline": 10.0, "compressed": 10.1}) == "worse"
    ppl = {"baseline": 10.0, "compressed": 9.9, "baseline_stderr": 0.1, "compressed_stderr": 0.1}
    assert change_verdict("last_word_perplexity", ppl) == "within noise"  # 0.1 within hypot(0.1, 0.1)
    assert change_verdict("last_word_perplexity", {**ppl, "compressed": 10.2}) == "worse"


def test_report_section_of_a_recipe_is_validated(write_recipe, tiny_llama):
    from compress.recipe.schema import load_recipe

    path = write_recipe(f"model: {tiny_llama}\npasses: []\nreport:\n  prompts: ['']\n  new_tokens: 0\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    text = str(caught.value)
    assert f"{path}:4 report.prompts[0]: string should have at least 1 character" in text
    assert f"{path}:5 report.new_tokens: expected greater than or equal to 1, got 0" in text


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium (apt-get install chromium); .ci/run installs it")
def test_three_pages_render_in_a_real_browser_with_every_section(pages, tmp_path):
    for name, run in pages.items():
        page = run / "report.html"
        text = page.read_text()
        for section in SECTIONS:
            assert f'<section id="{section}">' in text, (name, section)
        assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
        assert "@media print" in text
        shot = tmp_path / f"{name}.png"
        browser = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,3000",
             "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        assert shot.is_file(), browser.stderr[-2000:]
        assert [line for line in browser.stderr.splitlines() if ":CONSOLE" in line] == [], name
