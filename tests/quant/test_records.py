"""Weight records: the uniform-affine record against the behaviour it replaced, and a record defined here, outside the
package (HQQ-style float zero points), going end to end through `run_recipe` without a change anywhere else.

The float-zero-point pass, its record class and their registrations live in this module only: evaluation, the
report's size, --resume checkpoints, run state and dense export work through the record protocol, and the integer
layouts (compressed-tensors, GPTQ) refuse it instead of rounding its zero points.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from compress.app.runner import run_recipe
from compress.compressors.base import write_back
from compress.engine.checkpoint import Checkpointer
from compress.engine.layer_sweep import LayerContext
from compress.export import export_run, load_state
from compress.export.compressed_tensors_format import holdable
from compress.quant.modules import DEFAULT_IGNORE, weight_matrix
from compress.quant.primitives import PerChannel, PerGroup, QuantSpec, dequantize_codes, group_bounds
from compress.quant.records import (
    StorageBits,
    UniformAffine,
    WeightRecord,
    quantize_rtn,
    register_record,
    restore_record,
    saved_form,
)
from compress.recipe.errors import RecipeError, UserError
from compress.recipe.registry import StrictConfig, register_pass
from compress.recipe.schema import parse_recipe
from compress.recipe.storage import FLOAT_ZERO_POINT, INTEGER_CODES, SCALES
from tests.conftest import recipe_text

# ---------------------------------------------------------------------------------------------------
# A record and a pass from outside the package


@register_record
@dataclass
class FloatZeroAffine(WeightRecord):
    """Unsigned codes, one float32 scale and one *float* zero point per row (HQQ-style): (code - zero) * scale."""

    kind: ClassVar[str] = "test_float_zero_affine"

    codes: torch.Tensor  # uint8 (out, in)
    scale: torch.Tensor  # (out, 1)
    zero: torch.Tensor  # (out, 1), not rounded
    bits: int

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int) -> FloatZeroAffine:
        w = w.float()
        low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
        zero = -low / scale  # the float zero point an integer layout would have to round
        codes = torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1).to(torch.uint8)
        return cls(codes, scale, zero, bits)

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.codes.shape
        return rows, columns

    @property
    def stores(self) -> frozenset[str]:
        return frozenset({INTEGER_CODES, SCALES, FLOAT_ZERO_POINT})

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() - self.zero) * self.scale

    def storage_bits(self) -> StorageBits:
        rows, columns = self.shape
        return StorageBits(codes=rows * columns * self.bits, scales=rows * 16, zero_points=rows * 16)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero}

    def metadata(self) -> dict[str, Any]:
        return {"bits": self.bits}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> FloatZeroAffine:
        return cls(tensors["codes"], tensors["scale"], tensors["zero"], int(metadata["bits"]))

    def to(self, device: torch.device | str) -> FloatZeroAffine:
        return FloatZeroAffine(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.bits)

    def keep_zeros(self, mask: torch.Tensor) -> FloatZeroAffine:
        raise ValueError("integer codes around a float zero point cannot represent an exact 0")

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "zero_point": "float"}


class FloatZeroConfig(StrictConfig):
    bits: int = 4


def run_float_zero(layer: LayerContext, cfg: FloatZeroConfig) -> dict[str, Any]:
    """Data-free per-row asymmetric quantization with float zero points."""
    return {fqn: write_back(fqn, module, FloatZeroAffine.quantize(weight_matrix(module), cfg.bits), layer.run)
            for fqn, module in layer.linears(DEFAULT_IGNORE).items()}


register_pass("test_float_zero", FloatZeroConfig, scope="layer", kind="quantize")(run_float_zero)
# The same pass declaring what it stores, so a recipe exporting to an integer layout is refused at load.
register_pass("test_float_zero_declared", FloatZeroConfig, scope="layer", kind="quantize",
              stores={INTEGER_CODES, SCALES, FLOAT_ZERO_POINT})(run_float_zero)


# ---------------------------------------------------------------------------------------------------
# The uniform-affine record against the behaviour it replaced

SPECS = [QuantSpec(4, True, PerGroup(16)), QuantSpec(3, False, PerGroup(24)), QuantSpec(8, True, PerChannel()),
         QuantSpec(2, False, PerChannel())]


def uniform(spec: QuantSpec, rows: int = 12, columns: int = 100) -> UniformAffine:
    torch.manual_seed(spec.bits)
    return quantize_rtn(torch.randn(rows, columns) * torch.rand(rows, 1), spec)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_uniform_dequantize_is_code_minus_zero_times_scale_per_group(spec):
    record = uniform(spec)
    expected = torch.cat([dequantize_codes(record.codes[:, start:end], record.scale[:, g], record.zero[:, g])
                          for g, (start, end) in enumerate(group_bounds(100, spec))], dim=1)
    assert torch.equal(record.dequantize(), expected)
    assert record.dequantize().dtype == torch.float32 and record.shape == (12, 100)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_uniform_storage_bits_are_the_former_count_itemised(spec):
    record = uniform(spec)
    groups = len(group_bounds(100, spec))
    zero_bits = 0 if spec.symmetric else spec.bits
    # The former `storage_bits(rows, columns, spec)`: codes plus a 16-bit scale (and a zero point) per row and group.
    assert record.storage_bits().total == 12 * 100 * spec.bits + 12 * groups * (16 + zero_bits)
    assert record.storage_bits() == StorageBits(codes=12 * 100 * spec.bits, scales=12 * groups * 16,
                                                zero_points=12 * groups * zero_bits)
    assert UniformAffine.planned_bits(12, 100, spec) == record.storage_bits()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_uniform_round_trips_through_its_saved_form(spec):
    record = uniform(spec)
    tensors, entry = saved_form(record)
    assert set(tensors) == {"codes", "scale", "zero"}  # the run-state and checkpoint tensor names of before
    assert entry == json.loads(json.dumps(entry)) and entry["kind"] == "uniform_affine"
    restored = restore_record(entry, tensors.__getitem__)
    assert isinstance(restored, UniformAffine) and restored.spec == spec
    assert all(torch.equal(restored.to_tensors()[k], tensors[k]) for k in tensors)


def test_a_bare_spec_saved_before_record_kinds_restores_as_uniform_affine():
    record = uniform(SPECS[1])
    restored = restore_record(record.spec.describe(), record.to_tensors().__getitem__)
    assert isinstance(restored, UniformAffine) and restored.spec == record.spec
    assert torch.equal(restored.dequantize(), record.dequantize())


def test_uniform_sheds_to_meta_keeping_shape_bits_and_settings():
    record = uniform(SPECS[0])
    shed = record.to("meta")
    assert all(t.device.type == "meta" for t in shed.to_tensors().values())
    assert shed.shape == record.shape and shed.storage_bits() == record.storage_bits()
    assert shed.describe() == record.describe() == {"bits": 4, "symmetric": True, "group_size": 16}


@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_keep_zeros_sets_pruned_codes_to_the_zero_point(symmetric):
    record = uniform(QuantSpec(3, symmetric, PerGroup(16)))
    mask = torch.rand(12, 100) > 0.5
    kept = record.keep_zeros(mask)
    assert torch.all(kept.dequantize()[~mask] == 0)
    assert torch.equal(kept.dequantize()[mask], record.dequantize()[mask])


def test_uniform_stores_zero_points_only_when_asymmetric():
    assert "integer zero points" not in uniform(SPECS[0]).stores
    assert "integer zero points" in uniform(SPECS[1]).stores


def test_restoring_an_unregistered_kind_names_it():
    with pytest.raises(UserError, match="record kind 'no_such_kind'"):
        restore_record({"kind": "no_such_kind", "tensors": [], "metadata": {}}, {}.__getitem__)


def test_a_kind_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_record(type("Impostor", (FloatZeroAffine,), {"kind": UniformAffine.kind}))


# ---------------------------------------------------------------------------------------------------
# The float-zero-point record, end to end


def test_float_zero_record_round_trips_and_the_integer_layouts_refuse_it():
    record = FloatZeroAffine.quantize(torch.randn(8, 32), 4)
    assert not torch.equal(record.zero, record.zero.round())  # a real float zero point
    tensors, entry = saved_form(record)
    restored = restore_record(entry, tensors.__getitem__)
    assert isinstance(restored, FloatZeroAffine) and torch.equal(restored.dequantize(), record.dequantize())
    with pytest.raises(UserError, match=r"compressed-tensors pack-quantized cannot hold a float zero point \(m\)"):
        holdable({"m": record}, {})


@pytest.fixture(scope="module")
def float_zero_run(tiny_llama, text_file, tmp_path_factory):
    """A run of the float-zero pass whose checkpoints are kept, and the report of a run resumed from them."""
    out = tmp_path_factory.mktemp("float-zero")
    recipe = parse_recipe(recipe_text(tiny_llama, text_file, "  - test_float_zero: {bits: 4}", text_file))
    remove = Checkpointer.remove
    Checkpointer.remove = lambda self: None  # keep every layer's checkpoint, as an interrupted run would
    try:
        report = run_recipe(recipe, out / "run")
    finally:
        Checkpointer.remove = remove
    resumed = run_recipe(recipe, out / "run", resume=True, overwrite=True)  # every layer restored, none recomputed
    return out / "run", report, resumed


def test_float_zero_run_evaluates_and_counts_its_bits(float_zero_run):
    run_dir, report, _ = float_zero_run
    state = load_state(run_dir / "state")
    assert state.quantized and all(isinstance(r, FloatZeroAffine) for r in state.quantized.values())
    bits = sum(r.storage_bits().total for r in state.quantized.values())
    weights = sum(r.shape[0] * r.shape[1] for r in state.quantized.values())
    assert report["size"]["quantized_parameters"] == weights
    assert report["size"]["quantized_bits_per_weight"] == round(bits / weights, 4)
    assert all(m["compressed"] > 0 for m in report["metrics"]["perplexity"].values())
    entry = report["passes"][0]["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry["zero_point"] == "float" and entry["weight_rel_error"] > 0


def test_float_zero_run_resumes_from_its_checkpoints_bit_identically(float_zero_run):
    run_dir, report, resumed = float_zero_run
    assert "resuming" in (run_dir / "run.log").read_text()
    assert resumed["weights_sha256"] == report["weights_sha256"]
    assert resumed["size"] == report["size"] and resumed["metrics"] == report["metrics"]


def test_float_zero_run_exports_dense_dequantized(float_zero_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, _, _ = float_zero_run
    export_run(run_dir, "dense", tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    state = load_state(run_dir / "state")
    for fqn, record in state.quantized.items():
        torch.testing.assert_close(loaded.get_submodule(fqn).weight.float(), record.dequantize(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("fmt,layout", [("compressed-tensors", "compressed-tensors pack-quantized"),
                                        ("gptq", "the GPTQ layout")])
def test_integer_layouts_refuse_float_zero_points_and_write_nothing(float_zero_run, tmp_path, fmt, layout):
    run_dir, _, _ = float_zero_run
    with pytest.raises(UserError) as caught:
        export_run(run_dir, fmt, tmp_path / "out")
    assert f"{layout} cannot hold a float zero point (model.layers.0.self_attn.q_proj, and " in str(caught.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_recipe_exporting_float_zero_points_to_compressed_tensors_fails_naming_the_module(tiny_llama, text_file,
                                                                                           tmp_path):
    text = recipe_text(tiny_llama, text_file, "  - test_float_zero: {bits: 4}", text_file)
    recipe = parse_recipe(text + "export: {format: compressed-tensors}\n")  # undeclared: the writer is the check
    with pytest.raises(UserError, match=r"compressed-tensors pack-quantized cannot hold a float zero point "
                                        r"\(model\.layers\.0\.self_attn\.q_proj"):
        run_recipe(recipe, tmp_path / "run", checkpoints=False)
    assert not (tmp_path / "run").exists()


def test_a_pass_declaring_float_zero_points_is_refused_at_load(tiny_llama, text_file):
    text = recipe_text(tiny_llama, text_file, "  - test_float_zero_declared: {bits: 4}", text_file)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text + "export: {format: gptq}\n")
    assert "the test_float_zero_declared pass produces a float zero point, which only the 'dense' format saves " \
           "(got 'gptq')" in str(caught.value) and "export.format" in str(caught.value)
    parse_recipe(text + "export: {format: dense}\n")  # dense writes any record dequantized
