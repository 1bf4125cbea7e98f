"""Lazy loading: a model built on `meta`, read one layer at a time from bf16 shards, gives the same compressed
weights as the eager path, writes loadable shards as it goes, and never holds more than a layer."""

from __future__ import annotations

import pytest
import torch

from compress.engine.context import RunContext, RunInputs
from compress.engine.layer_sweep import SweepStep, model_on_device, run_sweep
from compress.recipe.errors import UserError
from compress.engine.lazy import load_lazy
from compress.engine.model_io import load_model
from compress.compressors.gptq import GPTQConfig, run_gptq
from compress.compressors.rtn import RTNConfig, run_rtn
from compress.evaluators.perplexity import perplexity_of
from tests.scale.helpers import run_lazy_and_eager, save_sharded_bf16

STEPS = {
    "rtn": lambda: SweepStep("rtn", run_rtn, RTNConfig(bits=3, group_size=32), False),
    "gptq": lambda: SweepStep("gptq", run_gptq, GPTQConfig(bits=3, group_size=32), True),
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_sharded_bf16(tmp_path_factory.mktemp("sharded") / "llama", layers=3)


def _calibration():
    return torch.randint(2, 300, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_lazy_equals_eager_and_reloads(sharded, tmp_path, method):
    from transformers import AutoModelForCausalLM

    eager = load_model(str(sharded))
    run = RunContext(RunInputs(device=eager.device, calibration=_calibration(), calibration_batch_size=2))
    run_sweep(eager, [STEPS[method]()], run)

    lazy = load_lazy(str(sharded), save_to=tmp_path / "out")
    lazy_run = RunContext(RunInputs(device=lazy.device, calibration=_calibration(), calibration_batch_size=2))
    run_sweep(lazy, [STEPS[method]()], lazy_run)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())  # every layer was freed after writing
    lazy.finish_saving()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    expected = {name: p.detach().to(torch.bfloat16) for name, p in eager.model.named_parameters()}
    got = dict(reloaded.named_parameters())
    assert set(got) == set(expected)
    changed = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
        changed += int(".layers." in name and name.endswith("proj.weight"))
    assert changed == 3 * 7
    # the records kept for the size report stay shape-only, not a byte per weight
    assert all(r.codes.device.type == "meta" for r in lazy_run.results.records.values())
    assert {k: r.codes.shape for k, r in lazy_run.results.records.items()} == {k: r.codes.shape for k, r in run.results.records.items()}


def test_lazy_evaluation_streams_layers(sharded, text_file):
    from compress.engine.data import tokenize_text

    eager = load_model(str(sharded))
    lazy = load_lazy(str(sharded))
    ids = tokenize_text(eager.tokenizer, text_file.read_text())
    expected, _ = perplexity_of(eager.model, ids, 32, 4, torch.device("cpu"), max_windows=6)
    with model_on_device(lazy, lazy.device):
        got, _ = perplexity_of(lazy.model, ids, 32, 4, torch.device("cpu"), max_windows=6)
    assert got == pytest.approx(expected, rel=1e-5)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    total = sum(p.numel() * 4 for p in eager.model.parameters())
    layer = sum(p.numel() * 4 for p in eager.layers[0].parameters())
    # at most one layer, or the pieces outside the layers, at once: never the model
    assert lazy.weights.loaded_bytes_peak <= max(layer, total - 3 * layer) < total


def test_lazy_refuses_unmatched_checkpoint_names(sharded, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.replace("mlp.down_proj", "mlp.w2"): v for k, v in index["weight_map"].items()}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in set(index["weight_map"].values()):  # the shards hold the renamed tensors too (a consistent folder)
        tensors = load_file(broken / shard)
        save_file({k.replace("mlp.down_proj", "mlp.w2"): v for k, v in tensors.items()}, broken / shard)
    with pytest.raises(UserError, match="down_proj"):
        load_lazy(str(broken))


def test_recipe_keys_for_scale():
    from compress.recipe.schema import parse_recipe

    recipe = parse_recipe("model: org/model\nlazy: true\nmax_memory: {0: 70GiB, cpu: 200GiB}\npasses: [rtn]\n")
    assert recipe.lazy and recipe.max_memory == {"0": "70GiB", "cpu": "200GiB"}
    assert recipe.to_dict()["lazy"] is True
    assert not parse_recipe("model: org/model\npasses: [rtn]\n").lazy


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("prune", [False, True])
def test_compress_run_lazy_end_to_end(sharded, text_file, tmp_path, prune):
    """The whole `compress run` on a lazy model: passes, streamed evaluation, report, a loadable folder, and a
    compressed-tensors export packed layer by layer that equals the eager run's export tensor for tensor."""
    import json

    from typer.testing import CliRunner

    from compress.cli.main import app
    from compress.report.summary import shards_digest

    passes = ("  - sparsegpt: {pattern: \"2:4\"}\n" if prune else "") + "  - gptq: {bits: 3, group_size: 32}\n"

    def recipe_text(lazy: bool) -> str:
        return (
            f"model: {sharded}\nlazy: {str(lazy).lower()}\n"
            f"calibration: {{dataset: {text_file}, samples: 4, seq_len: 24, batch_size: 2}}\n"
            f"passes:\n{passes}"
            f"evaluate:\n  perplexity:\n    - {{dataset: {text_file}, seq_len: 32, max_windows: 4}}\n"
            "export: {format: compressed-tensors}\n")

    runs = run_lazy_and_eager(tmp_path, recipe_text)
    (out, report), (eager_out, eager) = runs[True], runs[False]
    assert report["status"] == "ok" and report["passes"][-1]["summary"]["modules"] == 3 * 7
    # Streamed evaluation scores what the eager model scores. The baseline reads the same bf16 shards; the compressed
    # lazy model is the layers it wrote, rounded to the checkpoint's bf16 (8 mantissa bits, a relative step of 2^-8
    # per weight), while the eager model keeps float32 dequantized weights: that rounding moves perplexity by about
    # 1e-4 here (3-bit codes, 2:4 masks), so the compressed values agree to 5e-4, the baseline to 1e-5.
    for key, rel in (("baseline", 1e-5), ("compressed", 5e-4)):
        lazy_ppl, eager_ppl = (next(iter(r["metrics"]["perplexity"].values()))[key] for r in (report, eager))
        assert lazy_ppl == pytest.approx(eager_ppl, rel=rel), key
    assert report["weights_sha256"] == shards_digest(out / "model")

    streamed, whole = _tensors(out / "export-compressed-tensors"), _tensors(eager_out / "export-compressed-tensors")
    assert set(streamed) == set(whole) and any(k.endswith("weight_packed") for k in whole)
    for name, tensor in whole.items():
        assert torch.equal(streamed[name], tensor), name
    configs = [json.loads((o / "export-compressed-tensors" / "config.json").read_text())["quantization_config"]
               for o in (out, eager_out)]
    assert configs[0] == configs[1]
    assert (configs[0]["sparsity_config"] or {}).get("sparsity_structure") == ("2:4" if prune else None)
    # afterwards there is nothing to export from (no codes were kept), and the error says what to do instead
    again = CliRunner().invoke(app, ["export", str(out), "--format", "gptq", "--output", str(tmp_path / "gptq")])
    assert again.exit_code == 2 and "lazy: true" in again.output and "export: {format: compressed-tensors}" in again.output


def test_lazy_export_formats_other_than_compressed_tensors_are_refused(sharded, tmp_path):
    from compress.recipe.errors import RecipeError
    from compress.recipe.schema import parse_recipe

    with pytest.raises(RecipeError, match=r"<recipe>:3 export\.format: .*compressed-tensors only"):
        parse_recipe(f"model: {sharded}\nlazy: true\nexport: {{format: gptq}}\npasses: [rtn]\n")
