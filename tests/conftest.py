"""Shared fixtures. Everything runs offline: HF_HUB_OFFLINE=1 is set before transformers is imported."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`pytest -n 2`) each worker, and every CLI process it starts, computes on one thread: two
# workers of two threads each on two cores oversubscribe them, and OpenMP's spinning threads then run many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import compress.app.builtins  # noqa: E402,F401  (registers the built-in passes and evaluators)
from tests.tiny_models import save_tiny_model, synthetic_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the repo; COMPRESS_SHARED_DATA points a checkout elsewhere (a git worktree) at it.
SHARED_DATA = Path(os.environ.get("COMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_DIR = REPO / "recipes" / "demo"
DEMO_MODEL = DEMO_DIR / "model"


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """COMPRESS_CACHE_DIR for session fixtures: the suite never reads or writes the user's ~/.cache/compress."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(scope="module", autouse=True)
def _module_cache_dir(tmp_path_factory, _session_cache_dir):
    """A cache folder per test module for its module fixtures (a sweep's trials share one baseline in it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("module-cache")))
        yield


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch, _module_cache_dir) -> Path:
    """A cache folder of the test's own (COMPRESS_CACHE_DIR, inherited by the CLI processes it starts): a test never
    reads a baseline another test cached, whatever the order; the runs inside one test share it."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    return path


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe text into tmp_path/recipe.yaml and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def requires_demo_model():
    return pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").is_file(), reason="demo model not built")


def requires_shared_data(*parts: str):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"needs ../shared/data/{'/'.join(parts)} (present in CI, not in a user's fresh clone)")


def recipe_text(model: Path, calibration: Path, passes: str, evaluate: Path, *, samples: int = 4, seq_len: int = 32,
                max_windows: int = 4) -> str:
    """A recipe for tests: `passes` is the YAML list body ("  - rtn: {...}" lines)."""
    return f"""
model: {model}
calibration: {{dataset: {calibration}, samples: {samples}, seq_len: {seq_len}, seed: 0}}
passes:
{passes}
evaluate:
  perplexity: [{{dataset: {evaluate}, seq_len: {seq_len}, max_windows: {max_windows}}}]
"""
