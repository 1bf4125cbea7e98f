"""The run report: JSON for machines, Markdown and a rich table for people."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import resource
import sys
from pathlib import PurePath
from typing import Any

import torch
from rich.table import Table
from torch import nn

import compress
from compress.engine.damage import MAX_POSITIONS
from compress.engine.digest import shards_digest, weights_digest  # noqa: F401  (re-exported)
from compress.quant import bnb_layout
from compress.quant.bnb_layout import split_name
from compress.quant.modules import is_linear
from compress.quant.records import WeightRecord

REPORT_SCHEMA_VERSION = 1


VERSIONED_PACKAGES = ("transformers", "safetensors", "tokenizers", "accelerate", "pydantic", "numpy", "pyyaml")


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {
        "compress": compress.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "platform": platform.platform(),
    }
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def finite_or_null(value: Any) -> Any:
    """A copy of `value` that strict JSON can hold: every NaN or Inf float becomes None.

    In a mapping, `key: nan` becomes `key: null` plus `key_reason: "not a finite number (nan)"`, so a reader sees
    why the number is missing; in a list the element becomes null. (json.dumps would write bare `NaN`, which
    strict parsers, jq and JavaScript among them, reject.)
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            out[key] = finite_or_null(item)
            if isinstance(item, float) and not math.isfinite(item):
                out[f"{key}_reason"] = f"not a finite number ({item})"
        return out
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak resident memory of this process, and peak CUDA allocation when a GPU was used (since the last reset)."""
    usage = {"cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    if device.type == "cuda":
        usage["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return usage


def _dtype_bits(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 8
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


# The parts a model's size is itemised into: a weight record's (StorageBits), a bitsandbytes module's metadata
# (compress/quant/bnb_layout.py), and every tensor stored as it is.
SIZE_PARTS = ("codes", "scales", "zero_points", "codebooks", "outliers", "low_rank", "metadata", "unquantized")


def stored_tensors(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor the model saves (parameters, persistent buffers, bitsandbytes quant state), by module and name
    inside it; a shared (tied) tensor appears once, under its first name."""
    modules = {name for name, _ in model.named_modules()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # keep_vars: the tensors themselves, not copies
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        module, local = split_name(name)
        while module and module not in modules:  # "lm_head.weight" splits right; nested names walk up
            module, _, parent_local = module.rpartition(".")
            local = f"{parent_local}.{local}"
        grouped.setdefault(module, {})[local] = tensor
    return grouped


@dataclasses.dataclass
class _Tally:
    """Weights, how many of them are quantized, and bits per stored part (SIZE_PARTS)."""

    weights: int = 0
    quantized: int = 0
    bits: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SIZE_PARTS, 0))

    def add(self, other: _Tally) -> None:
        self.weights, self.quantized = self.weights + other.weights, self.quantized + other.quantized
        for part, value in other.bits.items():
            self.bits[part] += value


def _module_tally(module: nn.Module, tensors: dict[str, torch.Tensor], record: WeightRecord | None,
                  reference_bits: int) -> _Tally:
    """What one module's stored tensors (`stored_tensors`) weigh."""
    tally = _Tally()
    bnb = bnb_layout.is_quantized(tensors)
    for local, tensor in tensors.items():
        part = bnb_layout.part_of(local) if bnb else None
        if record is not None and local == "weight":  # what the record stores, not the dequantized floats we hold
            for name, value in dataclasses.asdict(record.storage_bits()).items():
                tally.bits[name] += value
            tally.weights, tally.quantized = tally.weights + tensor.numel(), tally.quantized + tensor.numel()
        elif part is not None:  # a bitsandbytes tensor counts as stored, in its own dtype
            tally.bits[part] += tensor.numel() * _dtype_bits(tensor.dtype)
            if part == "codes":  # packed two per byte (4-bit): the weights are the module's out x in, not the bytes
                count = int(getattr(module, "in_features")) * int(getattr(module, "out_features"))
                tally.weights, tally.quantized = tally.weights + count, tally.quantized + count
        else:  # floats count at the checkpoint's precision (what `dtype: auto` exports), not the compute dtype
            width = reference_bits if tensor.is_floating_point() else _dtype_bits(tensor.dtype)
            tally.bits["unquantized"] += tensor.numel() * width
            tally.weights += tensor.numel()
    return tally


def model_part(name: str, module: nn.Module, embeddings: nn.Module | None, head: nn.Module | None) -> str:
    """Which part of the model a module's bytes belong to: embeddings, head, norms, a linear's kind by its own name
    (q_proj, ..., down_proj; c_attn for GPT-2), or other. A head tied to the embeddings is stored once, with them."""
    if module is embeddings:
        tied = head is not None and getattr(head, "weight", None) is getattr(embeddings, "weight", False)
        return "embeddings + tied head" if tied else "embeddings"
    if module is head:
        return "head"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if is_linear(module):  # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear subclasses
        return name.rpartition(".")[2]
    return "other"


def _in_and_out_embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            found.append(getattr(model, getter)())
        except (AttributeError, NotImplementedError):  # not a transformers model, or one without that accessor
            found.append(None)
    return found[0], found[1]


def model_census(model: nn.Module, quantized: dict[str, WeightRecord], reference_dtype: torch.dtype) -> dict[str, Any]:
    """Weights, quantized weights, and bits per stored part of `model`, every tied tensor once; also those bits
    by part of the model (`model_part`: embeddings, head, norms, q_proj, ...), which add up to the same total.

    A weight with a record counts what the record stores (`storage_bits()`: codes, scales, zero points, ...); a
    bitsandbytes module counts the tensors it saves (codes, absmax, double-quant constants, code maps, its JSON
    quant state); every other tensor counts at `reference_dtype` if it is a float, at its own width if not.
    """
    reference_bits = _dtype_bits(reference_dtype)
    modules = dict(model.named_modules())
    embeddings, head = _in_and_out_embeddings(model)
    total = _Tally()
    quantized_bits = 0
    by_part: dict[str, dict[str, int]] = {}
    for name, tensors in stored_tensors(model).items():
        tally = _module_tally(modules[name], tensors, quantized.get(name), reference_bits)
        total.add(tally)
        part = by_part.setdefault(model_part(name, modules[name], embeddings, head), {})
        for stored, bits in tally.bits.items():
            if bits:
                part[stored] = part.get(stored, 0) + bits
        if tally.quantized:
            quantized_bits += sum(tally.bits.values()) - tally.bits["unquantized"]  # a bias is not the weight
    return {"parameters": total.weights, "quantized_parameters": total.quantized, "quantized_bits": quantized_bits,
            "bits": total.bits, "by_part": by_part}


def loaded_size(model: nn.Module, reference_dtype: torch.dtype, *, by_part: bool = False) -> dict[str, Any]:
    """The model as loaded, before any pass: its weights and their bytes at the checkpoint's precision (and with
    `by_part`, its bits by part of the model, as `model_census` itemises them)."""
    census = model_census(model, {}, reference_dtype)
    size = {"parameters": census["parameters"], "bytes": sum(census["bits"].values()) // 8}
    return {**size, "bits_by_part": census["by_part"]} if by_part else size


def model_size(model: nn.Module, quantized: dict[str, WeightRecord], reference_dtype: torch.dtype,
               baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json `size`: what the compressed model stores, beside `baseline` (`loaded_size` before the passes;
    by default the model itself, for a model no pass changed).

    `bytes` is what an export in the model's own layout stores in tensors (compressed-tensors or GPTQ for weight
    records, bitsandbytes for the bnb pass, dense for a pruned model): bytes on disk minus the safetensors header
    and the per-format extras `compress inspect` itemises. `stored_bits_by_part` splits the same bits by part of
    the model (embeddings, head, norms, each kind of linear) and by what is stored (codes, scales, ...).
    """
    census = model_census(model, quantized, reference_dtype)
    before = baseline or loaded_size(model, reference_dtype, by_part=True)
    total_bits, weights, quantized_weights = sum(census["bits"].values()), census["parameters"], census["quantized_parameters"]
    size = {
        "parameters": weights,
        "reference_dtype": str(reference_dtype).replace("torch.", ""),
        "baseline_parameters": before["parameters"],
        "baseline_bytes": before["bytes"],
        "bytes": total_bits // 8,
        "bits_per_weight": round(total_bits / weights, 4),
        "stored_bits": {part: value for part, value in census["bits"].items() if value},
        "stored_bits_by_part": census["by_part"],
        "quantized_parameters": quantized_weights,
        "quantized_bytes": census["quantized_bits"] // 8,
        "quantized_bits_per_weight": round(census["quantized_bits"] / quantized_weights, 4) if quantized_weights else None,
    }
    if "bits_by_part" in before:
        size["baseline_bits_by_part"] = before["bits_by_part"]
    return size


def summarize_modules(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Module count plus the mean of every numeric per-module field (e.g. weight_rel_error)."""
    summary: dict[str, Any] = {"modules": len(modules)}
    numeric: dict[str, list[float]] = {}
    for result in modules.values():
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numeric.setdefault(key, []).append(float(value))
    for key, values in numeric.items():
        summary[f"mean_{key}"] = round(sum(values) / len(values), 6)
    return summary


WORST_MODULES = 10


def damage_section(sweeps: list[tuple[list[str], dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """report.json `damage` from each calibrated sweep's (pass labels, measured errors) (compress/engine/damage.py).

    Per sweep, `layers` (prefix -> output_rel_error, windows, positions) and `modules` (fqn -> output_rel_error);
    `worst` lists the WORST_MODULES modules with the largest output error over all sweeps, largest first.
    """
    entries: list[dict[str, Any]] = []
    ranked: list[tuple[float, str, str]] = []
    for labels, measured in sweeps:
        layers = {name: entry for name, entry in measured.items() if "windows" in entry}  # a layer's entry says how it was measured
        modules = {name: entry for name, entry in measured.items() if name not in layers}
        entries.append({"passes": labels, "layers": layers, "modules": modules})
        ranked += [(float(entry["output_rel_error"]), name, ", ".join(labels)) for name, entry in modules.items()
                   if isinstance(entry.get("output_rel_error"), (int, float))]
    ranked.sort(reverse=True)
    return {
        "measured_on": f"the first calibration batch, at up to {MAX_POSITIONS} evenly spaced token positions, against the layer "
                       "before the sweep's passes; each input is what the compressed layers before it produced",
        "sweeps": entries,
        "worst": [{"module": name, "output_rel_error": error, "passes": labels}
                  for error, name, labels in ranked[:WORST_MODULES]],
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _change(baseline: float | None, compressed: float | None) -> str:
    if baseline is None or compressed is None or baseline == 0:
        return "—"
    return f"{(compressed / baseline - 1) * 100:+.2f}%"


def metric_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for metric, per_dataset in report["metrics"].items():
        for label, values in per_dataset.items():
            baseline, compressed = values.get("baseline"), values.get("compressed")
            rows.append((metric, label, _fmt(baseline), _fmt(compressed), _change(baseline, compressed)))
    return rows


def lower_is_better(metric: str) -> bool:
    """Perplexities and divergences from the baseline fall as a model improves; accuracies (acc, acc_norm, lm_eval_*,
    top1_agreement) rise."""
    return "perplexity" in metric or metric.endswith("ppl") or metric.startswith("kl_divergence")


def change_verdict(metric: str, values: dict[str, Any]) -> str:
    """"worse", "better", "within noise" or "" (nothing to compare) for one metric's baseline and compressed.

    A score with standard errors counts as changed only when the difference exceeds the standard error of the
    difference, sqrt(se_baseline^2 + se_compressed^2) (both scored on the same documents, so this errs wide).
    A perplexity has none: any change counts.
    """
    baseline, compressed = values.get("baseline"), values.get("compressed")
    if not isinstance(baseline, (int, float)) or not isinstance(compressed, (int, float)) or baseline == compressed:
        return ""
    se_b, se_c = values.get("baseline_stderr"), values.get("compressed_stderr")
    if isinstance(se_b, (int, float)) and isinstance(se_c, (int, float)):
        if abs(compressed - baseline) <= math.hypot(se_b, se_c):
            return "within noise"
    rose = compressed > baseline
    return "worse" if rose == lower_is_better(metric) else "better"


def value_text(value: Any) -> str:
    """A setting as a recipe spells it: null, true, 128, [a, b]; never Python's None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}: {value_text(value)}" for key, value in settings.items()) or "defaults"


def size_rows(size: dict[str, Any]) -> list[tuple[str, str]]:
    """The size facts people read, each labelled: bytes against the model as loaded, and bits per weight in the
    quantized layers and over the whole model, whose unquantized embeddings, head and norms weigh it up."""
    dtype, params = size.get("reference_dtype", "?"), size.get("parameters", 0)
    baseline, baseline_params = size.get("baseline_bytes") or 0, size.get("baseline_parameters", params)
    share = f", {size['bytes'] / baseline:.1%} of it" if baseline else ""
    rows = [("size", f"{size.get('bytes', 0):,} bytes vs {baseline:,} as loaded ({dtype}){share}")]
    if baseline_params != params:
        rows.append(("weights", f"{params:,} of the {baseline_params:,} loaded"))
    quantized, quantized_params = size.get("quantized_bits_per_weight"), size.get("quantized_parameters") or 0
    rows.append(("bits per weight, quantized layers",
                 f"{quantized} over {quantized_params:,} weights (codes with their scales, zero points, code tables)"
                 if quantized is not None else "no layer is quantized"))
    rest = params - quantized_params
    rows.append(("bits per weight, whole model", f"{size.get('bits_per_weight')} over all {params:,} weights"
                 + (f", {rest:,} of them unquantized (embeddings, head, norms) at {dtype}" if quantized_params else "")))
    return rows


def _fallback_text(fallback: Any) -> str:
    return settings_text(fallback) if isinstance(fallback, dict) else str(fallback)


def model_label(name: str) -> str:
    """What the page calls the model: a hub id as it is, a local folder by its name, never an absolute path.

    A folder named just `model` (the demo's, a lazy run's RUN_DIR/model) keeps its parent: `demo/model`.
    """
    path = PurePath(name)
    if not (path.is_absolute() or name.startswith(("./", "../", "~"))):
        return name  # "org/name" on the hub, or a relative path as the recipe wrote it
    parts = [part for part in path.parts if part not in ("/", "~", ".", "..")]
    if not parts:
        return name
    return "/".join(parts[-2:]) if parts[-1] == "model" and len(parts) > 1 else parts[-1]


def page_title(report: dict[str, Any]) -> str:
    """`<model> · <recipe>`: the model's name and the recipe file's stem."""
    model = model_label(str(report.get("model", {}).get("name")))
    recipe = report.get("recipe_file")
    return f"{model} · {PurePath(recipe).stem}" if recipe else model


def render_markdown(report: dict[str, Any]) -> str:
    model, size = report["model"], report["size"]
    lines = [
        f"# compress run: {page_title(report)}",
        "",
        f"- parameters: {model['parameters']:,}",
        *[f"- {label}: {text}" for label, text in size_rows(size)],
        f"- total time: {report['timings']['total']:.1f} s, peak memory: {report['peak_memory_bytes'] / 2**20:.0f} MiB",
        "",
        "## Metrics",
        "",
        "| metric | dataset | baseline | compressed | change |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in metric_rows(report)]
    from_cache = (report.get("cache") or {}).get("baseline_from_cache") or {}
    cached = [f"{metric}[{label}]" for metric, per_label in from_cache.items() for label, hit in per_label.items() if hit]
    if cached:
        lines += ["", f"Baseline of {', '.join(cached)} read from the cache: an earlier run scored the same model files "
                  "the same way (`--no-cache` computes it afresh)."]
    lines += ["", "## Passes", "", "| pass | params | seconds | summary |", "|---|---|---|---|"]
    for entry in report["passes"]:
        summary = ", ".join(f"{k}={value_text(v)}" for k, v in entry["summary"].items())
        lines.append(f"| {entry['name']} | {settings_text(entry['params'])} | {entry['seconds']:.2f} | {summary} |")
    if "allocation" in report:
        lines += allocation_lines(report["allocation"])
    if report["fallbacks"]:
        lines += ["", "## Fallbacks", ""] + [f"- {_fallback_text(f)}" for f in report["fallbacks"]]
    return "\n".join(lines) + "\n"


def allocation_lines(allocation: dict[str, Any]) -> list[str]:
    """Budget against what the plan used (codes + scales + zero points), and how many weights got each width."""
    budget, used = allocation["budget"], allocation["used"]
    per_width: dict[int | str, int] = {}
    for unit in allocation["units"].values():
        per_width[unit["bits"]] = per_width.get(unit["bits"], 0) + unit["parameters"]
    # integer widths in order, then element-float formats (fp8, nvfp4, ...) by name
    ordered = sorted(per_width.items(), key=lambda item: (isinstance(item[0], str), str(item[0]).zfill(2)))
    widths = ", ".join(f"{bits if isinstance(bits, str) else f'{bits} bits'}: {count / allocation['parameters']:.1%}"
                       for bits, count in ordered)
    return [
        "", "## Bit allocation", "",
        f"- {allocation['estimator']} + {allocation['solver']}, per {allocation['granularity']}, "
        f"group size {allocation['group_size']}",
        f"- budget: {budget['bytes']:,} bytes ({budget['avg_bits']:.4f} bits/weight); used: {used['bytes']:,} bytes "
        f"({used['avg_bits']:.4f} bits/weight), scales and zero points included",
        f"- weights per width: {widths}",
    ]


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"compress: {page_title(report)}")
    for column in ("metric", "dataset", "baseline", "compressed", "change"):
        table.add_column(column, justify="right" if column in ("baseline", "compressed", "change") else "left")
    for row in metric_rows(report):
        table.add_row(*row)
    size = report["size"]
    quantized = size.get("quantized_bits_per_weight")
    table.caption = (
        f"{size['bits_per_weight']} bits/weight whole model"
        + (f" ({quantized} in quantized layers)" if quantized is not None else "")
        + f" · {size['bytes'] / 2**20:.2f} MiB (as loaded {size['baseline_bytes'] / 2**20:.2f} MiB)"
        f" · {report['timings']['total']:.1f} s"
    )
    return table
