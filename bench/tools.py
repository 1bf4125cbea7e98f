"""Running one scheme through each tool on a freshly loaded model, timing only the compression call.

Both tools get the same fp32 model (loaded by our `load_model`), the same calibration windows (samples, seq_len)
in batches of `CALIBRATION_BATCH`, and are scored by the same `perplexity_of` on the returned model.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.engine.context import RunContext, RunInputs
from compress.engine.model_io import ModelHandle, load_model
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_passes
from compress.evaluators.perplexity import perplexity_of

from schemes import Scheme

# Keep the peer's progress bars and INFO logs out of the table; its exceptions still propagate.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")

CALIBRATION_BATCH = 8
EVAL_BATCH = 8


@dataclass
class Outcome:
    """One tool on one scheme. `error` is set (and the numbers are None) when the tool refused or failed."""

    perplexity: float | None = None
    seconds: float | None = None
    error: str | None = None
    checks: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    model_dir: Path
    calibration: torch.Tensor  # (samples, seq_len) int64, shared by both tools
    eval_ids: torch.Tensor  # 1-D token ids of the evaluation text
    seq_len: int
    max_eval_windows: int | None

    def load(self) -> ModelHandle:
        return load_model(str(self.model_dir), dtype="float32", device="cpu")

    def perplexity(self, model: torch.nn.Module) -> float:
        value, _ = perplexity_of(model, self.eval_ids, self.seq_len, EVAL_BATCH, torch.device("cpu"),
                                 self.max_eval_windows)
        return value


def run_ours(scheme: Scheme, setup: Setup, evaluate: bool = True) -> Outcome:
    # The calibration section only satisfies validation; the windows themselves are handed over in RunContext.
    text = f"calibration: {{dataset: calib.txt, samples: {len(setup.calibration)}, seq_len: {setup.seq_len}}}\n"
    recipe = parse_recipe(text + f"passes: {scheme.ours}\n", filename=f"<bench {scheme.key}>",
                          base_dir=setup.model_dir.parent)
    handle = setup.load()
    run = RunContext(RunInputs(device=handle.device, calibration=setup.calibration if scheme.calibrated else None,
                     calibration_batch_size=CALIBRATION_BATCH))
    start = time.perf_counter()
    entries, _ = run_passes(handle, recipe.passes, run)
    seconds = time.perf_counter() - start
    checks = {"fallbacks": len(run.results.fallbacks), "activation_quant_modules": len(run.results.activation_quant)}
    return Outcome(setup.perplexity(handle.model) if evaluate else None, seconds, checks=checks)


def peer_version() -> str | None:
    try:
        from importlib.metadata import version

        import llmcompressor  # noqa: F401  (the import itself is what can fail)

        return version("llmcompressor")
    except Exception:
        return None


def run_peer(scheme: Scheme, setup: Setup, evaluate: bool = True) -> Outcome:
    try:
        from llmcompressor import oneshot
    except Exception as exc:
        return Outcome(error=f"llmcompressor not importable: {type(exc).__name__}: {exc}")
    handle = setup.load()
    reference = _probe_logits(handle.model, setup)
    kwargs = {}
    if scheme.calibrated:
        kwargs = {"dataset": _peer_loader(setup.calibration), "num_calibration_samples": len(setup.calibration),
                  "max_seq_length": setup.seq_len}
    try:
        recipe = scheme.peer()
        start = time.perf_counter()
        model = oneshot(model=handle.model, tokenizer=handle.tokenizer, recipe=recipe, **kwargs)
        seconds = time.perf_counter() - start
    except Exception as exc:  # a refusal (e.g. no GPU) is a result to report, not a crash of the benchmark
        return Outcome(error=_describe(exc))
    if not evaluate:
        return Outcome(seconds=seconds)
    checks = peer_quantization_checks(model, reference, setup)
    return Outcome(setup.perplexity(model), seconds, checks=checks)


def _describe(exc: BaseException) -> str:
    """`Type: first line of the message (raised at package/file.py:line)`, short enough for a table cell."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = "/".join(Path(frame.filename).parts[-3:])
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]} (raised at {where}:{frame.lineno})"


def _peer_loader(windows: torch.Tensor) -> torch.utils.data.DataLoader:
    """The same token windows as ours, as the batches of input_ids a DataLoader gives oneshot (no re-tokenizing)."""
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([row[key] for row in batch]) for key in batch[0]}

    return torch.utils.data.DataLoader(rows, batch_size=CALIBRATION_BATCH, shuffle=False, collate_fn=collate)


@torch.no_grad()
def _probe_logits(model: torch.nn.Module, setup: Setup) -> torch.Tensor:
    return model(setup.eval_ids[: setup.seq_len][None], use_cache=False).logits


@torch.no_grad()
def peer_quantization_checks(model: torch.nn.Module, reference: torch.Tensor, setup: Setup) -> dict[str, object]:
    """Evidence that the model we score computes with quantized weights (and activations, for W8A8).

    - weights_stored_on_grid: every quantized Linear's stored weight equals its own fake-quantization
      (clamp(round(w / s) + z, qmin, qmax) - z) * s with its stored scale s and zero point z
      (GPTQ writes fake-quantized weights; RTN keeps fp weights and quantizes them in forward).
    - forward_uses_grid_weights: on a probe input, each weight-only quantized Linear's forward equals
      F.linear(x, fake-quantized w), i.e. its forward computes with the quantized weights, however they are stored.
    - act_quant_in_forward: an activation-quantized Linear's forward differs from F.linear(x, fake-quantized w),
      which is only true when it fake-quantizes its input (W8A8).
    - logits_max_abs_diff: against the fp model on one eval window.
    """
    stored, forward_ok, act_quant, quantized = True, True, False, 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or not hasattr(module, "weight_scale"):
            continue
        quantized += 1
        w = module.weight.float()
        repeat = -(-w.shape[1] // module.weight_scale.shape[1])  # (rows, groups) -> (rows, columns)
        scale, zero = (t.float().repeat_interleave(repeat, dim=1)[:, : w.shape[1]]
                       for t in (module.weight_scale, module.weight_zero_point))
        bits = module.quantization_scheme.weights.num_bits
        codes = torch.clamp((w / scale).round() + zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)  # signed int codes
        on_grid = (codes - zero) * scale
        stored &= bool(torch.allclose(on_grid, w, atol=1e-5, rtol=1e-4))
        probe = torch.randn(2, 16, w.shape[1]) * 3
        matches = torch.allclose(module(probe), torch.nn.functional.linear(probe, on_grid, module.bias), atol=1e-4, rtol=1e-4)
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.input_activations is not None:
            act_quant |= not matches
        else:
            forward_ok &= matches
    logits = model(setup.eval_ids[: setup.seq_len][None], use_cache=False).logits
    return {"quantized_linears": quantized, "weights_stored_on_grid": stored, "forward_uses_grid_weights": forward_ok,
            "act_quant_in_forward": act_quant, "logits_max_abs_diff": round(float((logits - reference).abs().max()), 4)}
