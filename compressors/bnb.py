"""bitsandbytes quantization (LLM.int8() or 4-bit NF4/FP4), done by transformers' own bitsandbytes integration.

The model is saved to a temporary folder and reloaded with a `BitsAndBytesConfig`, so the result is exactly
what `from_pretrained(..., quantization_config=...)` builds, evaluates through the same evaluators, and
saves in transformers' bitsandbytes serialization (`export: {format: bitsandbytes}`).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch

from compress.engine.context import RunContext
from compress.recipe.errors import UserError
from compress.engine.model_io import DTYPES, ModelHandle
from compress.recipe.registry import StrictConfig
from compress.compressors.configs import BnbConfig  # noqa: F401  (re-exported; defined without torch)

BITS = {"int8": 8, "nf4": 4, "fp4": 4}
BNB_4BIT_BLOCK = 64  # transformers' default bnb_4bit blocksize


def bnb_quantization_config(cfg: BnbConfig, model_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if cfg.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.int8_threshold,
                                  llm_int8_skip_modules=cfg.ignore)
    compute = model_dtype if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.mode, bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=cfg.ignore)


def run_bnb(handle: ModelHandle, cfg: BnbConfig, run: RunContext,
            next_quantizer: StrictConfig | None = None) -> dict[str, Any]:
    """Quantize every linear (but `ignore`) with bitsandbytes: LLM.int8() or 4-bit NF4/FP4."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("the bnb pass needs bitsandbytes: pip install 'compress[bnb]' (or pip install bitsandbytes)")
    from transformers import AutoModelForCausalLM

    source: Any = handle.model  # a transformers PreTrainedModel
    dtype = next(source.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="compress-bnb-") as folder:
        source.save_pretrained(folder)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                Path(folder), quantization_config=bnb_quantization_config(cfg, dtype), dtype=dtype,
                device_map={"": str(handle.device)},
            )
            _smoke_forward(model, handle.device)
        except (RuntimeError, ValueError, ImportError, NotImplementedError) as exc:
            raise UserError(f"bitsandbytes {cfg.mode} does not run on {handle.device} here "
                            f"(bitsandbytes {_bnb_version()}, {_root_cause(exc)}).{_block_hint(source, cfg)} "
                            "CPU support needs bitsandbytes >= 0.48") from exc
    model.eval()
    model.config.use_cache = False
    handle.model = model
    return {name: {"mode": cfg.mode, "bits": BITS[cfg.mode], "double_quant": cfg.double_quant}
            for name, module in model.named_modules() if type(module).__module__.startswith("bitsandbytes")}


def _bnb_version() -> str:
    from importlib.metadata import version

    return version("bitsandbytes")


def _root_cause(exc: BaseException) -> str:
    """transformers wraps a failed weight conversion in a generic error; the first exception says what broke."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {exc}"


def _block_hint(model: Any, cfg: BnbConfig) -> str:
    """Name the linears a 4-bit block cannot tile: some releases (0.48 and 0.49 on CPU) refuse them, later ones not.

    Only a hint beside the real exception: what runs is decided by trying, never by a version number.
    """
    if cfg.mode == "int8":
        return ""
    odd = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
           and module.in_features % BNB_4BIT_BLOCK and not any(part in name for part in cfg.ignore)]
    if not odd:
        return ""
    return (f" {len(odd)} linears have an input width that is not a multiple of the {BNB_4BIT_BLOCK}-value 4-bit "
            f"block ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}), which some releases cannot quantize "
            "on this device.")


def _smoke_forward(model: Any, device: torch.device) -> None:
    """Fail here, with the pass's clear message, rather than inside the first evaluation."""
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long, device=device), use_cache=False)
