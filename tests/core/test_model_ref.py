"""`model:` strings: a local folder, a hub id, or a path that is not there (exit 2 naming it), decided up front."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compress.recipe.errors import RecipeError, UserError
from compress.recipe.schema import load_recipe


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "demo").mkdir()
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "weights.bin").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("ref", ["./nope", "../nope", "nope/", "demo/model", "a/b/c", "my model", "models/tiny/x"])
def test_a_path_that_is_not_there_is_an_error_naming_the_resolved_path(folder, ref):
    from compress.recipe.model_ref import ModelRefError, resolve_model_ref

    with pytest.raises(ModelRefError, match=re.escape("model folder not found: " + str((folder / ref).resolve()))):
        resolve_model_ref(ref, folder)


@pytest.mark.parametrize("ref", ["meta-llama/Llama-3.2-1B", "gpt2", "Qwen/Qwen2.5-0.5B", "org/model.v2"])
def test_hub_ids_stay_hub_ids_and_remember_where_a_folder_was_sought(folder, ref):
    from compress.recipe.model_ref import resolve_model_ref

    model = resolve_model_ref(ref, folder)
    assert model.hub_id == ref and model.folder is None and model.local == (folder / ref).resolve()
    assert model.resolved == ref


def test_a_folder_wins_over_a_hub_id_and_a_file_is_refused(folder):
    from compress.recipe.model_ref import ModelRefError, resolve_model_ref

    assert resolve_model_ref("models/tiny", folder).resolved == str(folder / "models" / "tiny")
    with pytest.raises(ModelRefError, match="is a file, not a folder"):
        resolve_model_ref("weights.bin", folder)


def test_offline_a_hub_id_missing_from_the_cache_says_both_readings(folder):
    from compress.recipe.model_ref import offline_hub_problem, resolve_model_ref

    model = resolve_model_ref("nobody-here/no-such-model", folder)  # conftest sets HF_HUB_OFFLINE=1
    problem = offline_hub_problem(model)
    assert problem is not None
    assert str(folder / "nobody-here" / "no-such-model") in problem and "HF_HUB_OFFLINE=1" in problem


def test_recipe_model_path_that_is_not_there_is_a_located_recipe_error(folder):
    # what `compress recipes show demo > my.yaml` gave before its paths were absolute: demo/ beside it, no model
    recipe = folder / "my.yaml"
    recipe.write_text("model: demo/model\npasses: [rtn]\n", encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert f"my.yaml:1 model: model folder not found: {folder / 'demo' / 'model'}" in str(caught.value)


def test_offline_load_of_a_missing_hub_id_fails_before_transformers(folder, monkeypatch):
    """No network attempt, no retries: the cache is asked, and the message names the folder sought too."""
    from compress.engine import model_io

    def no_transformers(*args, **kwargs):
        raise AssertionError("transformers was asked for a model the cache cannot have")

    monkeypatch.setattr(model_io, "read_config", no_transformers)
    with pytest.raises(UserError) as caught:
        model_io.load_model("demo/model", local_candidate=folder / "demo" / "model")
    assert "neither a local folder (not found: " + str(folder / "demo" / "model") in str(caught.value)
