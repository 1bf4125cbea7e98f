"""The house: one installed package, `compress`, whose layers import only downwards (import-linter contracts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(package_root: Path) -> subprocess.CompletedProcess[str]:
    """The contracts of pyproject.toml over the `compress` package found first under `package_root`."""
    env = {"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=package_root,
                          env=env, capture_output=True, text=True, timeout=120)


def staged_copy(tmp_path: Path) -> Path:
    """The package as it installs: compress/ with its linked folders copied in (demo weights left out)."""
    shutil.copytree(REPO / "compress", tmp_path / "compress", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "model", "_build"))
    return tmp_path


def test_layer_contracts_hold():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


@pytest.mark.parametrize("module,planted,chain", [
    ("compressors/rtn.py", "from compress.app import runner", "compress.compressors.rtn -> compress.app.runner"),  # plugin -> app
    ("engine/checkpoint.py", "from compress.compressors import base",  # core -> plugin
     "compress.engine.checkpoint -> compress.compressors.base"),
])
def test_a_wrong_way_import_breaks_the_layers(tmp_path, module, planted, chain):
    root = staged_copy(tmp_path)
    path = root / "compress" / module
    path.write_text(path.read_text() + f"\n{planted}  # noqa: E402\n")
    done = lint(root)
    assert done.returncode == 1
    assert chain in done.stdout, done.stdout


def test_the_design_card_folders_are_the_packages_subfolders():
    for folder in ("cli", "compressors", "evaluators", "recipes"):
        link = REPO / "compress" / folder
        assert link.is_symlink() and link.resolve() == (REPO / folder).resolve(), folder


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path):
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache", "compress-out"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "No module named 'wheel'" in done.stderr + done.stdout:
        pytest.skip("this environment cannot build wheels offline (no `wheel` package)")
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("compress-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["compress"]
        entry_points = archive.read(top_level.replace("top_level.txt", "entry_points.txt")).decode()
    assert "compress = compress.cli.main:main" in entry_points
    for path in ("compress/cli/main.py", "compress/compressors/gptq.py", "compress/evaluators/tasks/piqa.py",
                 "compress/recipes/demo.yaml", "compress/recipes/demo/model/model.safetensors",
                 "compress/report/report.schema.json", "compress/app/builtins.py"):
        assert path in names, path
    assert not any(n.split("/")[0] in {"cli", "compressors", "evaluators", "recipes"} for n in names)
