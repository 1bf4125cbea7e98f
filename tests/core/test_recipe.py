"""The recipe contract: defaults, path resolution, overrides, and errors that point into the YAML."""

from pathlib import Path

import pytest

from compress.recipe.errors import RecipeError, UserError
from compress.recipe.schema import load_recipe, parse_recipe

VALID = """\
model: tiny
calibration: {dataset: text.txt, samples: 4, seq_len: 32}
passes:
  - rtn: {bits: 4, group_size: 128, symmetric: true}
evaluate:
  perplexity: [{dataset: text.txt, seq_len: 32}]
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "text.txt").write_text("hello world " * 50)
    (tmp_path / "tiny").mkdir()
    return tmp_path


def errors_of(text: str, folder: Path, **kwargs) -> list[str]:
    (folder / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(folder / "r.yaml", **kwargs)
    return [issue.render("r.yaml") for issue in info.value.issues]


def test_valid_recipe_fills_defaults_and_resolves_paths(folder):
    (folder / "r.yaml").write_text(VALID)
    recipe = load_recipe(folder / "r.yaml")
    assert recipe.model == str((folder / "tiny").resolve())
    assert recipe.calibration.dataset == str((folder / "text.txt").resolve())
    assert recipe.calibration.seed == 0
    [step] = recipe.passes
    assert (step.name, step.config.bits, step.config.group_size, step.config.ignore) == ("rtn", 4, 128, ["lm_head"])
    assert recipe.evaluations[0].config.dataset == str((folder / "text.txt").resolve())
    assert recipe.to_dict()["passes"][0]["rtn"]["bits"] == 4


def test_hub_ids_and_hub_datasets_are_kept_as_names(folder):
    text = VALID.replace("model: tiny", "model: meta-llama/Llama-3.2-1B").replace("[{dataset: text.txt", "[{dataset: wikitext2")
    recipe = parse_recipe(text, base_dir=folder)
    assert recipe.model == "meta-llama/Llama-3.2-1B"
    assert recipe.evaluations[0].config.dataset == "wikitext2"


def test_wrong_type_names_path_and_line(folder):
    [error] = errors_of(VALID.replace("bits: 4", "bits: four"), folder)
    assert error.startswith("r.yaml:4 passes[0].rtn.bits: expected a valid integer")
    assert "'four'" in error


def test_bits_out_of_range(folder):
    [error] = errors_of(VALID.replace("bits: 4", "bits: 16"), folder)
    assert error == "r.yaml:4 passes[0].rtn.bits: expected less than or equal to 8, got 16"


def test_unknown_pass_suggests_nearest(folder):
    [error] = errors_of(VALID.replace("- rtn:", "- rnt:"), folder)
    assert error.startswith("r.yaml:4 passes[0].rnt: unknown pass 'rnt'. Did you mean: rtn?")
    assert "Available:" in error


def test_typo_key_suggests_nearest(folder):
    [error] = errors_of(VALID.replace("group_size", "grup_size"), folder)
    assert error.startswith("r.yaml:4 passes[0].rtn.grup_size: unknown key 'grup_size'. Did you mean: group_size?")


def test_unknown_top_level_key(folder):
    [error] = errors_of(VALID + "evalute: {}\n", folder)
    assert error.startswith("r.yaml:7 evalute: unknown key 'evalute'. Did you mean: evaluate?")


def test_missing_file_is_an_error_with_line(folder):
    [error] = errors_of(VALID.replace("dataset: text.txt, samples", "dataset: nope.txt, samples"), folder)
    assert error.startswith("r.yaml:2 calibration.dataset: file not found:")
    assert "nope.txt" in error


def test_missing_model_folder(folder):
    [error] = errors_of(VALID.replace("model: tiny", "model: ./missing"), folder)
    assert error.startswith("r.yaml:1 model: model folder not found")


def test_all_errors_are_reported_together(folder):
    text = VALID.replace("bits: 4", "bits: 1").replace("seq_len: 32}\n", "seq_len: 32, extra: 1}\n", 1)
    errors = errors_of(text + "bogus: 1\n", folder)
    assert len(errors) == 3
    assert any("calibration.extra" in e for e in errors)
    assert any("passes[0].rtn.bits" in e for e in errors)
    assert any("bogus" in e for e in errors)


def test_evaluator_errors(folder):
    errors = errors_of(VALID.replace("perplexity: [{dataset: text.txt, seq_len: 32}]", "perplexty: []"), folder)
    [error] = errors
    assert error.startswith("r.yaml:6 evaluate.perplexty: unknown evaluator 'perplexty'. Did you mean: perplexity?")


def test_pass_item_shape(folder):
    [error] = errors_of(VALID.replace("  - rtn: {bits: 4, group_size: 128, symmetric: true}", "  - {rtn: {}, gptq: {}}"), folder)
    assert "passes[0]: expected one {pass-name: {params}} mapping" in error


def test_yaml_syntax_error_has_line(folder):
    [error] = errors_of(VALID.replace("passes:", "passes: [", 1), folder)
    assert "not valid YAML" in error and error.startswith("r.yaml:")


def test_group_size_spellings_for_per_channel(folder):
    for value in ("null", "-1"):
        recipe = parse_recipe(VALID.replace("group_size: 128", f"group_size: {value}"), base_dir=folder)
        assert recipe.passes[0].config.group_size is None
    [error] = errors_of(VALID.replace("group_size: 128", "group_size: 0"), folder)
    assert "passes[0].rtn.group_size" in error and "positive" in error


@pytest.mark.parametrize("key", ["passes[0].rtn.bits", "passes.0.rtn.bits"])
def test_set_overrides(folder, key):
    recipe = parse_recipe(VALID, base_dir=folder, overrides=[f"{key}=3", "calibration.samples=16"])
    assert recipe.passes[0].config.bits == 3
    assert recipe.calibration.samples == 16


def test_bad_override_value_is_marked_as_from_set(folder):
    with pytest.raises(RecipeError) as info:
        parse_recipe(VALID, filename="r.yaml", base_dir=folder, overrides=["passes[0].rtn.bits=12"])
    assert info.value.issues[0].render("r.yaml") == "r.yaml (--set) passes[0].rtn.bits: expected less than or equal to 8, got 12"


def test_malformed_override(folder):
    with pytest.raises(UserError, match="key.path=value"):
        parse_recipe(VALID, base_dir=folder, overrides=["passes[0].rtn.bits"])
    with pytest.raises(UserError, match="out of range"):
        parse_recipe(VALID, base_dir=folder, overrides=["passes[3].rtn.bits=2"])


def test_model_override_beats_recipe(folder):
    recipe = parse_recipe(VALID, base_dir=folder, model="some-org/some-model")
    assert recipe.model == "some-org/some-model"


def test_shorthand_pass_name_uses_defaults(folder):
    recipe = parse_recipe(VALID.replace("  - rtn: {bits: 4, group_size: 128, symmetric: true}", "  - rtn"), base_dir=folder)
    assert recipe.passes[0].config.bits == 4


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_transform_after_quantizer_is_rejected(folder):
    text = VALID.replace("  - rtn: {bits: 4, group_size: 128, symmetric: true}\n",
                         "  - rtn: {bits: 8, group_size: null}\n  - smoothquant: {alpha: 0.5}\n")
    [error] = errors_of(text, folder)
    assert error.startswith("r.yaml:5 passes[1].smoothquant: 'smoothquant' must come before 'rtn' (passes[0]): the "
                            "export saves the quantizer's integer codes")


def test_calibrated_pass_needs_calibration_section(folder):
    text = VALID.replace("calibration: {dataset: text.txt, samples: 4, seq_len: 32}\n", "").replace("- rtn:", "- awq:")
    [error] = errors_of(text, folder)
    assert "passes[0].awq: pass 'awq' needs calibration data: add a `calibration:` section" in error


def with_calibration(keys: str) -> str:
    return VALID.replace("samples: 4, seq_len: 32}", f"samples: 4, seq_len: 32, {keys}}}")


def test_offload_must_be_a_known_place(folder):
    [error] = errors_of(with_calibration("offload: ram"), folder)
    assert error == "r.yaml:2 calibration.offload: expected 'auto', 'device', 'cpu' or 'disk', got 'ram'"


def test_offload_dir_is_only_for_disk_offload(folder):
    [error] = errors_of(with_calibration("offload: cpu, offload_dir: scratch"), folder)
    assert error == ("r.yaml:2 calibration.offload_dir: only `offload: disk` or `auto` writes activations to disk, "
                     "and this recipe sets `offload: cpu`; remove offload_dir or change offload")


def test_offload_defaults_to_auto_and_its_folder_resolves_against_the_recipe(folder):
    assert parse_recipe(VALID, base_dir=folder).calibration.offload == "auto"
    recipe = parse_recipe(with_calibration("offload: disk, offload_dir: scratch"), base_dir=folder)
    assert recipe.calibration.offload_dir == str((folder / "scratch").resolve())
