"""The command line as a script, a log file or a batch scheduler sees it: no terminal, --json on stdout, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_model, synthetic_text

MODULE = "model.layers.1.self_attn.q_proj"  # 31 characters: rich's 80-column fallback cut it to `model.laye…`


def no_terminal_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def compress(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI with stdin, stdout and stderr all off a terminal (rich would otherwise measure the one it finds)."""
    return subprocess.run([sys.executable, "-m", "compress.cli.main", *args], cwd=cwd, env=env or no_terminal_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    save_tiny_model(root / "tiny", "llama")
    (root / "text.txt").write_text(synthetic_text())
    (root / "good.yaml").write_text(
        "model: tiny\n"
        "passes:\n  - rtn: {bits: 4, group_size: 32}\n"
        "evaluate:\n  perplexity: [{dataset: text.txt, seq_len: 64}]\n"
    )
    (root / "typo.yaml").write_text((root / "good.yaml").read_text().replace("group_size", "gropu_size"))
    (root / "grid.yaml").write_text("recipe: good.yaml\ngrid:\n  passes[0].rtn.bits: [3, 4]\noutput: sweep-out\n")
    return root


# -- off a terminal, tables keep every name whole -----------------------------------------------------------------


def test_inspect_off_a_terminal_prints_whole_module_names(workdir):
    result = compress("inspect", "tiny", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert MODULE in result.stderr and "…" not in result.stderr


def test_compare_off_a_terminal_prints_whole_run_names(workdir):
    run_name = "runs/rtn-w4-g32-on-the-tiny-llama-with-a-long-descriptive-name"
    done = compress("run", "good.yaml", "--output", run_name, "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    result = compress("compare", run_name, run_name, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(run_name) == 2 and "…" not in result.stderr


def test_columns_still_sets_the_width(workdir):
    result = compress("inspect", "tiny", cwd=workdir, env=no_terminal_env(COLUMNS="60"))
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stderr.splitlines()) <= 60


# -- --json: an error is an object on stdout too, and stderr keeps the message ---------------------------------------


@pytest.mark.parametrize("args, kind, message", [
    (["run", "typo.yaml"], "recipe_error", "unknown key 'gropu_size'"),
    (["run", "missing.yaml"], "user_error", "recipe file not found: missing.yaml"),
    (["eval", "tiny"], "user_error", "nothing to evaluate"),
    (["inspect", "no-such-folder"], "user_error", "no-such-folder"),
    (["export", "no-such-run", "--format", "zip"], "user_error", "--format must be one of"),
    (["compare", "no-such-run"], "user_error", "no report.json in no-such-run"),
    (["sensitivity", "good.yaml"], "user_error", "allocate"),
    (["sweep", "no-such-sweep.yaml"], "user_error", "no-such-sweep.yaml"),
])
def test_json_errors_are_objects_on_stdout(workdir, monkeypatch, args, kind, message):
    from typer.testing import CliRunner

    from compress.cli.main import app

    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, [*args, "--json"])  # in this process: torch is imported once for all
    assert result.exit_code == 2, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 2
    assert payload["error"]["kind"] == kind and message in payload["error"]["message"]
    assert message in " ".join(result.stderr.split())  # the human message, unwrapped


def test_json_usage_error_is_an_object_too(workdir):
    """click rejects a bad option before any command runs: the entry point prints the object for it."""
    result = compress("run", "good.yaml", "--bogus-flag", "--json", cwd=workdir)
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "user_error" and "No such option: --bogus-flag" in error["message"]
    assert "No such option" in result.stderr


def test_json_recipe_error_names_file_and_line(workdir):
    result = compress("run", "typo.yaml", "--json", cwd=workdir)
    error = json.loads(result.stdout)["error"]
    assert (error["file"], error["line"]) == ("typo.yaml", 3)
    assert error["issues"] == [{"path": "passes[0].rtn.gropu_size", "line": 3, "message": error["issues"][0]["message"]}]
    validate = compress("validate", "typo.yaml", "--json", cwd=workdir)
    assert validate.returncode == 2 and "gropu_size" in validate.stderr
    payload = json.loads(validate.stdout)
    assert payload["valid"] is False and payload["issues"] == error["issues"] and payload["error"]["line"] == 3


def test_json_internal_error_is_exit_1_with_an_object(workdir, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import compress.app.runner
    from compress.cli.main import app

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(compress.app.runner, "run_passes", boom)
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, ["run", "good.yaml", "--output", str(tmp_path / "crash"), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"ok": False, "exit_code": 1, "error": {
        "kind": "internal_error", "message": "RuntimeError: simulated bug", "file": None, "line": None, "issues": []}}
    assert "internal error" in result.stderr


# -- SIGTERM is Ctrl-C: exit 130 with a message ----------------------------------------------------------------------

STALL = """
import pathlib, sys, time
import {module} as target
def stall(*args, **kwargs):
    pathlib.Path("started").write_text("")
    time.sleep(120)
target.{name} = stall
sys.argv = ["compress", *sys.argv[1:]]
from compress.cli.main import main
main()
"""


@pytest.mark.parametrize("args, stalled, message", [
    (["eval", "tiny", "--perplexity", "text.txt"], "compress.engine.model_io.load_model",
     "interrupted: the evaluation stopped"),
    (["run", "good.yaml", "--output", "stopped"], "compress.app.runner.run_recipe", "interrupted: no output"),
    (["sensitivity", "good.yaml"], "compress.app.sensitivity.recipe_sensitivities", "interrupted"),
    (["sweep", "grid.yaml"], "compress.app.runner.run_recipe", "interrupted: finished trials are kept"),
])
def test_sigterm_exits_130_with_a_message(workdir, args, stalled, message):
    module, name = stalled.rsplit(".", 1)
    started = workdir / "started"
    started.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "-c", STALL.format(module=module, name=name), *args, "--json"],
                               cwd=workdir, env=no_terminal_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert message in stderr
    assert json.loads(stdout)["error"] == {"kind": "interrupted", "message": json.loads(stdout)["error"]["message"],
                                           "file": None, "line": None, "issues": []}


def test_an_interrupted_parallel_sweep_stops_its_trial_processes():
    """A SIGTERM reaches only the sweep's own process; its trials, each a process of its own, must be stopped too,
    or leaving the thread pool would wait for every running trial to finish."""
    import threading

    from compress.app.sweep import TrialProcesses

    processes = TrialProcesses()
    outcome: list[tuple[int, str]] = []
    waiter = threading.Thread(target=lambda: outcome.append(processes.run(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"])))
    started = time.monotonic()
    waiter.start()
    while not len(processes) and time.monotonic() - started < 60:
        time.sleep(0.05)
    processes.interrupt()
    waiter.join(timeout=60)
    assert outcome and outcome[0][0] == -signal.SIGTERM and time.monotonic() - started < 60
