"""`compress recipes show NAME > my.yaml` gives a recipe that runs from any folder, comments kept."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from compress.cli.main import app
from compress.recipe.schema import load_recipe
from compress.recipes import shipped_recipes
from tests.conftest import REPO


def test_every_shipped_recipe_copied_elsewhere_validates_with_its_own_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for shipped in shipped_recipes():
        result = CliRunner().invoke(app, ["recipes", "show", shipped.name])
        assert result.exit_code == 0, result.output
        copy = tmp_path / f"{shipped.name}.yaml"
        copy.write_text(result.stdout, encoding="utf-8")
        recipe = load_recipe(copy)
        assert recipe.model == str(REPO / "recipes" / "demo" / "model"), shipped.name
        assert result.stdout.splitlines()[0] == shipped.path.read_text().splitlines()[0]  # comments kept


def test_only_existing_relative_paths_change_and_odd_characters_are_quoted(tmp_path):
    from compress.recipes import portable_text

    folder = tmp_path / "my data: v1, #2"
    (folder / "m").mkdir(parents=True)
    (folder / "t.txt").write_text("text\n")
    recipe = folder / "r.yaml"
    recipe.write_text("model: m   # mine\ncalibration: {dataset: t.txt, samples: 4}\n"
                      "evaluate:\n  perplexity: [{dataset: wikitext2}]\n  zero_shot: {tasks: [piqa]}\n"
                      "passes: [{rtn: {bits: 4}}]\n", encoding="utf-8")
    text = portable_text(recipe)
    data = yaml.safe_load(text)
    assert data["model"] == str(folder / "m") and data["calibration"]["dataset"] == str(folder / "t.txt")
    assert data["evaluate"] == {"perplexity": [{"dataset": "wikitext2"}], "zero_shot": {"tasks": ["piqa"]}}
    assert "# mine" in text and Path(data["model"]).is_dir()
