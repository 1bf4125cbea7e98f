"""Loading refuses what would give a silent wrong result, and says where: the pure checks, the opt-in, lazy loads,
positions, devices and strict JSON reports. (tests/core/test_hostile_models.py runs the CLI on 50 broken folders.)"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.engine.checkpoint_files import header_problem
from compress.engine.lazy import load_lazy
from compress.engine.model_io import PositionsNeeded, load_model, non_finite_counts, pick_device
from compress.recipe.errors import UserError
from compress.recipe.schema import parse_recipe
from compress.report.summary import finite_or_null, render_markdown
from tests.scale.helpers import save_sharded_bf16


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_header_problem_checks_every_field_against_the_body():
    good = {"a": _entry("F32", [2, 3], 0, 24), "b": _entry("BF16", [4], 24, 32), "__metadata__": {"format": "pt"}}
    assert header_problem(good, 32) is None
    assert "truncated" in header_problem(good, 30)
    assert "holds 40" in header_problem(good, 40)
    assert "needs 12 bytes" in header_problem({"a": _entry("F16", [2, 3], 0, 24)}, 24)  # dtype lie
    assert "overlaps" in header_problem({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, 12)
    assert "unused" in header_problem({"a": _entry("F32", [2], 4, 12)}, 12)
    assert "unknown dtype" in header_problem({"a": _entry("F17", [2], 0, 8)}, 8)
    assert "non-negative" in header_problem({"a": _entry("F32", [-2], 0, 8)}, 8)
    assert "begin <= end" in header_problem({"a": _entry("F32", [0], 8, 0)}, 8)
    assert "exactly the keys" in header_problem({"a": {"dtype": "F32", "shape": [2]}}, 8)
    assert "not an object" in header_problem([1], 8)
    assert header_problem({"a": _entry("F4", [4], 0, 2)}, 2) is None  # sub-byte dtypes pack two per byte


def test_non_finite_counts_reads_in_chunks(monkeypatch):
    import compress.engine.model_io as model_io

    monkeypatch.setattr(model_io, "CHECK_CHUNK", 7)  # several chunks, the bad values in the last one
    tensor = torch.zeros(5, 9, dtype=torch.bfloat16)
    assert non_finite_counts(tensor) == (0, 0)
    tensor[4, 7], tensor[4, 8], tensor[3, 0] = float("nan"), float("inf"), float("-inf")
    assert non_finite_counts(tensor) == (1, 2)
    assert non_finite_counts(torch.zeros(3, dtype=torch.int64)) == (0, 0)


def _without(folder: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    tensors = load_file(copy / "model.safetensors")
    del tensors[name]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_strict_weights_off_loads_and_lists_what_is_missing(tiny_llama, tmp_path):
    broken = _without(tiny_llama, tmp_path, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(UserError, match=r"model.layers.0.mlp.up_proj.weight.*strict_weights: false"):
        load_model(str(broken))
    handle = load_model(str(broken), strict_weights=False)
    assert [note["reason"] for note in handle.load_notes] == [
        "tensors not in the checkpoint (they would be randomly initialised): model.layers.0.mlp.up_proj.weight"]


def test_tied_heads_and_ignored_buffers_are_not_missing(tmp_path):
    from tests.real_shapes import save_real_shape_model

    folder = save_real_shape_model(tmp_path / "qwen", "qwen-tied", layers=1)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    handle = load_model(str(folder))
    assert handle.load_notes == []
    assert handle.model.lm_head.weight is handle.model.model.embed_tokens.weight


def test_recipe_strict_weights_off_reaches_the_report(tiny_llama, tmp_path, text_file):
    from compress.app.runner import run_recipe

    broken = _without(tiny_llama, tmp_path, "model.norm.weight")
    recipe = parse_recipe(f"model: {broken}\nstrict_weights: false\npasses: [rtn]\n"
                          f"evaluate: {{perplexity: [{{dataset: {text_file}, seq_len: 32, max_windows: 1}}]}}\n")
    report = run_recipe(recipe, tmp_path / "out")
    assert report["recipe"]["strict_weights"] is False
    assert [f["reason"] for f in report["fallbacks"]] == [
        "tensors not in the checkpoint (they would be randomly initialised): model.norm.weight"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_sharded_bf16(tmp_path_factory.mktemp("lazy-loading") / "llama", layers=2)


def _edit_shards(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(copy / shard)
        edit(tensors)
        save_file(tensors, copy / shard, metadata={"format": "pt"})
    index["weight_map"] = {n: s for s in set(index["weight_map"].values()) for n in load_file(copy / s)}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    return copy


def test_lazy_refuses_missing_and_reshaped_tensors_and_lets_unexpected_ones_through_on_request(sharded, tmp_path):
    def drop(tensors):
        tensors.pop("model.layers.1.self_attn.o_proj.weight", None)

    with pytest.raises(UserError, match=r"model.layers.1.self_attn.o_proj.weight"):
        load_lazy(str(_edit_shards(sharded, tmp_path / "a", drop)))

    def reshape(tensors):
        if "model.layers.0.mlp.up_proj.weight" in tensors:
            tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].t().contiguous()

    with pytest.raises(UserError, match=r"model.layers.0.mlp.up_proj.weight \(checkpoint \[64, 160\], config \[160, 64\]\)"):
        load_lazy(str(_edit_shards(sharded, tmp_path / "b", reshape)))

    fewer = tmp_path / "fewer"
    shutil.copytree(sharded, fewer)
    config = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(UserError, match=r"dropped\): 9 tensors \(model.layers.1."):
        load_lazy(str(fewer))
    handle = load_lazy(str(fewer), strict_weights=False)
    assert len(handle.layers) == 1 and "model.layers.1." in handle.load_notes[0]["reason"]


def test_lazy_checks_nan_outside_the_layers_at_load_and_in_a_layer_when_it_is_read(sharded, tmp_path):
    def poison(name):
        def edit(tensors):
            if name in tensors:
                tensors[name] = tensors[name].clone()
                tensors[name].view(-1)[0] = float("nan")
        return edit

    with pytest.raises(UserError, match=r"model.norm.weight holds 1 NaN"):
        load_lazy(str(_edit_shards(sharded, tmp_path / "norm", poison("model.norm.weight"))))
    handle = load_lazy(str(_edit_shards(sharded, tmp_path / "layer", poison("model.layers.1.mlp.down_proj.weight"))))
    handle.bring_in(0, torch.device("cpu"))
    with pytest.raises(UserError, match=r"model.layers.1.mlp.down_proj.weight holds 1 NaN"):
        handle.bring_in(1, torch.device("cpu"))


def test_lazy_checks_the_shard_headers(sharded, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(sharded, copy)
    shard = sorted(copy.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=rf"{shard.name} is not a valid safetensors file: .*truncated"):
        load_lazy(str(copy))


def test_positions_are_checked_before_the_weights_load(tiny_llama, tmp_path, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the positions were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    need = [PositionsNeeded(4096, "recipe.yaml:3 calibration.seq_len"), PositionsNeeded(64, "fine")]
    with pytest.raises(UserError, match=r"recipe.yaml:3 calibration.seq_len: 4096 tokens, but model .* has 256 "
                                        r"positions \(max_position_embeddings in its config.json\); use at most 256"):
        load_model(str(tiny_llama), positions=need)
    with pytest.raises(UserError, match="4096 tokens"):
        load_lazy(str(tiny_llama), positions=need)


def test_calibration_seq_len_names_its_recipe_line(tiny_llama, tmp_path, text_file, write_recipe):
    from compress.app.runner import positions_needed
    from compress.recipe.schema import load_recipe

    path = write_recipe(f"model: {tiny_llama}\ncalibration:\n  dataset: {text_file}\n  seq_len: 4096\n"
                        f"passes: [gptq]\nevaluate:\n  perplexity: [{{dataset: {text_file}}}]\n")
    recipe = load_recipe(path)
    assert [(n.tokens, n.where) for n in positions_needed(recipe)] == [
        (4096, f"{path.resolve()}:4 calibration.seq_len"), (512, f"{path.resolve()}:7 evaluate.perplexity[0].seq_len")]
    overridden = load_recipe(path, overrides=["calibration.seq_len=300"])
    assert positions_needed(overridden)[0].where == f"{path.resolve()} (--set) calibration.seq_len"


def test_devices_that_this_machine_lacks_are_user_errors(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="MPS"):
        pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"'cuda:7' was requested but this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:7")
    assert pick_device("cuda:1") == torch.device("cuda:1")


def test_reports_are_strict_json():
    report = {"metrics": {"perplexity": {"text": {"baseline": 3.5, "compressed": math.nan}}},
              "values": [1.0, math.inf], "n": 3}
    strict = finite_or_null(report)
    text = json.dumps(strict, allow_nan=False)
    assert json.loads(text)["metrics"]["perplexity"]["text"] == {
        "baseline": 3.5, "compressed": None, "compressed_reason": "not a finite number (nan)"}
    assert strict["values"] == [1.0, None] and strict["n"] == 3
    assert report["metrics"]["perplexity"]["text"]["compressed"] != report["metrics"]["perplexity"]["text"]["compressed"]


def test_a_nan_metric_is_null_in_report_json(tiny_llama, tmp_path, text_file, monkeypatch):
    import compress.app.baseline as baseline
    import compress.app.runner as runner
    from compress.recipe.registry import EvalResult

    def nan_score(handle, step, run):
        return [EvalResult("perplexity", "text", math.nan, {})]

    # the baseline (compress/app/baseline.py, through the cache) and the final evaluation (runner) both score NaN
    monkeypatch.setattr(baseline, "evaluate_step", nan_score)
    monkeypatch.setattr(runner, "evaluate_step", nan_score)
    recipe = parse_recipe(f"model: {tiny_llama}\npasses: [rtn]\n"
                          f"evaluate: {{perplexity: [{{dataset: {text_file}, seq_len: 32, max_windows: 1}}]}}\n")
    runner.run_recipe(recipe, tmp_path / "out")
    text = (tmp_path / "out" / "report.json").read_text()
    assert "NaN" not in text
    entry = json.loads(text)["metrics"]["perplexity"]["text"]
    assert entry["baseline"] is None and entry["baseline_reason"] == "not a finite number (nan)"
    assert "| perplexity | text | — | — | — |" in render_markdown(json.loads(text))


def test_compress_eval_refuses_a_broken_model_unless_told(tiny_llama, tmp_path, text_file):
    from typer.testing import CliRunner

    from compress.cli.main import app

    broken = _without(tiny_llama, tmp_path, "model.layers.1.mlp.gate_proj.weight")
    args = ["eval", str(broken), "--perplexity", str(text_file), "--seq-len", "32", "--json"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "model.layers.1.mlp.gate_proj.weight" in refused.output
    scored = CliRunner().invoke(app, [*args, "--no-strict-weights"])
    assert scored.exit_code == 0, scored.output
    too_long = CliRunner().invoke(app, ["eval", str(tiny_llama), "--perplexity", str(text_file), "--seq-len", "512"])
    assert too_long.exit_code == 2 and "--seq-len: 512 tokens" in too_long.output and "256 positions" in too_long.output
