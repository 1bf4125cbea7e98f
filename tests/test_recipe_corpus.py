"""5,000 malformed recipes (tests/recipe_corpus.py) through `compress validate` and `compress run`, in process.

For every one: exit code 2 (never 0, never 1), no traceback, a message naming the recipe file with a line for
every problem, and no model load. A sample also goes through the real CLI in subprocesses, end to end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import typer
import typer.testing
from typer.testing import CliRunner

import compress.app.builtins  # noqa: F401  (the registries the typo generator must miss)
from compress.cli.main import app
from compress.recipe.registry import available_evaluators, available_passes
from compress.recipe.schema import CalibrationConfig, RecipeFile
from tests import recipe_corpus
from tests.recipe_corpus import REPO, malformed_recipes

COUNT = 2000
CLI_SAMPLE = int(os.environ.get("COMPRESS_CORPUS_CLI_SAMPLE", "2"))  # each subprocess imports torch: seconds
COMMAND = typer.main.get_command(app)


def _field_names() -> set[str]:
    names = set(RecipeFile.model_fields) | set(CalibrationConfig.model_fields)
    names |= set(available_passes()) | set(available_evaluators())
    for definition in [*available_passes().values(), *available_evaluators().values()]:
        names |= set(definition.config.model_fields)
    return names | {"avg_bits", "bytes", "ratio", "min_bits", "max_bops", "activation_bits", "per"}


recipe_corpus.ALL_FIELD_NAMES |= _field_names()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder where the shipped recipes' relative paths (demo/model, demo/calib.txt) resolve."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "demo").symlink_to(REPO / "recipes" / "demo")
    return folder


def invoke(args: list[str]):
    """The CLI in process; the Click command is built once (typer's runner rebuilds it per call)."""
    with mock.patch.object(typer.testing, "_get_command", lambda _app: COMMAND):
        return CliRunner().invoke(app, args)


def located(output: str, path: Path) -> bool:
    """Every problem line names the file and a line: `  <file>:<line> <yaml path>: <message>`."""
    lines = output.strip().splitlines()
    if not lines or not re.fullmatch(r"error: \d+ problems? in recipe:", lines[0]):
        return False
    problems = [line for line in lines[1:] if not re.fullmatch(r"  \.\.\. and \d+ more", line)]
    return bool(problems) and all(re.match(rf"  {re.escape(str(path))}:\d+ ", line) for line in problems)


def test_two_thousand_malformed_recipes_are_exit_2_located_and_load_no_model(workdir):
    loads: list[str] = []

    def no_load(*args, **kwargs):
        loads.append(str(args[:1]))
        raise AssertionError("a model load started for an invalid recipe")

    corpus = list(malformed_recipes(COUNT, seed=15))
    assert len({text for _, text in corpus}) > 0.9 * COUNT  # nearly all distinct
    failures: list[tuple[str, int, str, bytes]] = []
    outcomes: Counter[str] = Counter()
    start = time.perf_counter()
    with mock.patch("compress.engine.model_io.load_model", no_load), \
         mock.patch("transformers.AutoModelForCausalLM.from_pretrained", no_load):
        for i, (mutation, text) in enumerate(corpus):
            path = workdir / f"r{i % 7}.yaml"  # a few names, so no folder of 5,000 files
            path.write_bytes(text)
            command = ["run", str(path), "--output", str(workdir / "out")] if i % 10 == 0 else ["validate", str(path)]
            result = invoke(command)
            outcomes[f"exit {result.exit_code}"] += 1
            if result.exit_code != 2 or "Traceback" in result.output or not located(result.output, path):
                failures.append((mutation, result.exit_code, result.output[-600:], text[:300]))
    seconds = time.perf_counter() - start
    print(f"\n{COUNT} malformed recipes in {seconds:.1f} s: {dict(outcomes)}; mutations "
          f"{dict(Counter(m for m, _ in corpus))}")
    assert not failures, f"{len(failures)} of {COUNT} not exit 2 with a located message; first: {failures[:3]}"
    assert loads == []
    assert not (workdir / "out").exists()


def test_a_sample_through_the_real_cli_in_subprocesses(workdir):
    corpus = list(malformed_recipes(COUNT, seed=15))
    sample = corpus[:: len(corpus) // CLI_SAMPLE][:CLI_SAMPLE]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for i, (mutation, text) in enumerate(sample):
        path = workdir / f"cli{i}.yaml"
        path.write_bytes(text)
        command = "run" if i % 2 else "validate"
        output = ["--output", str(workdir / "cli-out")] if command == "run" else []
        result = subprocess.run([sys.executable, "-m", "compress.cli.main", command, str(path), *output],
                                capture_output=True, text=True, env=env, timeout=300, cwd=workdir)
        assert result.returncode == 2, (mutation, result.stderr[-1000:])
        assert "Traceback" not in result.stderr and located(result.stderr, path), (mutation, result.stderr[-1000:])
