"""rotate: randomised Hadamard rotations fused into the weights leave every rotatable family's function unchanged,
refuse the others by name, survive a resume bit for bit, and export as a plain checkpoint transformers reloads."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compress.cli.main import app
from compress.engine.checkpoint import FAULT_ENV
from compress.engine.model_io import find_decoder_layers
from compress.engine.moe import unfuse_experts
from compress.quant.primitives import PerGroup, QuantSpec
from compress.quant.records import quantize_rtn
from compress.recipe.errors import UserError
from compress.recipe.schema import parse_recipe
from compress.compressors.rotate import LAYOUTS, REFUSED, RotateConfig, hadamard_matrix, rotate_model, rotation_matrix
from tests.conftest import DEMO_DIR, DEMO_MODEL, requires_demo_model
from tests.tiny_models import FAMILY_CONFIGS, tiny_config


# First in the file: after other in-process CLI runs of this module the injected Ctrl-C did not stop the run
# (exit 0, seen twice under load; passes alone); the cause is not found yet, see the rotate report.
def test_a_killed_rotate_then_gptq_run_resumes_bit_identically_and_exports_compressed_tensors(
        tiny_llama, text_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "recipe.yaml"  # no evaluation: the weights' digest is the comparison
    recipe.write_text(f"model: {tiny_llama}\ncalibration: {{dataset: {text_file}, samples: 4, seq_len: 32, seed: 0}}\n"
                      "passes:\n  - rotate: {seed: 5}\n  - gptq: {bits: 4, group_size: 32}\n"
                      "export: {format: compressed-tensors}\n")
    straight = _run(recipe, "--output", str(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    monkeypatch.setenv(FAULT_ENV, "0:INT")  # Ctrl-C right after layer 0's checkpoint
    assert _run(recipe, "--output", str(tmp_path / "resumed")).exit_code == 130
    monkeypatch.delenv(FAULT_ENV)
    resumed = _run(recipe, "--output", str(tmp_path / "resumed"), "--resume")
    assert resumed.exit_code == 0, resumed.output
    reference, again = json.loads(straight.stdout), json.loads(resumed.stdout)
    assert again["weights_sha256"] == reference["weights_sha256"]
    assert "resuming at decoder layer 1 of 2" in (tmp_path / "resumed" / "run.log").read_text()
    # a plain compressed-tensors checkpoint: transformers loads it with no code of ours, computing what we evaluated
    from compress.export.state import load_state

    in_memory = load_state(tmp_path / "straight" / "state").model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "export-compressed-tensors",
                                                    dtype=torch.float32)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = in_memory(ids).logits, reloaded(ids).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("size", [1, 2, 64, 12, 96, 20, 896])  # 96 = 8 x 12, 896 = 4 x 224 (Paley, q = 223)
def test_hadamard_matrices_are_orthogonal_with_equal_magnitudes(size):
    h = hadamard_matrix(size)
    torch.testing.assert_close(h @ h.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h.abs(), torch.full((size, size), size ** -0.5, dtype=torch.float64))


def test_a_size_without_a_known_hadamard_matrix_is_refused_by_size():
    with pytest.raises(ValueError, match="size 36"):
        hadamard_matrix(36)


def _float64_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=320)).double().eval()
    for name, parameter in model.named_parameters():
        if "norm" in name and parameter.dim() == 1:  # gains other than 1, so folding them is exercised
            parameter.data.uniform_(0.5, 1.5)
    unfuse_experts(model)  # as load_model does
    return model


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_family_computes_the_same_logits_rotated_or_is_refused_by_name(family):
    model = _float64_model(family)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    embedding = model.get_input_embeddings().weight.detach().clone()
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        assert model_type in REFUSED
        with pytest.raises(UserError, match=f"model_type '{model_type}' cannot be rotated"):
            rotate_model(model, find_decoder_layers(model), RotateConfig(untie_embeddings=True))
        return
    rotate_model(model, find_decoder_layers(model), RotateConfig(seed=3, untie_embeddings=True))
    with torch.no_grad():
        after = model(ids, use_cache=False).logits
    assert (model.get_input_embeddings().weight - embedding).abs().max() > 0.01  # really rotated
    # float64 weights; RMSNorm computes in float32 inside, hence 1e-6 rather than 1e-12
    assert (after - before).abs().max() <= 1e-6 * before.abs().max()


def test_the_seed_draws_the_signs_and_the_same_seed_the_same_weights():
    def rotated_embedding(seed: int) -> torch.Tensor:
        model = _float64_model("llama")
        rotate_model(model, "model.layers", RotateConfig(seed=seed))
        return model.get_input_embeddings().weight.detach()

    first = rotated_embedding(7)
    assert torch.equal(first, rotated_embedding(7)) and not torch.equal(first, rotated_embedding(8))


def test_rotation_spreads_outlier_columns_so_rtn_loses_less():
    # A weight whose few input columns are 20x the rest (what residual-stream outliers leave in q/k/v, gate/up):
    # one scale per group of 128 spends its range on them. Rotated, every column has the same spread.
    torch.manual_seed(0)
    weight = torch.randn(256, 512, dtype=torch.float64)
    weight[:, :4] *= 20
    rotation = rotation_matrix(512, torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, granularity=PerGroup(128))

    def rtn_error(w: torch.Tensor) -> float:
        return ((quantize_rtn(w.float(), spec).dequantize().double() - w).norm() / w.norm()).item()

    # ||(W Q - q(W Q))|| is the error of the same function (Q orthogonal), so the two numbers compare directly
    plain, rotated = rtn_error(weight), rtn_error(weight @ rotation)
    assert rotated < 0.75 * plain, (plain, rotated)  # measured 0.295 plain, 0.199 rotated


def test_rotate_after_a_pruning_pass_is_refused_at_its_line():
    text = "calibration: {dataset: calib.txt, samples: 2, seq_len: 32}\npasses:\n  - magnitude: {sparsity: 0.5}\n" \
           "  - rotate: {seed: 0}\n"
    with pytest.raises(UserError, match=r"recipe.yaml:4 passes\[1\].rotate: 'rotate' must come before 'magnitude'"):
        parse_recipe(text, filename="recipe.yaml", base_dir=DEMO_DIR)


def _run(recipe, *args: str):
    return CliRunner().invoke(app, ["run", str(recipe), "--json", *args])


@requires_demo_model()
def test_a_tied_head_is_refused_unless_untied_and_the_dense_export_reloads_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    def recipe(untie: str) -> object:
        path = tmp_path / f"untie-{untie}.yaml"
        path.write_text(f"model: {DEMO_MODEL}\npasses:\n  - rotate: {{seed: 0{untie}}}\n"
                        "export: {format: dense, dtype: float32}\n", encoding="utf-8")
        return path

    refused = _run(recipe(""), "--output", str(tmp_path / "refused"))
    assert refused.exit_code == 2 and "untie_embeddings: true" in refused.output and "2,097,152 more bytes" in refused.output
    done = _run(recipe(", untie_embeddings: true"), "--output", str(tmp_path / "run"))
    assert done.exit_code == 0, done.output
    entry = json.loads(done.stdout)["passes"][0]["modules"]["model.layers"]
    assert entry["untied_head_bytes"] == 4096 * 256 * 2 and entry["max_orthogonality_error"] < 1e-12
    original = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export-dense", dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(ids).logits, reloaded(ids).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_family_that_cannot_be_rotated_exits_2_naming_it(tmp_path):
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "gemma2", "gemma2")
    (tmp_path / "recipe.yaml").write_text(f"model: {model}\npasses:\n  - rotate: {{seed: 0}}\n")
    result = _run(tmp_path / "recipe.yaml", "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "model_type 'gemma2' cannot be rotated exactly" in result.output
    assert "Traceback" not in result.output
