"""A run killed mid-way (Ctrl-C, then SIGKILL) resumes from its last finished layer, bit-identical to one that never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.engine.checkpoint import FAULT_ENV, checkpoint_dir_for
from tests.conftest import REPO, recipe_text
from tests.tiny_models import save_tiny_model, synthetic_text

LAYERS = 4
# GPTQ needs calibration, so checkpoints carry next-layer inputs; W8A8 hooks must be re-installed on resume.
PASSES = "  - gptq: {bits: 4, group_size: 32, activations: {bits: 8, per: token}}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    model_dir = root / "tiny4"
    save_tiny_model(model_dir, "llama", layers=LAYERS)
    (root / "text.txt").write_text(synthetic_text(), encoding="utf-8")
    (root / "recipe.yaml").write_text(recipe_text(model_dir, root / "text.txt", PASSES, root / "text.txt", samples=8),
                                      encoding="utf-8")
    return root


def run_cli_process(workdir: Path, *args: str, fault: str) -> subprocess.CompletedProcess:
    # A narrow, non-terminal stderr (a cluster log): the printed resume command must still be one pasteable line.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), FAULT_ENV: fault, "COLUMNS": "40"}
    return subprocess.run([sys.executable, "-m", "compress.cli.main", "run", "recipe.yaml", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


def run_cli(workdir: Path, *args: str) -> dict:
    from compress.cli.main import app

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = CliRunner().invoke(app, ["run", "recipe.yaml", "--json", *args])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_interrupted_then_killed_run_resumes_bit_identically(workdir):
    reference = run_cli(workdir, "--output", "straight")

    # Ctrl-C right after layer 0 was checkpointed: exit 130 and the exact command to resume.
    stopped = run_cli_process(workdir, "--output", "resumed", "--quiet", fault="0:INT")
    assert stopped.returncode == 130, stopped.stderr
    assert "\nResume with: compress run recipe.yaml --output resumed --resume\n" in stopped.stderr
    assert f"interrupted: finished layers are saved in {checkpoint_dir_for(Path('resumed'))}.\n" in stopped.stderr
    checkpoints = checkpoint_dir_for(workdir / "resumed")
    assert sorted(p.name for p in (checkpoints / "sweep-0").iterdir()) == ["layer-0000"]
    assert not (workdir / "resumed").exists()

    # Resume, then SIGKILL after the first layer this process finishes (layer 1): nothing gets to clean up.
    killed = run_cli_process(workdir, "--output", "resumed", "--quiet", "--resume", fault="0:KILL")
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in (checkpoints / "sweep-0").iterdir()) == ["layer-0000", "layer-0001"]
    # Only the newest finished layer keeps the next layer's inputs.
    assert not (checkpoints / "sweep-0" / "layer-0000" / "inputs").exists()
    assert (checkpoints / "sweep-0" / "layer-0001" / "inputs" / "batch-00000.safetensors").exists()

    # Without --resume the leftovers are not silently discarded.
    runner_output = CliRunner().invoke(__import__("compress.cli.main", fromlist=["app"]).app,
                                       ["run", str(workdir / "recipe.yaml"), "--output", str(workdir / "resumed")])
    assert runner_output.exit_code == 2 and "--resume" in runner_output.output

    resumed = run_cli(workdir, "--output", "resumed", "--resume")
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["passes"][0]["modules"] == reference["passes"][0]["modules"]
    assert resumed["activation_quantization"] == reference["activation_quantization"]
    assert len(resumed["passes"][0]["modules"]) == 7 * LAYERS
    assert not checkpoints.exists()  # a finished run cleans up after itself
    assert "resuming at decoder layer 2 of 4" in (workdir / "resumed" / "run.log").read_text()


def test_resume_refuses_checkpoints_of_another_recipe(workdir):
    from compress.engine.checkpoint import Checkpointer
    from compress.recipe.errors import UserError

    folder = workdir / ".other.resume"
    Checkpointer(folder, "aaaa", resume=False)
    with pytest.raises(UserError, match="different recipe"):
        Checkpointer(folder, "bbbb", resume=True)
    with pytest.raises(UserError, match="add --resume"):
        Checkpointer(folder, "aaaa", resume=False)
