"""`compress eval`: --max-windows, results saved as each step finishes, and what to pass instead of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app
from compress.recipe import registry
from tests.tiny_models import synthetic_text


@pytest.fixture
def texts(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(synthetic_text(600), encoding="utf-8")
    (tmp_path / "b.txt").write_text(synthetic_text(400), encoding="utf-8")
    return tmp_path


def test_max_windows_bounds_perplexity_and_output_is_written(texts, tiny_llama):
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "-p", "a.txt", "--seq-len", "16", "--max-windows", "3",
                                      "-o", "scores.json", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((texts / "scores.json").read_text())
    assert saved["complete"] is True and saved["perplexity"]["a"]["protocol"]["windows"] == 3


def test_a_stopped_eval_keeps_the_steps_that_finished(texts, tiny_llama, monkeypatch):
    perplexity = registry.available_evaluators()["perplexity"]
    calls = []

    def stop_at_the_second(handle, config, run):
        calls.append(config.dataset)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second data set is scored
        return perplexity.apply(handle, config, run)

    monkeypatch.setitem(registry._EVALUATORS, "perplexity", registry.EvaluatorDef("perplexity", perplexity.config,
                                                                                  stop_at_the_second))
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "-p", "a.txt,b.txt", "--seq-len", "16",
                                      "--max-windows", "2", "-o", "scores.json"])
    assert result.exit_code == 130, result.output
    saved = json.loads((texts / "scores.json").read_text())
    assert saved["complete"] is False and saved["pending_steps"] == 1
    assert list(saved["perplexity"]) == ["a"] and saved["perplexity"]["a"]["value"] > 1
    assert "done: perplexity a = " in result.output


def test_output_never_replaces_a_file_that_is_not_an_eval_result(texts, tiny_llama):
    (texts / "recipe.yaml").write_text("passes: [rtn]\n")
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "-p", "a.txt", "-o", "recipe.yaml"])
    assert result.exit_code == 2 and "not an earlier `compress eval` result" in result.output
    assert (texts / "recipe.yaml").read_text() == "passes: [rtn]\n"


def _run_folder(path: Path) -> Path:
    (path / "state").mkdir(parents=True)
    (path / "state" / "config.json").write_text("{}")  # the run's own state: not something to evaluate
    (path / ".compress").write_text(json.dumps({"written_by": "compress", "kind": "run"}))
    (path / "report.json").write_text(json.dumps({"schema_version": 1, "recipe": {}}))
    return path


@pytest.mark.parametrize("given", ["out/w4/model", "out/w4"])
def test_a_run_folder_says_to_export_first(texts, given):
    _run_folder(texts / "out" / "w4")
    result = CliRunner().invoke(app, ["eval", given, "-p", "a.txt"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "is a compress run folder, and an ordinary run writes no model folder" in message
    assert f"compress export {texts / 'out' / 'w4'} --format compressed-tensors" in message


def test_a_run_folder_with_an_export_names_it(texts):
    run_dir = _run_folder(texts / "out" / "w4")
    export = run_dir / "export-compressed-tensors"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / ".compress").write_text(json.dumps({"written_by": "compress", "kind": "export"}))
    result = CliRunner().invoke(app, ["eval", "out/w4/model", "-p", "a.txt"])
    assert result.exit_code == 2
    assert f"its model is in {export}: pass that" in " ".join(result.output.split())


def test_a_missing_relative_path_is_exit_2_naming_it(texts):
    result = CliRunner().invoke(app, ["eval", "./no/such/model", "-p", "a.txt"])
    assert result.exit_code == 2
    assert f"model folder not found: {texts / 'no' / 'such' / 'model'}" in " ".join(result.output.split())
