"""Sweeps: a 2 x 2 grid on the demo model runs with the local and ray backends, writes the comparison and skips
finished trials when re-launched; the SLURM array script is valid bash with one trial per index."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from compress import sweep as sweeps
from compress.errors import RecipeError, UserError
from tests.conftest import DEMO_DIR, DEMO_MODEL, recipe_text, requires_demo_model


def _sweep_file(tmp_path: Path, backend: str = "local", **extra) -> Path:
    recipe = tmp_path / "base.yaml"
    evaluation = tmp_path / "eval.txt"  # a slice: each trial tokenizes it twice, and 4 trials x 2 backends add up
    evaluation.write_text((DEMO_DIR / "eval.txt").read_text()[:6000])
    recipe.write_text(recipe_text(DEMO_MODEL, DEMO_DIR / "calib.txt", "  - rtn: {bits: 4, group_size: 128}",
                                  evaluation, seq_len=64, max_windows=4))
    data = {"recipe": "base.yaml", "grid": {"passes[0].rtn.bits": [3, 8], "passes[0].rtn.group_size": [32, 128]},
            "output": "out", "backend": backend, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _check_comparison(spec: sweeps.Sweep) -> list[dict]:
    rows = json.loads((spec.output / "compare.json").read_text())
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert {(r["params"]["passes[0].rtn.bits"], r["params"]["passes[0].rtn.group_size"]) for r in rows} == {
        (3, 32), (3, 128), (8, 32), (8, 128)}
    by = {(r["params"]["passes[0].rtn.bits"], r["params"]["passes[0].rtn.group_size"]): r for r in rows}
    # the trials really differ: fewer bits, smaller model; 8 bits stays close to the baseline, 3 bits does not
    assert by[(3, 128)]["bytes"] < by[(8, 128)]["bytes"] and by[(3, 32)]["bits_per_weight"] < by[(8, 32)]["bits_per_weight"]
    ppl = {k: r["metrics"]["perplexity/eval"] for k, r in by.items()}
    base = by[(8, 128)]["baseline"]["perplexity/eval"]
    assert abs(ppl[(8, 128)] / base - 1) < 0.01 < ppl[(3, 128)] / base - 1
    assert (spec.output / "compare.md").read_text().count("| ok |") == 4
    assert (spec.output / "pareto.png").stat().st_size > 1000
    return rows


@pytest.mark.slow
@requires_demo_model()
def test_local_sweep_and_relaunch_skips_finished(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    path = _sweep_file(tmp_path)
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    spec = sweeps.load_sweep(path)
    _check_comparison(spec)
    stamp = {t.id: (spec.trial_dir(t) / "report.json").stat().st_mtime_ns for t in spec.trials}
    again = sweeps.run_local(spec, 1)
    assert [s["status"] for s in again] == []  # nothing pending
    assert all(sweeps.run_trial(str(path), str(spec.output), i)["status"] == "skipped" for i in range(4))
    assert stamp == {t.id: (spec.trial_dir(t) / "report.json").stat().st_mtime_ns for t in spec.trials}


@pytest.mark.slow
@requires_demo_model()
def test_ray_sweep(tmp_path):
    pytest.importorskip("ray")
    spec = sweeps.load_sweep(_sweep_file(tmp_path, "ray", resources={"cpus": 1}))
    statuses = sweeps.run_ray(spec, None)
    assert sorted(s["status"] for s in statuses) == ["ok"] * 4
    sweeps.write_compare(spec)
    _check_comparison(spec)


@requires_demo_model()
def test_slurm_script_is_valid_bash_with_one_trial_per_index(tmp_path):
    path = _sweep_file(tmp_path, "slurm", slurm={"partition": "gpu", "max_parallel": 2, "setup": ["module load cuda"]},
                       resources={"cpus": 4, "gpus": 1, "memory_gb": 32})
    spec = sweeps.load_sweep(path)
    script = sweeps.slurm_script(spec)
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --gpus-per-task=1" in script
    assert f"#SBATCH --output={spec.output}/logs/%a.log" in script
    assert '--only "$SLURM_ARRAY_TASK_ID"' in script
    file = tmp_path / "s.sbatch"
    file.write_text(script)
    assert subprocess.run(["bash", "-n", str(file)], capture_output=True).returncode == 0


def test_grid_typos_fail_before_anything_runs(tmp_path):
    recipe = tmp_path / "base.yaml"
    recipe.write_text("passes:\n  - rtn: {bits: 4}\n")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"recipe": "base.yaml", "grid": {"passes[0].rtn.bitz": [3]}}))
    with pytest.raises(RecipeError, match="bitz"):
        sweeps.load_sweep(tmp_path / "sweep.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"recipe": "base.yaml", "grdi": {}}))
    with pytest.raises(RecipeError):
        sweeps.load_sweep(tmp_path / "sweep.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"recipe": "base.yaml", "grid": {"passes[0].rtn.bits": []}}))
    with pytest.raises(UserError, match="at least one value"):
        sweeps.load_sweep(tmp_path / "sweep.yaml")


def test_pareto_front():
    points = [(1.0, 5.0), (2.0, 4.0), (2.0, 6.0), (3.0, 4.0), (0.5, 9.0)]
    assert sweeps.pareto_front(points) == [0, 1, 4]
