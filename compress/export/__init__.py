"""Saving compressed models in formats real runtimes load, and reading them back for `compress inspect`.

One module per format (compressed_tensors_format, gptq_format, dense, bnb_format, gguf_format), each a function
`write_<format>(compressed, folder, dtype) -> details`; `export_checkpoint` picks one, writes into a hidden
sibling folder and renames it into place, so an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from compress.recipe.errors import UserError
from compress.recipe.export_config import FORMATS, ExportConfig, format_problems
from compress.export.state import CompressedModel, load_state, save_state
from compress.engine.output import atomic_output, check_output_target, named_paths, preflight_output, writing

__all__ = ["ExportConfig", "CompressedModel", "export_checkpoint", "format_problems", "load_state", "save_state"]

Writer = Callable[[CompressedModel, Path, str], dict[str, Any]]


def _writers() -> dict[str, Writer]:
    from compress.export.bnb_format import write_bitsandbytes
    from compress.export.compressed_tensors_format import write_compressed_tensors
    from compress.export.dense import write_dense
    from compress.export.gguf_format import write_gguf
    from compress.export.gptq_format import write_gptq

    return {"compressed-tensors": write_compressed_tensors, "gptq": write_gptq, "dense": write_dense,
            "bitsandbytes": write_bitsandbytes, "gguf": write_gguf}


def export_checkpoint(
    compressed: CompressedModel,
    fmt: str,
    target: Path,
    *,
    dtype: str = "auto",
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
    label: str = "export path",
) -> dict[str, Any]:
    """Write `compressed` as a `fmt` checkpoint at `target` (atomically) with a model card; returns its summary.

    `target` is replaced (with `overwrite`) only if it is an earlier output of this tool and holds none of `inputs`;
    a full or read-only disk is a UserError naming `label` and `target` (compress/engine/output.py).
    """
    from compress.export.card import model_card

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if compressed.bitsandbytes != (fmt == "bitsandbytes"):
        raise UserError("a model quantized by the bnb pass is saved only with --format bitsandbytes, and that format "
                        "needs one" if compressed.bitsandbytes else "format 'bitsandbytes' needs a run with the bnb pass")
    with writing(target, label), \
            atomic_output(target, overwrite=overwrite, inputs=inputs, label=label, kind="export") as staging:
        details = _write(compressed, fmt, staging, dtype, target)
        (staging / "README.md").write_text(model_card(fmt, str(target), report, details), encoding="utf-8")
        if report is not None:
            (staging / "compress_report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return {"format": fmt, "path": str(target.resolve()), **written_sizes(target), **details}


def _write(compressed: CompressedModel, fmt: str, staging: Path, dtype: str, target: Path) -> dict[str, Any]:
    """The format's writer; low-rank corrections (lorc) go beside a quantized base as a PEFT adapter, except in
    dense, which writes every record dequantized and so folds them in."""
    from compress.export.adapters import ADAPTER_DIR, split_low_rank, write_peft_adapter
    from compress.recipe.storage import LOW_RANK, unheld

    # dense holds any record (dequantized); gguf has no place for the factors, and its writer refuses them
    keeps_factors = fmt != "dense" and not unheld([LOW_RANK], fmt)
    base, corrected = split_low_rank(compressed) if keeps_factors else (compressed, {})
    details = _writers()[fmt](base, staging, dtype)
    if corrected:
        details["adapter"] = write_peft_adapter(corrected, staging / ADAPTER_DIR, str(target.resolve()))
    return details


def written_sizes(folder: Path) -> dict[str, Any]:
    if (folder / "model.gguf").is_file():  # one GGUF file, no safetensors headers to itemise
        files = sorted(p for p in folder.iterdir() if p.is_file())
        return {"bytes": sum(p.stat().st_size for p in files), "weights_bytes": (folder / "model.gguf").stat().st_size}
    return _safetensors_sizes(folder)


def _safetensors_sizes(folder: Path) -> dict[str, Any]:
    """Bytes of a written checkpoint: all files, the safetensors files, and what `compress inspect` reads from their
    headers: the tensors less the itemised overhead, and bits per weight (the run report's own measures)."""
    from compress.export.inspect import inspect_checkpoint

    files = sorted(p for p in folder.iterdir() if p.is_file())
    summary = inspect_checkpoint(folder, sparsity=False)
    stored = {key: summary.totals[key] for key in ("bytes", "bits_per_weight", "quantized_bits_per_weight")}
    return {"bytes": sum(p.stat().st_size for p in files),
            "weights_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
            "stored": {**stored, "overhead": summary.overhead}}


STATE_DIR = "state"


# Formats whose writers pack nn.Linear weights only (compressed_tensors_format.module_tensors, gptq_format).
LINEAR_ONLY_FORMATS = frozenset({"compressed-tensors", "gptq"})


def refuse_unpackable_layers(layers: Any, layers_prefix: str, export: ExportConfig | None) -> None:
    """Right after the load: a format that packs only nn.Linear cannot hold GPT-2's Conv1D layers, so say so before
    the passes run instead of failing when the export is written at the end."""
    if export is None or export.format not in LINEAR_ONLY_FORMATS:
        return
    from transformers.pytorch_utils import Conv1D

    conv = [f"{layers_prefix}.{name}" for name, module in layers.named_modules() if isinstance(module, Conv1D)]
    if conv:
        raise UserError(f"export format {export.format} packs nn.Linear weights only, and this model's decoder layers "
                        f"hold {len(conv)} Conv1D modules (GPT-2 style: {', '.join(conv[:3])}, ...): use "
                        "`export: {format: dense}`, or leave export out and run `compress export RUN_DIR` later")


def holds_bitsandbytes(model: Any) -> bool:
    return any(type(module).__module__.startswith("bitsandbytes") for module in model.modules())


def save_run_outputs(handle: Any, run: Any, export: ExportConfig | None, report: dict[str, Any], staging: Path,
                     output: Path, *, overwrite: bool = False, inputs: Iterable[Path] = (),
                     label: str = "export.path") -> dict[str, Any] | None:
    """At the end of `compress run`: keep the compressed state in RUN_DIR/state and export if the recipe asks.

    `staging` is the run folder being built, `output` the name it gets when the run finishes; an export
    without a `path` goes inside the run folder, so it appears (or not) together with the run. An export.path
    follows the run's `overwrite` and never replaces one of the run's `inputs` (`label` names it in messages).
    """
    compressed = CompressedModel(handle.model, handle.tokenizer, handle.checkpoint_dtype, run.results.records, run.handoff.masks,
                                 run.results.activation_quant, run.results.kv_cache,
                                 bitsandbytes=holds_bitsandbytes(handle.model))
    save_state(compressed, staging / STATE_DIR)
    if export is None:
        return None
    default_name = f"export-{export.format}"
    target = Path(export.path) if export.path else staging / default_name
    summary = export_checkpoint(compressed, export.format, target, dtype=export.dtype, report=report,
                                overwrite=overwrite and export.path is not None, inputs=inputs,
                                label=label if export.path else "export")
    if export.path is None:
        summary["path"] = str((output / default_name).resolve())
    return summary


def finish_streamed_export(folder: Path, export: ExportConfig, report: dict[str, Any], details: dict[str, Any],
                           output: Path) -> dict[str, Any]:
    """Model card and summary for a checkpoint a lazy run wrote layer by layer into `folder` (still staging)."""
    from compress.export.card import model_card

    target = Path(export.path) if export.path else output / f"export-{export.format}"
    (folder / "README.md").write_text(model_card(export.format, str(target), report, details), encoding="utf-8")
    (folder / "compress_report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return {"format": export.format, "path": str(target.resolve()), **written_sizes(folder), **details}


def export_run(run_dir: Path, fmt: str, target: Path, *, dtype: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """`compress export RUN_DIR`: write a checkpoint from the state a finished run kept."""
    state = run_dir / STATE_DIR
    report_path = run_dir / "report.json"
    if not state.is_dir() and report_path.is_file() and json.loads(report_path.read_text(encoding="utf-8")).get(
            "recipe", {}).get("lazy"):
        raise UserError(f"{run_dir} is a `lazy: true` run: it keeps no codes to export afterwards; add "
                        "`export: {format: compressed-tensors}` to the recipe, which packs each layer as it finishes")
    if not state.is_dir():
        raise UserError(f"{run_dir} has no {STATE_DIR}/ folder: export works on a finished `compress run` output "
                        "folder (runs keep their compressed state there)")
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
    # Refused before the state is read: an existing or unwritable target, or one that is (or holds) the run itself
    # or an input of that run (its model, its data).
    inputs = [run_dir, *named_paths(report.get("recipe") if isinstance(report, dict) else None)]
    check_output_target(target, overwrite, inputs=inputs, label="--output")
    preflight_output(target, label="--output")
    return export_checkpoint(load_state(state), fmt, target, dtype=dtype, report=report, overwrite=overwrite,
                             inputs=inputs, label="--output")
