"""The baseline cache (compress/app/baseline.py) and the token-id cache (compress/engine/context.py RunCache):
reused when every input is the same, recomputed when any one differs, and a damaged entry is never a number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import compress.app.baseline as baseline
import compress.engine.context as context
import compress.evaluators.perplexity as perplexity
from compress.app.baseline import Scored
from compress.app.runner import run_recipe
from compress.app.sweep import Sweep, SweepFile, Trial, slurm_script, trial_command
from compress.cli.main import app
from compress.engine.cache import Cache, key_of
from compress.engine.context import RunCache, RunContext, RunInputs
from compress.engine.model_io import load_model
from compress.evaluators.configs import PerplexityConfig
from compress.recipe.registry import available_evaluators
from compress.recipe.schema import EvalStep, parse_recipe
from tests.conftest import DEMO_DIR, DEMO_MODEL, requires_demo_model

RTN = "  - rtn: {bits: 4, group_size: 16}"


def recipe(model: Path, text: Path, *, calibration: Path | None = None, passes: str = RTN) -> str:
    return f"""
model: {model}
calibration: {{dataset: {calibration or text}, samples: 2, seq_len: 32, seed: 0}}
passes:
{passes}
evaluate:
  perplexity: [{{dataset: {text}, seq_len: 32, max_windows: 3}}]
"""


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    """A copy of the tiny model that a test may rewrite."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


@pytest.fixture
def text(text_file, tmp_path) -> Path:
    return Path(shutil.copy(text_file, tmp_path / "eval.txt"))


@pytest.fixture
def counted(monkeypatch):
    """How many times perplexity windows were scored and texts tokenized, by this test's runs."""
    calls = {"score": 0, "tokenize": 0}
    score, tokenize = perplexity.perplexity_of, context.tokenize_text

    def counting_score(*args, **kwargs):
        calls["score"] += 1
        return score(*args, **kwargs)

    def counting_tokenize(*args, **kwargs):
        calls["tokenize"] += 1
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(perplexity, "perplexity_of", counting_score)
    monkeypatch.setattr(context, "tokenize_text", counting_tokenize)
    return calls


def run(text: str, out: Path, **options) -> dict:
    return run_recipe(parse_recipe(text), out, **options)


def ppl(report: dict) -> dict:
    return report["metrics"]["perplexity"]["eval"]


def from_cache(report: dict) -> bool:
    return report["cache"]["baseline_from_cache"]["perplexity"]["eval"]


def test_second_run_reuses_the_baseline_with_identical_numbers(model, text, tmp_path, counted, cache_dir):
    first = run(recipe(model, text), tmp_path / "a")
    assert counted == {"score": 2, "tokenize": 1}  # baseline + final; calibration and evaluation share the ids
    second = run(recipe(model, text), tmp_path / "b")
    assert counted == {"score": 3, "tokenize": 1}  # only the final evaluation ran; the ids came from the cache
    assert from_cache(first) is False and from_cache(second) is True
    assert second["metrics"] == first["metrics"]  # the same floats, bit for bit, and the same protocol
    assert second["cache"] == {"dir": str(cache_dir), "baseline_steps_from_cache": 1, "baseline_steps_computed": 0,
                               "token_ids_from_cache": 1, "baseline_from_cache": {"perplexity": {"eval": True}}}
    assert "from the cache" in (tmp_path / "b" / "report.html").read_text(encoding="utf-8")
    assert "read from the cache" in (tmp_path / "b" / "report.md").read_text(encoding="utf-8")


def _rewrite_weights(model: Path) -> None:
    path = model / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("layers.0.mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, path, metadata={"format": "pt"})


def _rewrite_text(text: Path) -> None:
    text.write_text(text.read_text(encoding="utf-8").replace("the", "a"), encoding="utf-8")


def score(model: Path, text: Path, cache: Cache | None, *, dtype: str = "auto", **settings) -> Scored:
    """One baseline evaluation step as a run does it (`baseline_step`), without the passes and the report."""
    handle = load_model(str(model), dtype=dtype)
    cfg = PerplexityConfig(**{"dataset": str(text), "seq_len": 32, "max_windows": 3, **settings})
    step = EvalStep("perplexity", available_evaluators()["perplexity"], cfg)
    run = RunContext(RunInputs(device=handle.device), cache=RunCache(cache))
    load_settings = {"dtype": dtype, "lazy": False, "strict_weights": True, "trust_remote_code": False,
                     "allow_pickle": False}
    material = baseline.model_material(handle, cache, load_settings) if cache is not None else None
    return baseline.baseline_step(handle, step, run, cache, material)


def value(scored: Scored) -> float:
    (result,) = scored.results
    return result.value


CHANGES = {
    "weights": (lambda model, text, monkeypatch: _rewrite_weights(model), {}),
    "text content": (lambda model, text, monkeypatch: _rewrite_text(text), {}),
    "seq_len": (None, {"seq_len": 16}),
    "windows": (None, {"max_windows": 2}),
    "dtype": (None, {"dtype": "bfloat16"}),
    "evaluator code": (lambda model, text, monkeypatch: monkeypatch.setattr(
        baseline, "evaluation_code_sha256", lambda: "another version of the code"), {}),
    "torch version": (lambda model, text, monkeypatch: monkeypatch.setattr(
        baseline, "numeric_versions", lambda: {"torch": "0.0-other"}), {}),
}


@pytest.mark.parametrize("change", CHANGES)
def test_any_changed_input_recomputes_the_baseline(change, model, text, cache_dir, counted, monkeypatch):
    cache = Cache(cache_dir)
    first = score(model, text, cache)
    edit, settings = CHANGES[change]
    if edit is not None:
        edit(model, text, monkeypatch)
    second = score(model, text, cache, **settings)
    assert not first.from_cache and not second.from_cache and counted["score"] == 2
    if change in ("weights", "text content", "seq_len", "windows", "dtype"):
        assert value(second) != value(first)  # the cached number would have been wrong
    assert score(model, text, cache, **settings).from_cache  # and the new inputs have their own entry now


def test_no_cache_recomputes_and_leaves_the_cache_alone(model, text, tmp_path, counted, cache_dir):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe(model, text), encoding="utf-8")
    first = score(model, text, Cache(cache_dir))
    entries = sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*") if p.is_file())
    result = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / "b"), "--no-cache", "--json"])
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)
    assert from_cache(second) is False and ppl(second)["baseline"] == value(first)
    assert second["cache"]["dir"] is None and counted["score"] == 3  # first's baseline, then this run's two
    assert sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*") if p.is_file()) == entries


def _only_entry(cache_dir: Path, kind: str) -> Path:
    (entry,) = [p for p in (cache_dir / kind).rglob("*") if p.suffix in (".json", ".safetensors")]
    return entry


def _edit_number(data: bytes) -> bytes:
    entry = json.loads(data)
    entry["value"]["results"][0]["value"] *= 1.0000001  # valid JSON, plausible, wrong
    return json.dumps(entry).encode()


def _other_inputs(data: bytes) -> bytes:
    """An entry moved under another key (or a key collision): another setting's material, another number."""
    entry = json.loads(data)
    entry["material"]["config"]["seq_len"] = 999
    entry["value"]["results"][0]["value"] = 1.0
    entry["value_sha256"] = key_of(entry["value"])
    return json.dumps(entry).encode()


CORRUPTIONS = {
    "truncated": (lambda data: data[: len(data) // 2], "not valid JSON"),
    "not UTF-8": (lambda data: b"\x00\xff garbage", "not valid JSON"),
    "empty": (lambda data: b"", "not valid JSON"),
    "a number edited": (_edit_number, "does not match its checksum"),
    "stored for other inputs": (_other_inputs, "stored for other inputs"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_baseline_entry_is_recomputed_with_a_warning(corruption, model, text, cache_dir, counted):
    warnings: list[str] = []
    cache = Cache(cache_dir, warn=warnings.append)
    first = score(model, text, cache)
    entry = _only_entry(cache_dir, baseline.BASELINE_KIND)
    damage, why = CORRUPTIONS[corruption]
    entry.write_bytes(damage(entry.read_bytes()))
    second = score(model, text, cache)
    assert not second.from_cache and value(second) == value(first) and counted["score"] == 2
    assert len(warnings) == 1 and why in warnings[0] and str(entry) in warnings[0]
    third = score(model, text, cache)  # the damaged entry was rewritten
    assert third.from_cache and value(third) == value(first)


@pytest.mark.parametrize("corruption", ["truncated", "not UTF-8", "empty"])
def test_damaged_token_ids_are_retokenized(corruption, model, text, cache_dir, counted):
    tokenizer = load_model(str(model)).tokenizer
    warnings: list[str] = []
    cache = Cache(cache_dir, warn=warnings.append)
    first = RunCache(cache).token_ids((str(text), None), tokenizer)
    entry = _only_entry(cache_dir, context.TOKEN_IDS_KIND)
    assert torch.equal(RunCache(cache).token_ids((str(text), None), tokenizer), first) and counted["tokenize"] == 1
    entry.write_bytes(CORRUPTIONS[corruption][0](entry.read_bytes()))
    again = RunCache(cache)
    assert torch.equal(again.token_ids((str(text), None), tokenizer), first)
    assert counted["tokenize"] == 2 and again.token_ids_from_store == 0
    assert len(warnings) == 1 and "ignoring it" in warnings[0]


def test_token_ids_are_shared_only_by_identical_tokenizers(model, tiny_llama, text, cache_dir, counted):
    from transformers import AutoTokenizer

    cache = Cache(cache_dir)
    same = AutoTokenizer.from_pretrained(str(tiny_llama))  # another folder, the same tokenizer
    RunCache(cache).token_ids((str(text), None), load_model(str(model)).tokenizer)
    assert RunCache(cache).token_ids_from_store == 0
    shared = RunCache(cache)
    shared.token_ids((str(text), None), same)
    assert shared.token_ids_from_store == 1 and counted["tokenize"] == 1
    other = AutoTokenizer.from_pretrained(str(tiny_llama))
    other.add_tokens([" the"])  # one more vocabulary entry: other ids for the same text
    unshared = RunCache(cache)
    ids = unshared.token_ids((str(text), None), other)
    assert unshared.token_ids_from_store == 0 and counted["tokenize"] == 2
    assert not torch.equal(ids, shared.token_ids((str(text), None), same))  # sharing would have been wrong


def test_calibration_and_evaluation_of_one_file_tokenize_it_once(model, text, tmp_path, counted):
    report = run(recipe(model, text, passes="  - gptq: {bits: 4, group_size: 16}"), tmp_path / "a", use_cache=False)
    assert counted["tokenize"] == 1 and report["passes"][0]["name"] == "gptq"  # calibrated, baseline, final: one


def test_an_unwritable_cache_folder_is_a_warning_not_a_failure(model, text, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be", encoding="utf-8")
    warnings: list[str] = []
    first = score(model, text, Cache(blocker, warn=warnings.append))
    assert not first.from_cache and value(first) > 1
    assert len(warnings) == 1 and "cannot be written" in warnings[0]


@requires_demo_model()
def test_evaluation_numbers_do_not_depend_on_the_thread_count():
    """Why the thread count is not part of the key: a sweep's one-thread trials may reuse a two-thread baseline."""
    from compress.engine.threads import torch_threads

    cfg = {"seq_len": 512, "max_windows": 2}
    with torch_threads(1):
        one = score(DEMO_MODEL, DEMO_DIR / "eval.txt", None, **cfg)
    with torch_threads(2):
        two = score(DEMO_MODEL, DEMO_DIR / "eval.txt", None, **cfg)
    assert value(one) == value(two)


def test_sweep_trials_pass_no_cache_on(tmp_path):
    sweep = Sweep(tmp_path / "s.yaml", tmp_path / "r.yaml", SweepFile(recipe="r.yaml"), tmp_path / "out",
                  (Trial(0, "t0", None, ()),), ("f",), use_cache=False)
    assert trial_command(sweep, sweep.trials[0])[-1] == "--no-cache"
    assert "--no-cache" in slurm_script(sweep)
    cached = Sweep(*[getattr(sweep, f) for f in ("source", "recipe", "config", "output", "trials", "fingerprints")])
    assert "--no-cache" not in trial_command(cached, cached.trials[0]) and "--no-cache" not in slurm_script(cached)


def test_eval_command_reuses_its_scores(model, text, tmp_path, counted):
    command = ["eval", str(model), "--perplexity", str(text), "--seq-len", "32", "--max-windows", "3", "--json"]
    first = CliRunner().invoke(app, command)
    second = CliRunner().invoke(app, command)
    fresh = CliRunner().invoke(app, [*command, "--no-cache"])
    assert first.exit_code == second.exit_code == fresh.exit_code == 0, first.output + second.output + fresh.output
    values = [json.loads(r.stdout)["perplexity"]["eval"] for r in (first, second, fresh)]
    assert [v["from_cache"] for v in values] == [False, True, False]
    assert values[0]["value"] == values[1]["value"] == values[2]["value"] and counted["score"] == 2


def test_a_second_writer_waits_for_the_entry_being_computed(cache_dir):
    """Two processes (here: threads, each with its own flock) asking for one entry: the second reads the first's."""
    import threading

    cache, material = Cache(cache_dir), {"what": "a baseline"}
    key, holding, order = key_of(material), threading.Event(), []

    def first() -> None:
        with cache.locked("baseline-eval", key):
            holding.set()
            threading.Event().wait(0.3)  # computing
            cache.write_json("baseline-eval", key, material, {"results": [1.5]})
            order.append("written")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    with cache.locked("baseline-eval", key):
        order.append("read")
        assert cache.read_json("baseline-eval", key, material) == {"results": [1.5]}
    thread.join()
    assert order == ["written", "read"]
