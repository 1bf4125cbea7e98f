"""Inputs are never destroyed and runs cannot clobber each other (issue 15, defects 6-9, resume fingerprint).

- `--overwrite` replaces only an earlier output of compress (or an empty folder), never an input;
- an output, trial or checkpoint folder is locked by the live run that writes it, and a SIGKILLed holder frees it;
- every written path (run folder, export.path, offload_dir) is checked before the model loads;
- a full disk is exit 2, keeps the finished layer checkpoints, and the run resumes bit-identically;
- `--resume` refuses checkpoints made before the model's weights changed in place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.engine.checkpoint import checkpoint_dir_for
from tests.conftest import REPO, recipe_text
from tests.tiny_models import save_tiny_model, synthetic_text

LAYERS = 3
PASSES = "  - gptq: {bits: 4, group_size: 32}"  # calibrated: its checkpoints carry the next layer's inputs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    model_dir = root / "models" / "tiny"
    save_tiny_model(model_dir, "llama", layers=LAYERS)
    (root / "text.txt").write_text(synthetic_text(), encoding="utf-8")
    (root / "recipe.yaml").write_text(recipe_text(model_dir, root / "text.txt", PASSES, root / "text.txt"),
                                      encoding="utf-8")
    return root


def cli(workdir: Path, *args: str):
    from compress.cli.main import app

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def reference(workdir) -> dict:
    """An uninterrupted run: what every interrupted-and-resumed run must equal bit for bit."""
    result = cli(workdir, "run", "recipe.yaml", "--output", "straight", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if the run gets as far as loading the model: these refusals must come first."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr("compress.app.runner.load_model", refuse)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- defect 6: --overwrite never deletes an input, and replaces only an earlier output -----------------------


@pytest.mark.parametrize("target", ["models/tiny", "models", "."])
def test_overwrite_never_deletes_the_model_or_a_folder_above_it(workdir, no_model_load, target):
    before = digest(workdir / "models" / "tiny")
    result = cli(workdir, "run", "recipe.yaml", "--output", target, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "an input of this run" in result.output and "replacing it would delete it" in result.output
    assert digest(workdir / "models" / "tiny") == before
    assert (workdir / "recipe.yaml").is_file() and (workdir / "text.txt").is_file()


def test_overwrite_replaces_only_an_earlier_output_or_an_empty_folder(tmp_path):
    from compress.engine.output import MARKER, replace_refusal

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refusal = replace_refusal(mine, overwrite=True)
    assert refusal is not None and "not an earlier output of compress" in refusal
    assert replace_refusal(mine, overwrite=False) is not None

    (tmp_path / "empty").mkdir()
    assert replace_refusal(tmp_path / "empty", overwrite=True) is None
    marked = tmp_path / "run"
    marked.mkdir()
    (marked / MARKER).write_text("{}")
    assert replace_refusal(marked, overwrite=True) is None
    older = tmp_path / "older-run"  # written before the marker existed: recognised by its report.json
    older.mkdir()
    (older / "report.json").write_text(json.dumps({"schema_version": 1, "recipe": {}}))
    assert replace_refusal(older, overwrite=True) is None
    # An earlier output that holds an input of this run (a run used as the model) is not replaced either.
    (marked / "model").mkdir()
    refusal = replace_refusal(marked, overwrite=True, inputs=[marked / "model"])
    assert refusal is not None and "holds an input" in refusal


def test_export_never_replaces_the_run_it_reads(workdir, reference):
    before = digest(workdir / "straight")
    result = cli(workdir, "export", "straight", "--output", "straight", "--overwrite")
    assert result.exit_code == 2, result.output
    assert "is an input of this run" in result.output
    assert digest(workdir / "straight") == before and (workdir / "straight" / "state").is_dir()


def test_export_into_a_read_only_folder_is_a_user_error(workdir, reference, monkeypatch):
    read_only = workdir / "read-only"
    read_only.mkdir(exist_ok=True)
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse new folders in there as a read-only mount would
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(os.path.abspath(path)).parent == read_only:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        result = cli(workdir, "export", "straight", "--output", "read-only/ckpt")
    finally:
        read_only.chmod(0o755)
    assert result.exit_code == 2, result.output
    assert "cannot write --output read-only/ckpt" in result.output
    assert "internal error" not in result.output


# -- defect 7: one live run per output; a SIGKILLed holder frees it ------------------------------------------


def test_a_live_run_holds_its_output_and_a_killed_one_frees_it(workdir, reference, no_model_load, monkeypatch):
    # A real run that stops itself (SIGSTOP) right after checkpointing layer 0: alive, holding its output.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COMPRESS_FAULT_AFTER_LAYER": "0:STOP"}
    first = subprocess.Popen([sys.executable, "-m", "compress.cli.main", "run", "recipe.yaml", "--output", "shared",
                              "--quiet"], cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), first.stderr.read() if first.stderr else status
        for args in ([], ["--overwrite"], ["--resume"]):  # neither replaced nor adopted while it lives
            second = cli(workdir, "run", "recipe.yaml", "--output", "shared", *args)
            assert second.exit_code == 2, second.output
            assert f"--output shared is in use by another run: pid {first.pid} on " in second.output
        assert (checkpoint_dir_for(workdir / "shared") / "sweep-0" / "layer-0000" / "state.json").is_file()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from compress.engine.output import lock_path_for

    assert lock_path_for(workdir / "shared").exists()  # SIGKILL left the file, but the kernel freed the lock
    monkeypatch.undo()  # the model loads from here on
    resumed = cli(workdir, "run", "recipe.yaml", "--output", "shared", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["weights_sha256"] == reference["weights_sha256"]
    assert not lock_path_for(workdir / "shared").exists()


def test_a_sweep_trial_another_launch_is_running_is_skipped_not_adopted(workdir, tmp_path):
    from compress.app import sweep as sweeps

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"recipe: {workdir / 'recipe.yaml'}\ngrid:\n  passes[0].gptq.bits: [4]\noutput: out\n")
    spec = sweeps.load_sweep(sweep_file)
    trial = spec.trials[0]
    checkpoints = checkpoint_dir_for(spec.trial_dir(trial))
    checkpoints.mkdir(parents=True)
    (checkpoints / "manifest.json").write_text(json.dumps({"fingerprint": "the other launch's"}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom compress.engine.output import hold_output\n"
         "with hold_output(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)", str(spec.trial_dir(trial))],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        status = sweeps.run_loaded_trial(spec, trial)
    finally:
        holder.kill()
        holder.wait()
    assert status["status"] == "skipped", status
    assert f"pid {holder.pid}" in status["busy"]
    assert (checkpoints / "manifest.json").is_file()  # the other launch's checkpoints are neither adopted nor deleted


# -- defect 8: every written path is checked before the model loads ----------------------------------------------


def recipe_with(workdir: Path, extra: str) -> tuple[str, int]:
    """recipe.yaml plus `extra` (YAML) as other.yaml; returns its name and the 1-based line where `extra` starts."""
    base = (workdir / "recipe.yaml").read_text(encoding="utf-8").rstrip("\n") + "\n"
    (workdir / "other.yaml").write_text(base + extra, encoding="utf-8")
    return "other.yaml", base.count("\n") + 1


def test_an_existing_export_path_fails_first_and_is_named(workdir, no_model_load):
    taken = workdir / "taken"
    taken.mkdir(exist_ok=True)
    (taken / "someone-elses.bin").write_text("x")
    name, line = recipe_with(workdir, f"export:\n  format: compressed-tensors\n  path: {taken}\n")
    result = cli(workdir, "run", name, "--output", "fresh")
    assert result.exit_code == 2, result.output
    assert f"export.path (other.yaml:{line + 2}) {taken} already exists" in result.output
    assert "--output fresh" not in result.output and (taken / "someone-elses.bin").is_file()


@pytest.mark.parametrize("case", ["export under a file", "offload_dir is a file", "export inside the output"])
def test_unwritable_or_misplaced_outputs_fail_first(workdir, no_model_load, case):
    (workdir / "a-file").write_text("not a folder")
    extra, expected = {
        "export under a file": ("export: {format: compressed-tensors, path: a-file/ckpt}\n", "cannot write export.path (other.yaml:{line})"),
        "offload_dir is a file": ("", "calibration.offload_dir (other.yaml:3) {dir}/a-file exists and is not a folder"),
        "export inside the output": ("export: {format: compressed-tensors, path: fresh/ckpt}\n", "export.path (other.yaml:{line}) {dir}/fresh/ckpt and --output fresh overlap"),
    }[case]
    name, line = recipe_with(workdir, extra)
    if case == "offload_dir is a file":
        text = (workdir / name).read_text().replace("seed: 0}", "seed: 0, offload: disk, offload_dir: a-file}")
        (workdir / name).write_text(text)
    result = cli(workdir, "run", name, "--output", "fresh")
    assert result.exit_code == 2, result.output
    assert expected.format(line=line, dir=workdir) in " ".join(result.output.split()), result.output
    assert not (workdir / "fresh").exists()


# -- defect 9 and the resume fingerprint: a full disk keeps the checkpoints; changed weights refuse them ------------


def test_a_full_disk_keeps_the_checkpoints_and_resume_is_bit_identical(workdir, reference, monkeypatch):
    import compress.engine.checkpoint as checkpoint
    from compress.cli.common import err_console

    real_save = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "layer-0001" in filename:  # layer 0 is checkpointed; the disk fills while saving layer 1
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    monkeypatch.setattr(err_console, "_width", 40)  # a narrow log: the resume command must still be one line
    full = cli(workdir, "run", "recipe.yaml", "--output", "full")
    monkeypatch.undo()
    assert full.exit_code == 2, full.output
    assert "internal error" not in full.output
    assert "no space left on the disk (writing " in full.output and "layer-0001" in full.output
    kept = checkpoint_dir_for(workdir / "full")
    assert f"its 1 finished decoder layer is kept in {checkpoint_dir_for(Path('full'))}; free some space" in full.output
    assert "\nResume with: compress run recipe.yaml --output full --resume\n" in full.output
    assert (kept / "sweep-0" / "layer-0000" / "state.json").is_file() and not (workdir / "full").exists()

    # One weight changed in place, size and mtime restored: the checkpoints no longer match the model.
    weights = workdir / "models" / "tiny" / "model.safetensors"
    original, stat = weights.read_bytes(), weights.stat()
    changed = bytearray(original)
    changed[-2] ^= 0x01
    weights.write_bytes(bytes(changed))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        refused = cli(workdir, "run", "recipe.yaml", "--output", "full", "--resume")
    finally:
        weights.write_bytes(original)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert refused.exit_code == 2, refused.output
    assert "the model's files changed since the checkpoints" in refused.output and "model.safetensors" in refused.output

    resumed = cli(workdir, "run", "recipe.yaml", "--output", "full", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert report["weights_sha256"] == reference["weights_sha256"]
    assert report["metrics"] == reference["metrics"]
    assert not kept.exists()


def test_disk_problems_are_recognised_through_native_writers():
    from safetensors import SafetensorError

    from compress.engine.output import disk_problem

    # what safetensors raised on a full 1 MiB tmpfs (its Rust writer reports only the OS error number)
    problem = disk_problem(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert problem is not None and problem.full
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x")
        except OSError as inner:
            raise RuntimeError("writing the shard failed") from inner
    except RuntimeError as outer:
        chained = disk_problem(outer)
    assert chained is not None and chained.reason == "the file system is read-only" and chained.path == "/mnt/ro/x"
    assert disk_problem(RuntimeError("shapes do not match (os error 9999)")) is None
    assert disk_problem(ValueError("bad value")) is None


def test_hold_output_is_reentrant_and_leaves_no_lock_file(tmp_path):
    from compress.engine.output import hold_output, lock_path_for

    target = tmp_path / "run"
    with hold_output(target):
        with hold_output(target):
            assert json.loads(lock_path_for(target).read_text())["pid"] == os.getpid()
        assert lock_path_for(target).exists()
    assert list(tmp_path.iterdir()) == []


def test_validate_refuses_the_written_paths_a_run_would_refuse_and_creates_nothing(workdir, tmp_path):
    """`compress validate` catches an export.path in the way or unwritable, and an offload_dir that is a file, with
    the recipe line, as the run's preflight does: the 347-second loss of issue 15 ends at validate."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-ours").mkdir()
    (tmp_path / "not-ours" / "keep.txt").write_text("keep")
    model, text = workdir / "models" / "tiny", workdir / "text.txt"
    cases = {
        "export:\n  format: dense\n  path: not-ours\n": r"export\.path \(recipe\.yaml:6\) .*not-ours already exists",
        "export:\n  format: dense\n  path: a-file/sub\n": r"cannot write export\.path \(recipe\.yaml:6\) .*a-file is a file",
        f"calibration:\n  dataset: {text}\n  offload_dir: a-file\n": r"calibration\.offload_dir \(recipe\.yaml:6\) .*not a folder",
    }
    for tail, message in cases.items():
        (tmp_path / "recipe.yaml").write_text(f"model: {model}\npasses:\n  - magnitude: {{sparsity: 0.5}}\n{tail}")
        before = sorted(p.name for p in tmp_path.iterdir())
        result = cli(tmp_path, "validate", "recipe.yaml")
        assert result.exit_code == 2 and re.search(message, " ".join(result.output.split())), (tail, result.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, nothing removed
    assert (tmp_path / "not-ours" / "keep.txt").read_text() == "keep"
    (tmp_path / "recipe.yaml").write_text(f"model: {model}\npasses:\n  - magnitude: {{sparsity: 0.5}}\n"
                                         "export: {format: dense, path: fresh}\n")
    assert cli(tmp_path, "validate", "recipe.yaml").exit_code == 0
    refused = cli(tmp_path, "validate", "recipe.yaml", "--output", "not-ours")  # --output checked when given
    assert refused.exit_code == 2 and "--output not-ours already exists" in " ".join(refused.output.split())
    assert not (tmp_path / "fresh").exists()
