"""The command line as a script sees it: exit codes, stdout/stderr split, and no half-written outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def compress(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli.main", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ):
    from tests.tiny_models import synthetic_text

    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "tiny", "llama")
    (root / "text.txt").write_text(synthetic_text())
    (root / "short.txt").write_text("too short")
    (root / "good.yaml").write_text(
        "model: tiny\n"
        "passes:\n  - rtn: {bits: 4, group_size: 32}\n"
        "evaluate:\n  perplexity: [{dataset: text.txt, seq_len: 64}]\n"
    )
    return root


def test_help_everywhere_has_examples(workdir):
    for command in ([], ["run"], ["eval"], ["validate"], ["recipes"], ["recipes", "list"], ["recipes", "show"]):
        result = compress(*command, "--help", cwd=workdir)
        assert result.returncode == 0, result.stderr
        if command:
            assert "Example" in result.stdout, command


def test_run_writes_report_and_json_goes_to_stdout(workdir):
    result = compress("run", "good.yaml", "--output", "out", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("recipe", "model", "passes", "metrics", "size", "timings", "peak_memory_bytes", "versions"):
        assert key in report
    timings = report["timings"]  # from the process's start: interpreter and imports are `startup`
    assert 0.05 < timings["startup"] < timings["total"] and timings["report"] > 0
    assert timings["total"] >= sum(timings[p] for p in ("startup", "load", "baseline_eval", "passes", "eval", "report"))
    ppl = report["metrics"]["perplexity"]["text"]
    assert ppl["baseline"] > 1 and ppl["compressed"] > 1
    assert report["passes"][0]["name"] == "rtn" and report["passes"][0]["summary"]["modules"] == 14
    assert report["size"]["quantized_bits_per_weight"] == pytest.approx(4 + 16 / 32)
    assert sorted(p.name for p in (workdir / "out").iterdir()) == [".compress", "recipe.yaml", "report.html", "report.json", "report.md", "run.log", "state"]
    # The output folder exists now: a second run must not clobber it without --overwrite.
    again = compress("run", "good.yaml", "--output", "out", "--quiet", cwd=workdir)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_quiet_prints_nothing(workdir):
    result = compress("run", "good.yaml", "--output", "quiet-out", "--quiet", cwd=workdir)
    assert result.returncode == 0
    assert result.stdout == "" and result.stderr == ""


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("bits: 4", "bits: 'x'"), "passes[0].rtn.bits"),
        (("rtn:", "rnt:"), "Did you mean: rtn?"),
        (("group_size", "grup_size"), "passes[0].rtn.grup_size"),
        (("text.txt", "missing.txt"), "evaluate.perplexity[0].dataset: file not found"),
        (("bits: 4", "bits: 9"), "passes[0].rtn.bits: expected less than or equal to 8"),
    ],
)
def test_bad_recipes_exit_2_and_leave_nothing(workdir, edit, expected):
    bad = workdir / "bad.yaml"
    bad.write_text((workdir / "good.yaml").read_text().replace(*edit))
    result = compress("run", "bad.yaml", "--output", "bad-out", cwd=workdir)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "bad.yaml:" in result.stderr
    assert not (workdir / "bad-out").exists()
    assert not list(workdir.glob(".bad-out*"))


def test_failure_during_run_leaves_no_output(workdir):
    (workdir / "late.yaml").write_text((workdir / "good.yaml").read_text().replace("text.txt", "short.txt"))
    result = compress("run", "late.yaml", "--output", "late-out", cwd=workdir)
    assert result.returncode == 2
    assert "fewer than seq_len" in result.stderr
    assert not (workdir / "late-out").exists()
    assert not list(workdir.glob(".late-out*"))


def test_internal_error_exits_1_and_leaves_no_output(workdir, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import compress.app.runner
    from compress.cli.main import app

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(compress.app.runner, "run_passes", boom)
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, ["run", "good.yaml", "--output", str(tmp_path / "crash")])
    assert result.exit_code == 1
    assert "internal error" in result.output and "simulated bug" in result.output
    assert not (tmp_path / "crash").exists()
    assert list(tmp_path.iterdir()) == []


def test_user_errors_exit_2(workdir):
    assert compress("run", "nope.yaml", cwd=workdir).returncode == 2
    assert compress("run", "good.yaml", "--bogus-flag", cwd=workdir).returncode == 2
    assert compress("run", "good.yaml", "--set", "passes[0].rtn.bits", cwd=workdir).returncode == 2
    missing_model = compress("run", "good.yaml", "--model", "./no-such-folder", cwd=workdir)
    assert missing_model.returncode == 2 and "model folder not found" in missing_model.stderr


def test_pickle_weights_are_refused_by_default(workdir, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in (workdir / "tiny").iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save({}, folder / "pytorch_model.bin")
    result = compress("eval", str(folder), "--perplexity", "text.txt", cwd=workdir)
    assert result.returncode == 2 and "--allow-pickle" in result.stderr


def test_dry_run_loads_nothing_and_writes_nothing(workdir):
    result = compress("run", "good.yaml", "--dry-run", "--json", "--output", "dry", "--set", "passes[0].rtn.bits=3", cwd=workdir)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["recipe"]["passes"][0]["rtn"]["bits"] == 3
    assert plan["stages"] == [{"scope": "layer", "passes": ["passes[0].rtn"]}]
    assert not (workdir / "dry").exists()


def test_validate_and_recipes_commands(workdir):
    ok = compress("validate", "good.yaml", "--json", cwd=workdir)
    assert ok.returncode == 0 and json.loads(ok.stdout)["valid"] is True
    (workdir / "typo.yaml").write_text((workdir / "good.yaml").read_text().replace("bits", "bitz"))
    bad = compress("recipes", "validate", "typo.yaml", "--json", cwd=workdir)
    assert bad.returncode == 2
    [issue] = json.loads(bad.stdout)["issues"]
    assert issue == {"path": "passes[0].rtn.bitz", "line": 3, "message": issue["message"]}
    assert "Did you mean: bits?" in issue["message"]
    listed = compress("recipes", "list", "--json", cwd=workdir)
    assert "demo" in [r["name"] for r in json.loads(listed.stdout)]
    shown = compress("recipes", "show", "demo", cwd=workdir)
    assert shown.returncode == 0 and "passes:" in shown.stdout


def test_eval_command(workdir):
    result = compress("eval", "tiny", "--perplexity", "text.txt", "--seq-len", "64", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)["perplexity"]["text"]["value"]
    assert value > 1
    missing = compress("eval", "tiny", "--perplexity", "nope.txt", "--seq-len", "64", cwd=workdir)  # tiny has 256 positions
    assert missing.returncode == 2 and "not found" in missing.stderr
