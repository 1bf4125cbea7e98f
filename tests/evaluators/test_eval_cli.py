"""`compress eval` with zero-shot tasks and perplexity on a local checkpoint, and its errors, as a script sees them."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.tiny_models import synthetic_text

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}


def compress(*args, cwd):
    return subprocess.run([sys.executable, "-m", "compress.cli.main", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("eval-cli")
    (root / "text.txt").write_text(synthetic_text(600))  # a few windows: the CLI, not the model, is under test
    docs = [{"context": "the model", "choices": ["layer weight", "zero one"], "gold": i % 2} for i in range(4)]
    (root / "task.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "bad.jsonl").write_text(json.dumps(docs[0]) + "\n" + '{"context": "x", "choices": ["a"], "gold": 3}\n')
    return root


def test_eval_zero_shot_and_perplexity_json(workdir, tiny_llama):
    result = compress("eval", str(tiny_llama), "--zero-shot", "task.jsonl", "--perplexity", "text.txt",
                      "--seq-len", "64", "--stride", "32", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["acc"]["task"]["value"] == 0.5 and payload["acc"]["task"]["stderr"] > 0
    assert payload["acc_norm"]["task"]["protocol"]["name"] == "lm_eval_loglikelihood"
    ppl = payload["perplexity"]["text"]
    assert ppl["value"] > 1 and ppl["protocol"]["version"] == 2 and ppl["protocol"]["stride"] == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zero-shot", "bad.jsonl"], "bad.jsonl:2: 'gold' is 3, but there are only 1 choices"),
        (["--zero-shot", "missing.jsonl"], "task file not found: missing.jsonl"),
        (["--zero-shot", "piqa"], "offline mode is on"),
        ([], "nothing to evaluate"),
    ],
)
def test_eval_errors_exit_2_and_name_the_file(workdir, tiny_llama, args, message, monkeypatch):
    from typer.testing import CliRunner

    from compress.cli.main import app

    monkeypatch.chdir(workdir)  # in-process: these fail before any model is loaded
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_recipe_zero_shot_section_is_validated(workdir, tiny_llama):
    from compress.recipe.errors import RecipeError
    from compress.recipe.schema import load_recipe

    recipe = workdir / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\nevaluate:\n  zero_shot: {{tasks: [piqa, arc_esay, task.jsonl]}}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3 evaluate.zero_shot.tasks: unknown task 'arc_esay'.*Did you mean: arc_easy"):
        load_recipe(recipe)
    recipe.write_text("evaluate:\n  zero_shot: {tasks: [piqa, task.jsonl, nope.jsonl], data_dir: nodir}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert [issue.path for issue in error.value.issues] == ["evaluate.zero_shot.tasks[2]", "evaluate.zero_shot.data_dir"]
    recipe.write_text("evaluate:\n  zero_shot: {tasks: [piqa, task.jsonl]}\n")
    assert load_recipe(recipe).evaluations[0].config.tasks == ["piqa", str(workdir / "task.jsonl")]
