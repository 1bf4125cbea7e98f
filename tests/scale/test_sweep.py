"""Sweeps: a 2 x 2 grid on the demo model runs with the local backend (one after another, or in parallel
processes) and with Ray, writes the comparison and skips finished trials when re-launched; the SLURM array
script is valid bash with one trial per index; sweep-file mistakes exit 2 naming the file and line."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import types
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli.main import app
from compress.app import sweep as sweeps
from compress.recipe.errors import RecipeError, UserError
from compress.app.sweep_compare import higher_is_better, mark_pareto, pareto_front, render_compare
from tests.conftest import DEMO_DIR, DEMO_MODEL, REPO, recipe_text, requires_demo_model

PPL = "perplexity/eval"
GRID = {"passes[0].rtn.bits": [3, 8], "passes[0].rtn.group_size": [32, 128]}


def _base_recipe(folder: Path) -> Path:
    recipe = folder / "base.yaml"
    evaluation = folder / "eval.txt"  # a slice: each trial tokenizes it twice, and the tests run many trials
    evaluation.write_text((DEMO_DIR / "eval.txt").read_text()[:6000])
    recipe.write_text(recipe_text(DEMO_MODEL, DEMO_DIR / "calib.txt", "  - rtn: {bits: 4, group_size: 128}",
                                  evaluation, seq_len=64, max_windows=4))
    return recipe


def _sweep_file(folder: Path, backend: str = "local", *, recipe: str = "base.yaml", grid: dict | None = None,
                **extra) -> Path:
    if recipe == "base.yaml" and not (folder / recipe).exists():
        _base_recipe(folder)
    data = {"recipe": recipe, "grid": GRID if grid is None else grid, "output": "out", "backend": backend, **extra}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _by_params(rows: list[dict]) -> dict[tuple[int, int], dict]:
    return {(r["params"]["passes[0].rtn.bits"], r["params"]["passes[0].rtn.group_size"]): r for r in rows}


def _invoke(*args: str):
    return CliRunner().invoke(app, ["sweep", *args])


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The 2 x 2 sweep run once, trials one after another, with --json; shared by the tests that compare to it."""
    folder = tmp_path_factory.mktemp("sequential")
    path = _sweep_file(folder)
    result = _invoke(str(path), "--json")
    assert result.exit_code == 0, result.output
    return types.SimpleNamespace(path=path, spec=sweeps.load_sweep(path), result=result, rows=json.loads(result.stdout))


def _check_comparison(spec: sweeps.Sweep) -> list[dict]:
    rows = json.loads((spec.output / "compare.json").read_text())
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert set(_by_params(rows)) == {(3, 32), (3, 128), (8, 32), (8, 128)}
    by = _by_params(rows)
    # the trials really differ: fewer bits, smaller model; 8 bits stays close to the baseline, 3 bits does not
    assert by[(3, 128)]["bytes"] < by[(8, 128)]["bytes"] and by[(3, 32)]["bits_per_weight"] < by[(8, 32)]["bits_per_weight"]
    ppl = {k: r["metrics"][PPL] for k, r in by.items()}
    base = by[(8, 128)]["baseline"][PPL]
    assert abs(ppl[(8, 128)] / base - 1) < 0.01 < ppl[(3, 128)] / base - 1
    assert (spec.output / "compare.md").read_text().count("| ok |") == 4
    return rows


def _png_width(path: Path) -> int:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", header[16:20])[0]


@pytest.mark.slow
@requires_demo_model()
def test_local_sweep_writes_comparison_and_pareto(sequential):
    spec = sequential.spec
    rows = _check_comparison(spec)
    assert sequential.rows == rows  # --json printed exactly compare.json, and nothing else, on stdout
    assert [r["launch"] for r in rows] == ["ok"] * 4
    assert all(spec.trial_dir(t).joinpath("report.json").is_file() for t in spec.trials)
    # The Pareto flags: no flagged trial is beaten by another on both size and perplexity, every other is
    on_front = [r for r in rows if PPL in r["pareto"]]
    assert _by_params(rows)[(3, 128)] in on_front  # the smallest trial is always on the front

    def beats(a: dict, b: dict) -> bool:
        size_ok, ppl_ok = a["bytes"] <= b["bytes"], a["metrics"][PPL] <= b["metrics"][PPL]
        return size_ok and ppl_ok and (a["bytes"] < b["bytes"] or a["metrics"][PPL] < b["metrics"][PPL])

    assert not any(beats(a, b) for a in rows for b in on_front)
    assert all(any(beats(a, b) for a in on_front) for b in rows if b not in on_front)
    markdown = (spec.output / "compare.md").read_text()
    assert markdown.count("*") - markdown.count("`*`") == len(on_front) and f"{PPL} ↓" in markdown
    assert _png_width(spec.output / "pareto.png") == 500  # one 5-inch panel at 100 dpi: one metric


@pytest.mark.slow
@requires_demo_model()
def test_relaunch_skips_finished_and_reruns_killed_and_stale_trials(sequential, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(sequential.path.parent, folder)
    spec = sweeps.load_sweep(folder / "sweep.yaml")
    assert [spec.state(t) for t in spec.trials] == ["finished"] * 4
    killed, stale = spec.trials[1], spec.trials[2]
    # Trial 1 is killed half-way, as by the OOM killer: a hidden staging folder and layer checkpoints remain.
    shutil.rmtree(spec.trial_dir(killed))
    monkeypatch.setenv("COMPRESS_FAULT_AFTER_LAYER", "1:KILL")
    status = sweeps.run_trial_process(spec, killed, threads=2)
    monkeypatch.delenv("COMPRESS_FAULT_AFTER_LAYER")
    assert status["status"] == "failed" and "killed by SIGKILL" in status["error"]
    trials_dir = spec.output / "trials"
    assert [p.name.split(".partial-")[0] for p in trials_dir.glob(".*.partial-*")] == [f".{killed.id}"]
    assert (trials_dir / f".{killed.id}.resume").is_dir() and not spec.trial_dir(killed).exists()
    # Trial 2 finished, but with another recipe (the base recipe was edited since): it must run again.
    report_path = spec.trial_dir(stale) / "report.json"
    report = json.loads(report_path.read_text())
    report["recipe"]["calibration"]["seed"] = 1
    report_path.write_text(json.dumps(report))
    assert spec.state(stale) == "stale"
    untouched = {t.id: spec.trial_dir(t).joinpath("report.json").stat().st_mtime_ns for t in (spec.trials[0], spec.trials[3])}

    result = _invoke(str(folder / "sweep.yaml"), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["launch"] for r in rows] == ["skipped", "ok", "ok", "skipped"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert f"{spec.trials[0].id}: skipped" in result.stderr and "2 finished before (skipped), 2 to run" in result.stderr
    assert untouched == {t: spec.output.joinpath("trials", t, "report.json").stat().st_mtime_ns for t in untouched}
    assert json.loads(spec.trial_dir(killed).joinpath("report.json").read_text())["resumed"] is True
    assert "resumed from its checkpoints" in result.stderr
    assert sorted(p.name for p in trials_dir.iterdir()) == sorted(t.id for t in spec.trials)  # no hidden leftovers
    # the resumed and the re-run trial give exactly what the uninterrupted sweep gave
    for row, reference in zip(rows, sequential.rows):
        assert row["metrics"][PPL] == reference["metrics"][PPL] and row["bytes"] == reference["bytes"]


def _log_interval(run_log: Path) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in run_log.read_text().splitlines()
              if line[:4].isdigit()]
    return stamps[0], stamps[-1]


def _most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


@pytest.mark.slow
@requires_demo_model()
def test_parallel_local_sweep_matches_sequential_and_overlaps(sequential, tmp_path):
    path = _sweep_file(tmp_path, recipe=str(sequential.spec.recipe), parallel=2)
    result = _invoke(str(path), "--json")
    assert result.exit_code == 0, result.output
    spec = sweeps.load_sweep(path)
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == [r["id"] for r in sequential.rows]
    assert sorted(p.name for p in (spec.output / "trials").iterdir()) == sorted(r["id"] for r in sequential.rows)
    for row, reference in zip(rows, sequential.rows):
        assert row["status"] == "ok" and row["launch"] == "ok"
        assert row["metrics"][PPL] == reference["metrics"][PPL] and row["bytes"] == reference["bytes"]
    intervals = [_log_interval(spec.trial_dir(t) / "run.log") for t in spec.trials]
    (start0, end0), (start1, end1) = intervals[:2]
    assert start1 < end0 and start0 < end1  # the first two trials ran at the same time
    assert _most_at_once(intervals) == 2  # and never more than --parallel
    assert all(spec.log_path(t).is_file() for t in spec.trials)  # one log per trial process


@pytest.mark.slow
@requires_demo_model()
def test_failed_trial_does_not_stop_the_others(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(DEMO_MODEL, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    path = _sweep_file(tmp_path, grid={"passes[0].rtn.bits": [4]}, models=[str(DEMO_MODEL), str(broken)], parallel=2)
    result = _invoke(str(path), "--json")
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    good, bad = sweeps.load_sweep(path).trials
    assert bad.id == "broken-bits4" and rows[1]["id"] == bad.id and rows[1]["error"]
    assert f"{bad.id}: FAILED" in result.stderr and f"1 of 2 trials failed: {bad.id}" in result.stderr
    assert (tmp_path / "out" / "trials" / good.id / "report.json").is_file()
    assert not (tmp_path / "out" / "trials" / bad.id).exists()
    assert "Traceback" in (tmp_path / "out" / "logs" / "t001.log").read_text()
    assert f"- {bad.id} failed:" in (tmp_path / "out" / "compare.md").read_text()


@pytest.mark.slow
@requires_demo_model()
def test_ray_sweep(tmp_path):
    pytest.importorskip("ray")
    spec = sweeps.load_sweep(_sweep_file(tmp_path, "ray", resources={"cpus": 1}))
    statuses = sweeps.run_ray(spec, None)
    assert sorted(s["status"] for s in statuses) == ["ok"] * 4
    from compress.app.sweep_compare import write_compare

    write_compare(spec)
    _check_comparison(spec)


class FakeRay(types.ModuleType):
    """Records what the ray backend asks of Ray; trial 1's worker "dies"."""

    def __init__(self):
        super().__init__("ray")
        self.init_kwargs: dict | None = None
        self.remote_options: dict | None = None
        self.calls: list[tuple] = []
        self.shut_down = False

    def is_initialized(self):
        return self.init_kwargs is not None and not self.shut_down

    def init(self, **kwargs):
        self.init_kwargs = kwargs

    def shutdown(self):
        self.shut_down = True

    def remote(self, **options):
        self.remote_options = options
        fake = self

        class Remote:
            def remote(self, sweep_file, output, index, use_cache):
                fake.calls.append((sweep_file, output, index, use_cache))
                return index

        return lambda function: Remote()

    def get(self, index):
        if index == 1:
            raise RuntimeError("worker died\n(more lines)")
        return {"id": f"t{index:03d}", "index": index, "status": "ok"}


@requires_demo_model()
def test_ray_backend_passes_address_and_per_trial_request(tmp_path, monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    path = _sweep_file(tmp_path, resources={"cpus": 2, "gpus": 0.5, "memory_gb": 3})
    result = _invoke(str(path), "--backend", "ray", "--address", "ray://head:10001", "--json")
    assert result.exit_code == 1  # trial 1 failed
    assert fake.init_kwargs is not None and fake.init_kwargs["address"] == "ray://head:10001" and fake.shut_down
    assert fake.remote_options == {"num_cpus": 2, "num_gpus": 0.5, "memory": 3 * 2**30}
    spec = sweeps.load_sweep(path)
    assert fake.calls == [(str(spec.source), str(spec.output), i, True) for i in range(4)]  # True: the cache is used
    rows = json.loads(result.stdout)
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "RuntimeError: worker died"
    assert f"{spec.trials[1].id}: FAILED" in result.stderr
    assert sweeps.ray_init_options(None)["address"] is None  # embedded local Ray by default

    def unreachable(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster")

    monkeypatch.setattr(fake, "init", unreachable)
    fake.init_kwargs = None
    refused = _invoke(str(path), "--backend", "ray", "--address", "10.0.0.9:6379")
    assert refused.exit_code == 2 and "cannot connect to the Ray cluster at 10.0.0.9:6379" in refused.stderr


@requires_demo_model()
def test_slurm_script_is_valid_bash_with_one_trial_per_index(tmp_path):
    path = _sweep_file(tmp_path, "slurm", slurm={"partition": "gpu", "max_parallel": 2, "setup": ["export SETUP_RAN=1"]},
                       resources={"cpus": 4, "gpus": 1, "memory_gb": 31.5})
    spec = sweeps.load_sweep(path)
    script = sweeps.slurm_script(spec)
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=32G", "#SBATCH --partition=gpu", f"#SBATCH --output={spec.output}/logs/t%3a.log"):
        assert line in script.splitlines()
    assert script.index("export SETUP_RAN=1") < script.index('--only "$SLURM_ARRAY_TASK_ID"')
    file = tmp_path / "s.sbatch"
    file.write_text(script)
    checked = subprocess.run(["bash", "-n", str(file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert sweeps.slurm_script(spec, [1, 3]).count("#SBATCH --array=1,3%2") == 1
    fractional = sweeps.load_sweep(_sweep_file(tmp_path, "slurm", resources={"gpus": 0.5}))
    with pytest.raises(UserError, match="whole GPUs"):
        sweeps.slurm_script(fractional)


@pytest.mark.slow
@requires_demo_model()
def test_slurm_array_task_runs_exactly_its_trial(sequential, tmp_path, monkeypatch):
    spec = sweeps.load_sweep(sequential.path, output=tmp_path / "slurm")
    script = tmp_path / "sweep.sbatch"
    monkeypatch.chdir(tmp_path)  # submitted from outside the repository, with compress installed as users have it
    script.write_text(sweeps.slurm_script(spec))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update({"SLURM_ARRAY_TASK_ID": "2", "HF_HUB_OFFLINE": "1"})
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [spec.state(t) for t in spec.trials] == ["pending", "pending", "finished", "pending"]
    report = json.loads((spec.trial_dir(spec.trials[2]) / "report.json").read_text())
    assert report["metrics"]["perplexity"]["eval"]["compressed"] == sequential.rows[2]["metrics"][PPL]


def test_array_spec():
    assert sweeps.array_spec([0, 1, 2, 3]) == "0-3"
    assert sweeps.array_spec([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert sweeps.array_spec([4], max_parallel=3) == "4%3"


def _fake_sbatch(folder: Path, *, stdout: str, exit_code: int = 0) -> Path:
    folder.mkdir(exist_ok=True)
    record = folder / "argv.txt"
    tool = folder / "sbatch"
    tool.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho "{stdout}"\necho "sbatch: error: {stdout}" >&2\n'
                    f"exit {exit_code}\n")
    tool.chmod(0o755)
    return record


def _mark_finished(spec: sweeps.Sweep, trial: sweeps.Trial) -> None:
    from compress.recipe.schema import load_recipe

    recipe = load_recipe(spec.recipe, overrides=list(trial.overrides), model=trial.model)
    spec.trial_dir(trial).mkdir(parents=True)
    spec.trial_dir(trial).joinpath("report.json").write_text(json.dumps({"recipe": recipe.to_dict()}))


@requires_demo_model()
def test_slurm_submit_runs_sbatch_and_prints_the_job_id(tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, "slurm", slurm={"max_parallel": 2})
    record = _fake_sbatch(tmp_path / "bin", stdout="4242;cluster1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = _invoke(str(path), "--submit")
    assert result.exit_code == 0, result.output
    script = tmp_path / "out" / "sweep.sbatch"
    assert result.stdout.strip() == "4242" and "submitted job 4242: array 0-3%2 (4 trials" in result.stderr
    assert record.read_text().splitlines() == ["--parsable", str(script)]
    # a re-launch queues only the trials that are not finished
    spec = sweeps.load_sweep(path)
    _mark_finished(spec, spec.trials[0])
    _mark_finished(spec, spec.trials[2])
    again = _invoke(str(path), "--submit", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {"script": str(script), "array": "1,3%2", "job_id": "4242",
                                        "trials": [spec.trials[1].id, spec.trials[3].id]}
    assert "#SBATCH --array=1,3%2" in script.read_text()


@requires_demo_model()
def test_slurm_submit_errors_exit_2(tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, "slurm")
    _fake_sbatch(tmp_path / "bin", stdout="invalid partition specified", exit_code=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    failed = _invoke(str(path), "--submit")
    assert failed.exit_code == 2 and "sbatch failed (exit 1): sbatch: error: invalid partition" in failed.stderr
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert _invoke(str(path), "--submit").exit_code == 2
    assert sweeps.parse_job_id("77\n") == "77"
    with pytest.raises(UserError, match="no job id"):
        sweeps.parse_job_id("Submitted batch job")


# ---------------------------------------------------------------------------------------------------
# Sweep-file errors: exit 2, naming the file and line, before anything runs

BAD_SWEEPS = [
    ("recipe: base.yaml\ngrid:\n  passes[0].rtn.bitz: [3, 4]\n",
     "sweep.yaml:3 grid.passes[0].rtn.bitz: unknown key 'bitz'. Did you mean: bits?"),
    ("recipe: base.yaml\ngrid:\n  passes[0].rtn.group_size: [32]\n  passes[0].rtn.bits: [4, 16]\n",
     "sweep.yaml:4 grid.passes[0].rtn.bits: expected less than or equal to 8, got 16"),
    ("recipe: base.yaml\ngrid:\n  passes[2].rtn.bits: [4]\n",
     "sweep.yaml:3 grid.passes[2].rtn.bits: index 2 is out of range"),
    ("recipe: base.yaml\nbackend: slurmm\ngrid:\n  passes[0].rtn.bits: [4]\n",
     "sweep.yaml:2 backend: expected 'local', 'ray' or 'slurm', got 'slurmm'"),
    ("recipe: base.yaml\ngrid:\n  passes[0].rtn.bits: []\n",
     "sweep.yaml:3 grid.passes[0].rtn.bits: needs at least one value"),
    ("recipe: base.yaml\ngrid: {}\n", "sweep.yaml:2 grid: nothing to sweep"),
    ("recipe: base.yaml\ngrid:\n  passes[0].rtn.bits: 4\n", "sweep.yaml:3 grid.passes[0].rtn.bits: expected a valid list, got 4"),
    ("recipe: base.yaml\ngrdi:\n  passes[0].rtn.bits: [4]\n", "sweep.yaml:2 grdi: unknown key 'grdi'. Did you mean: grid?"),
    ("recipe: base.yaml\nparallel: 0\ngrid:\n  passes[0].rtn.bits: [4]\n", "sweep.yaml:2 parallel: expected greater than or equal to 1"),
    ("recipe: missing.yaml\ngrid:\n  passes[0].rtn.bits: [4]\n", "sweep.yaml:1 recipe: recipe file not found"),
    ("recipe: base.yaml\nmodels: [/no/such/model]\ngrid:\n  passes[0].rtn.bits: [4]\n",
     "sweep.yaml:2 models[0]: model folder not found: /no/such/model"),
    ("recipe: base.yaml\ngrid: [\n", "sweep.yaml:3 <root>: not valid YAML"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_SWEEPS, ids=[
    "bad-grid-key", "bad-grid-value", "bad-index", "unknown-backend", "empty-value-list", "empty-grid", "not-a-list",
    "unknown-key", "parallel-0", "missing-recipe", "missing-model", "not-yaml"])
def test_sweep_file_errors_exit_2_naming_file_and_line(tmp_path, monkeypatch, text, expected):
    (tmp_path / "base.yaml").write_text("passes:\n  - rtn: {bits: 4}\n")
    (tmp_path / "sweep.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = _invoke("sweep.yaml")
    assert result.exit_code == 2, result.output
    assert "1 problem in sweep file:" in result.stderr and expected in result.stderr, result.stderr
    with pytest.raises(RecipeError):
        sweeps.load_sweep(tmp_path / "sweep.yaml")


@requires_demo_model()
def test_option_errors_exit_2_and_internal_errors_exit_1(tmp_path, monkeypatch):
    path = _sweep_file(tmp_path)
    assert _invoke(str(path), "--backend", "k8s").exit_code == 2
    assert "trials 0..3" in _invoke(str(path), "--only", "4").stderr
    assert _invoke(str(path), "--parallel", "0").exit_code == 2
    assert _invoke(str(tmp_path / "nope.yaml")).exit_code == 2
    import compress.app.sweep_compare

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(compress.app.sweep_compare, "write_compare", boom)
    crashed = _invoke(str(path), "--compare")
    assert crashed.exit_code == 1 and "internal error" in crashed.stderr and "simulated bug" in crashed.stderr


@requires_demo_model()
def test_dry_run_lists_trials_and_their_state(tmp_path):
    path = _sweep_file(tmp_path)
    spec = sweeps.load_sweep(path)
    _mark_finished(spec, spec.trials[3])
    result = _invoke(str(path), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["trials"]
    assert [t["state"] for t in plan] == ["pending", "pending", "pending", "finished"]
    assert plan[1]["params"] == {"passes[0].rtn.bits": 3, "passes[0].rtn.group_size": 128}
    assert not (tmp_path / "out" / "compare.json").exists()


# ---------------------------------------------------------------------------------------------------
# The Pareto front, on hand-made points


def test_pareto_front_lower_is_better():
    points = [(1.0, 5.0), (2.0, 4.0), (2.0, 6.0), (3.0, 4.0), (0.5, 9.0)]
    assert pareto_front(points) == [0, 1, 4]  # (2, 6) loses to (2, 4); (3, 4) to (2, 4)
    assert pareto_front([(1.0, 3.0), (1.0, 3.0)]) == [0, 1]  # equal points: neither beats the other
    assert pareto_front([(1.0, math.nan), (2.0, 3.0), (0.5, math.inf)]) == [1]  # diverged trials never count
    assert pareto_front([]) == []


def test_pareto_front_higher_is_better_for_scores():
    accuracy = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.4)]
    assert pareto_front(accuracy, higher_is_better=True) == [0, 1, 4]
    assert pareto_front(accuracy) == [4]  # read as lower-is-better, the smallest and worst would beat everything
    assert not higher_is_better("perplexity/eval") and not higher_is_better("last_word_perplexity/lambada")
    assert not higher_is_better("lm_eval_bits_per_byte/wikitext")
    assert higher_is_better("acc/piqa") and higher_is_better("lm_eval_acc_norm/hellaswag")


def test_pareto_front_is_exactly_the_non_dominated_set():
    rng = random.Random(0)
    for _ in range(50):
        points = [(float(rng.randint(1, 6)), float(rng.randint(1, 6))) for _ in range(rng.randint(1, 12))]
        front = set(pareto_front(points))

        def beats(a, b):
            return a[0] <= b[0] and a[1] <= b[1] and a != b

        assert front == {i for i, p in enumerate(points) if not any(beats(q, p) for q in points)}
        assert all(any(beats(points[j], points[i]) for j in front) for i in range(len(points)) if i not in front)


def test_compare_rows_mark_the_front_per_metric_and_stay_json():
    def row(trial: str, mib: float, ppl: float, acc: float) -> dict:
        return {"id": trial, "model": None, "params": {}, "status": "ok", "bytes": mib * 2**20, "bits_per_weight": 4,
                "metrics": {PPL: ppl, "acc/piqa": acc}, "seconds": 1.0, "pareto": []}

    rows = [row("small", 1, 9.0, 0.50), row("mid", 2, 7.0, 0.40), row("big", 3, 6.0, 0.60), row("worse", 3, 8.0, 0.55),
            {"id": "broken", "model": None, "params": {}, "status": "failed", "error": "OSError: x"}]
    mark_pareto(rows)
    assert [r.get("pareto") for r in rows] == [["acc/piqa", PPL], [PPL], ["acc/piqa", PPL], [], None]
    table = render_compare(rows)
    assert "| small | — | ok | 1.00 | 4 | 0.5000* | 9.0000* | 1.0 |" in table
    assert "| mid | — | ok | 2.00 | 4 | 0.4000 | 7.0000* | 1.0 |" in table and "| 0.5500 | 8.0000 |" in table
    assert "acc/piqa ↑" in table and f"{PPL} ↓" in table and "- broken failed: OSError: x" in table
    json.dumps(rows, allow_nan=False)


# ---------------------------------------------------------------------------------------------------
# The shipped sweep files and `make sweep`


def test_shipped_sweep_files_validate():
    demo = sweeps.load_sweep(REPO / "scripts" / "sweep-demo.yaml")
    assert len(demo.trials) == 4 and demo.output == REPO / "compress-out" / "sweep-demo"
    slurm = sweeps.load_sweep(REPO / "scripts" / "sweep-slurm.yaml")
    assert len(slurm.trials) == 8 and slurm.config.backend == "slurm"
    checked = subprocess.run(["bash", "-n"], input=sweeps.slurm_script(slurm), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    checked = subprocess.run(["bash", "-n", str(REPO / "scripts" / "slurm-torchrun.sbatch")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_sweep_runs_the_shipped_example():
    dry = subprocess.run(["make", "-n", "sweep", "SWEEP_FLAGS=--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "compress sweep scripts/sweep-demo.yaml --dry-run" in dry.stdout


def test_trial_ids_survive_a_grown_grid(tmp_path):
    """Adding a value to the grid must not rename (and so re-run) the trials that already finished."""
    def ids(grid):
        return [t.id for t in sweeps.expand_trials(sweeps.SweepFile(recipe="r.yaml", grid=grid), tmp_path)]

    before = ids({"passes[0].rtn.bits": [3, 4], "passes[0].rtn.group_size": [64]})
    after = ids({"passes[0].rtn.bits": [2, 3, 4], "passes[0].rtn.group_size": [64]})
    assert before == ["bits3-group_size64", "bits4-group_size64"] and set(before) < set(after)
    # labels that collide after slugging keep readable stems and differ by a digest of their own settings
    clash = ids({"passes[0].rtn.ignore": [["a b"], ["a_b"]]})
    assert len(set(clash)) == 2 and all(i.startswith("ignorea-b-") for i in clash)
