"""The run report: JSON for machines, Markdown and a rich table for people."""

from __future__ import annotations

import math
import platform
import resource
import sys
from typing import Any

import torch
from rich.table import Table
from torch import nn

import compress
from compress.engine.digest import shards_digest, weights_digest  # noqa: F401  (re-exported)
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
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def model_size(model: nn.Module, quantized: dict[str, WeightRecord], reference_dtype: torch.dtype) -> dict[str, Any]:
    """Storage the compressed model needs vs. the checkpoint's own precision, counting each tied tensor once.

    Quantized weights count what their record stores (`storage_bits().total`: codes, scales, zero points, ...);
    everything else counts at `reference_dtype` (the checkpoint's precision, not the float32 we may compute in).
    """
    reference_bits = _dtype_bits(reference_dtype)
    seen: set[int] = set()
    params = total_bits = quant_params = quant_bits = 0
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            params += param.numel()
            record = quantized.get(module_name) if param_name == "weight" else None
            if record is not None:
                quant_params += param.numel()
                record_bits = record.storage_bits().total
                quant_bits += record_bits
                total_bits += record_bits
            else:
                total_bits += param.numel() * reference_bits
    return {
        "parameters": params,
        "reference_dtype": str(reference_dtype).replace("torch.", ""),
        "baseline_bytes": params * reference_bits // 8,
        "bytes": total_bits // 8,
        "bits_per_weight": round(total_bits / params, 4),
        "quantized_parameters": quant_params,
        "quantized_bits_per_weight": round(quant_bits / quant_params, 4) if quant_params else None,
    }


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


def render_markdown(report: dict[str, Any]) -> str:
    model, size = report["model"], report["size"]
    lines = [
        f"# compress run: {model['name']}",
        "",
        f"- parameters: {model['parameters']:,}",
        f"- size: {size['bytes']:,} bytes vs {size['baseline_bytes']:,} ({size['reference_dtype']}), "
        f"{size['bits_per_weight']} bits per weight overall, {size['quantized_bits_per_weight']} in quantized layers",
        f"- total time: {report['timings']['total']:.1f} s, peak memory: {report['peak_memory_bytes'] / 2**20:.0f} MiB",
        "",
        "## Metrics",
        "",
        "| metric | dataset | baseline | compressed | change |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in metric_rows(report)]
    lines += ["", "## Passes", "", "| pass | params | seconds | summary |", "|---|---|---|---|"]
    for entry in report["passes"]:
        params = ", ".join(f"{k}={v}" for k, v in entry["params"].items())
        summary = ", ".join(f"{k}={v}" for k, v in entry["summary"].items())
        lines.append(f"| {entry['name']} | {params} | {entry['seconds']:.2f} | {summary} |")
    if "allocation" in report:
        lines += allocation_lines(report["allocation"])
    if report["fallbacks"]:
        lines += ["", "## Fallbacks", ""] + [f"- {f}" for f in report["fallbacks"]]
    return "\n".join(lines) + "\n"


def allocation_lines(allocation: dict[str, Any]) -> list[str]:
    """Budget against what the plan used (codes + scales + zero points), and how many weights got each width."""
    budget, used = allocation["budget"], allocation["used"]
    per_width: dict[int, int] = {}
    for unit in allocation["units"].values():
        per_width[unit["bits"]] = per_width.get(unit["bits"], 0) + unit["parameters"]
    widths = ", ".join(f"{bits} bits: {count / allocation['parameters']:.1%}" for bits, count in sorted(per_width.items()))
    return [
        "", "## Bit allocation", "",
        f"- {allocation['estimator']} + {allocation['solver']}, per {allocation['granularity']}, "
        f"group size {allocation['group_size']}",
        f"- budget: {budget['bytes']:,} bytes ({budget['avg_bits']:.4f} bits/weight); used: {used['bytes']:,} bytes "
        f"({used['avg_bits']:.4f} bits/weight), scales and zero points included",
        f"- weights per width: {widths}",
    ]


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"compress: {report['model']['name']}")
    for column in ("metric", "dataset", "baseline", "compressed", "change"):
        table.add_column(column, justify="right" if column in ("baseline", "compressed", "change") else "left")
    for row in metric_rows(report):
        table.add_row(*row)
    size = report["size"]
    table.caption = (
        f"{size['bits_per_weight']} bits/weight overall · {size['bytes'] / 2**20:.2f} MiB "
        f"(baseline {size['baseline_bytes'] / 2**20:.2f} MiB) · {report['timings']['total']:.1f} s"
    )
    return table
