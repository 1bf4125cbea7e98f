"""Lazy loading: a model built on `meta`, read one layer at a time from bf16 shards, gives the same compressed
weights as the eager path, writes loadable shards as it goes, and never holds more than a layer."""

from __future__ import annotations

import pytest
import torch

from compress.context import RunContext
from compress.engine import SweepStep, model_on_device, run_sweep
from compress.errors import UserError
from compress.lazy import load_lazy
from compress.model_io import load_model
from compressors.gptq import GPTQConfig, run_gptq
from compressors.rtn import RTNConfig, run_rtn
from evaluators.perplexity import perplexity_of
from tests.scale.helpers import save_sharded_bf16

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
    run = RunContext(device=eager.device, calibration=_calibration(), calibration_batch_size=2)
    run_sweep(eager, [STEPS[method]()], run)

    lazy = load_lazy(str(sharded), save_to=tmp_path / "out")
    lazy_run = RunContext(device=lazy.device, calibration=_calibration(), calibration_batch_size=2)
    run_sweep(lazy, [STEPS[method]()], lazy_run)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())  # every layer was freed after writing
    assert lazy.lazy is not None
    lazy.lazy.finish(lazy)

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
    assert all(r.codes.device.type == "meta" for r in lazy_run.quantized.values())
    assert {k: r.codes.shape for k, r in lazy_run.quantized.items()} == {k: r.codes.shape for k, r in run.quantized.items()}


def test_lazy_evaluation_streams_layers(sharded, text_file):
    from compress.data import tokenize_text

    eager = load_model(str(sharded))
    lazy = load_lazy(str(sharded))
    assert lazy.lazy is not None
    ids = tokenize_text(eager.tokenizer, text_file.read_text())
    expected, _ = perplexity_of(eager.model, ids, 32, 4, torch.device("cpu"), max_windows=6)
    with model_on_device(lazy, lazy.device):
        got, _ = perplexity_of(lazy.model, ids, 32, 4, torch.device("cpu"), max_windows=6)
    assert got == pytest.approx(expected, rel=1e-5)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    total = sum(p.numel() * 4 for p in eager.model.parameters())
    layer = sum(p.numel() * 4 for p in eager.layers[0].parameters())
    # at most one layer, or the pieces outside the layers, at once: never the model
    assert lazy.lazy.loaded_bytes_peak <= max(layer, total - 3 * layer) < total


def test_lazy_refuses_unmatched_checkpoint_names(sharded, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.replace("mlp.down_proj", "mlp.w2"): v for k, v in index["weight_map"].items()}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="down_proj"):
        load_lazy(str(broken))


def test_recipe_keys_for_scale():
    from compress.recipe import parse_recipe

    recipe = parse_recipe("model: org/model\nlazy: true\nmax_memory: {0: 70GiB, cpu: 200GiB}\npasses: [rtn]\n")
    assert recipe.lazy and recipe.max_memory == {"0": "70GiB", "cpu": "200GiB"}
    assert recipe.to_dict()["lazy"] is True
    assert not parse_recipe("model: org/model\npasses: [rtn]\n").lazy


def test_compress_run_lazy_end_to_end(sharded, text_file, tmp_path):
    """The whole `compress run` on a lazy model: passes, streamed evaluation, report, and a loadable folder."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from cli.main import app
    from compress.report import shards_digest

    recipe = tmp_path / "lazy.yaml"
    recipe.write_text(
        f"model: {sharded}\nlazy: true\n"
        f"calibration: {{dataset: {text_file}, samples: 4, seq_len: 24, batch_size: 2}}\n"
        "passes:\n  - gptq: {bits: 3, group_size: 32}\n"
        f"evaluate:\n  perplexity:\n    - {{dataset: {text_file}, seq_len: 32, max_windows: 4}}\n", encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["passes"][0]["summary"]["modules"] == 3 * 7
    # the same recipe on the eagerly loaded model scores the same, before and after compression
    recipe.write_text(recipe.read_text().replace("lazy: true", "lazy: false"), encoding="utf-8")
    assert CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "eager"), "--quiet"]).exit_code == 0
    eager = json.loads((tmp_path / "eager" / "report.json").read_text())
    for key in ("baseline", "compressed"):
        lazy_ppl, eager_ppl = (next(iter(r["metrics"]["perplexity"].values()))[key] for r in (report, eager))
        assert lazy_ppl == pytest.approx(eager_ppl, rel=1e-4), key
    shards = sorted((out / "model").glob("*.safetensors"))
    assert report["weights_sha256"] == shards_digest(shards)
    # the digest covers every tensor, whichever shard holds it
    merged = {k: v for f in shards for k, v in load_file(str(f)).items()}
    assert len(merged) == len(load_file(str(shards[0]))) * 3 + 3  # 3 layers + embed, norm, lm_head

    # no packed export from a lazy run (its codes were never kept): the recipe says so up front
    recipe.write_text(recipe.read_text().replace("lazy: false", "lazy: true") + "export: {format: compressed-tensors}\n",
                      encoding="utf-8")
    refused = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "again")])
    assert refused.exit_code == 2 and "lazy.yaml:" in refused.output and "export" in refused.output
