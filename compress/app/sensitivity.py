"""`compress sensitivity`: the sensitivities an `allocate` pass would compute, as a document to reuse or inspect."""

from __future__ import annotations

from typing import Any

from compress.app.runner import calibration_windows, next_quantizer, positions_needed, run_passes
from compress.compressors.allocate import compute_sensitivities, following_quantizer
from compress.engine.context import RunContext, RunInputs
from compress.engine.model_io import load_model
from compress.engine.progress import SILENT
from compress.recipe.errors import UserError



def recipe_sensitivities(recipe: Any, *, allow_pickle: bool = False, reporter: Any = None) -> dict[str, Any]:
    """Load the recipe's model, apply the passes before its first `allocate`, and return that pass's sensitivities
    (the document `allocate: {sensitivity_file: ...}` reads back), without quantizing anything."""
    position = next((i for i, s in enumerate(recipe.passes) if s.name == "allocate"), None)
    if position is None:
        raise UserError("the recipe has no `allocate` pass whose sensitivities could be computed")
    step = recipe.passes[position]
    if recipe.model is None:
        raise UserError("no model given: set `model:` in the recipe or pass --model")
    handle = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device, allow_pickle=allow_pickle,
                        trust_remote_code=recipe.trust_remote_code, strict_weights=recipe.strict_weights,
                        positions=positions_needed(recipe), local_candidate=recipe.model_local)
    run = RunContext(RunInputs(device=handle.device, calibration=calibration_windows(handle, recipe),
                               reporter=reporter or SILENT))
    if recipe.calibration is not None:
        run.inputs.calibration_batch_size = recipe.calibration.batch_size
    run_passes(handle, recipe.passes[:position], run)
    document = compute_sensitivities(handle, step.config, following_quantizer(next_quantizer(recipe.passes, step)), run)
    document["model"] = recipe.model
    document["candidates"] = step.config.candidates
    return document
