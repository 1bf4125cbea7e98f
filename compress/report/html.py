"""report.html: one self-contained page per run (and one comparing runs), plots inline as base64 PNGs.

Renders whatever report.json holds and skips what it does not: bits per module as a heatmap over
decoder layers x module types, sparsity per module (pruning passes), sensitivities and the Pareto frontier
(an `allocation` section), and perplexity against size when several runs are compared. No JavaScript and no
external resources, so the page opens anywhere, offline, years later.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any, Callable

from compress.report.summary import metric_rows, page_title, settings_text, size_rows, value_text

_LAYER_MODULE = re.compile(r"\.(\d+)\.(.+)$")  # "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.worse { color: #b00020; } .better { color: #1b7f3b; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.muted { color: #777; } td.text { text-align: left; }
"""


def module_field(report: dict[str, Any], key: str) -> dict[str, float]:
    """`key` (e.g. "bits", "sparsity") of every module over all passes; a later pass overrides an earlier one."""
    values: dict[str, float] = {}
    for entry in report.get("passes", []):
        for fqn, result in (entry.get("modules") or {}).items():
            value = result.get(key) if isinstance(result, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[fqn] = float(value)
    return values


def layer_grid(values: dict[str, float]) -> tuple[list[int], list[str], list[list[float]]]:
    """Arrange per-module values as rows = decoder layers, columns = module types (NaN where a module is absent)."""
    cells: dict[tuple[int, str], float] = {}
    for fqn, value in values.items():
        match = _LAYER_MODULE.search(fqn)
        if match:
            cells[(int(match.group(1)), match.group(2))] = value
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in sorted(cells, key=lambda c: c[0])))
    grid = [[cells.get((layer, kind), float("nan")) for kind in kinds] for layer in layers]
    return layers, kinds, grid


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def heatmap(values: dict[str, float], title: str, colorbar: str) -> str | None:
    layers, kinds, grid = layer_grid(values)
    if not layers:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.35 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylabel("decoder layer")
    ax.set_title(title)
    if len(layers) * len(kinds) <= 400:  # numbers stay readable up to about 20 x 20 cells
        for row, line in enumerate(grid):
            for col, value in enumerate(line):
                if value == value:
                    ax.text(col, row, f"{value:.3g}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label=colorbar)
    return _png(fig)


def _numeric_pairs(points: Any) -> list[tuple[float, float]]:
    """Frontier points as (x, y): `[[x, y], ...]` or `[{...}, ...]` with the first two numeric fields."""
    pairs = []
    for point in points if isinstance(points, list) else []:
        numbers = point if isinstance(point, (list, tuple)) else list(point.values()) if isinstance(point, dict) else []
        numbers = [float(n) for n in numbers if isinstance(n, (int, float)) and not isinstance(n, bool)]
        if len(numbers) >= 2:
            pairs.append((numbers[0], numbers[1]))
    return pairs


def _axis_names(points: Any) -> tuple[str, str]:
    if isinstance(points, list) and points and isinstance(points[0], dict):
        names = [k for k, v in points[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(names) >= 2:
            return names[0], names[1]
    return "x", "y"


def _frontier_points(allocation: dict[str, Any]) -> tuple[list[tuple[float, float]], list[tuple[float, float]], str, str]:
    """The frontier and the chosen point. The allocate pass writes `{bits, avg_bits, cost}` points and the plan's
    `used.avg_bits` / `cost`; any other list of numeric pairs is plotted as it is."""
    frontier = allocation.get("frontier")
    if isinstance(frontier, list) and frontier and isinstance(frontier[0], dict) and {"avg_bits", "cost"} <= set(frontier[0]):
        pairs = [(float(p["avg_bits"]), float(p["cost"])) for p in frontier]
        used = allocation.get("used")
        chosen = ([(float(used["avg_bits"]), float(allocation["cost"]))]
                  if isinstance(used, dict) and "avg_bits" in used and "cost" in allocation else [])
        return pairs, chosen, "bits per weight (scales and zero points included)", "summed sensitivity cost"
    selected = allocation.get("chosen") or allocation.get("selected")
    xlabel, ylabel = _axis_names(frontier)
    return _numeric_pairs(frontier), _numeric_pairs([selected]) if selected is not None else [], xlabel, ylabel


def frontier_plot(allocation: dict[str, Any]) -> str | None:
    points, chosen_pair, xlabel, ylabel = _frontier_points(allocation)
    pairs = sorted(points)
    if not pairs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "o-")
    if chosen_pair:
        ax.plot(*chosen_pair[0], "r*", markersize=14, label="chosen")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Pareto frontier")
    ax.grid(alpha=0.3)
    return _png(fig)


def sensitivity_plot(allocation: dict[str, Any]) -> str | None:
    """Sensitivities as `{module: number}` (a heatmap) or `{module: {bits: number}}` (one line per bit width)."""
    sensitivities = allocation.get("module_scores") or allocation.get("sensitivities")  # the allocate pass: module_scores
    if not isinstance(sensitivities, dict) or not sensitivities:
        return None
    flat = {k: float(v) for k, v in sensitivities.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        return heatmap(flat, "sensitivity per module", "sensitivity")
    per_bits: dict[str, list[float]] = {}
    for per_module in sensitivities.values():
        if isinstance(per_module, dict):
            for bits, value in per_module.items():
                if isinstance(value, (int, float)):
                    per_bits.setdefault(str(bits), []).append(float(value))
    if not per_bits:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for bits, values in per_bits.items():
        ax.plot(range(len(values)), values, ".-", label=f"{bits} bits")
    ax.set_yscale("log")
    ax.set_xlabel("module (in model order)")
    ax.set_ylabel("sensitivity")
    ax.legend()
    ax.set_title("sensitivity per module")
    return _png(fig)


def _table(header: list[str] | None, rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
    head = f"<thead><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in header)}</tr></thead>" if header else ""
    body = ""
    for r, row in enumerate(rows):
        cells = ""
        for c, cell in enumerate(row):
            css = classes[r][c] if classes else ""
            cells += f'<td class="{css}">{html.escape(cell)}</td>' if css else f"<td>{html.escape(cell)}</td>"
        body += f"<tr>{cells}</tr>"
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _figure(title: str, uri: str | None) -> str:
    return f"<h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" src=\"{uri}\">" if uri else ""


def _summary(report: dict[str, Any]) -> list[list[str]]:
    model, size, timings = report.get("model", {}), report.get("size", {}), report.get("timings", {})
    rows = [
        ["model", f"{model.get('name')} ({model.get('architecture')}, {model.get('parameters', 0):,} parameters)"],
        ["recipe", str(report.get("recipe_file") or "given as text")],
        *[[label, text] for label, text in size_rows(size)],
        ["passes", ", ".join(p.get("name", "?") for p in report.get("passes", [])) or "none"],
        ["device / seed", f"{model.get('device')} / {report.get('seed')}"],
        ["wall time", f"{timings.get('total', 0):.1f} s"],
        ["peak memory", ", ".join(f"{k}: {v / 2**20:,.0f} MiB" for k, v in (report.get("peak_memory") or {}).items())],
        ["fallbacks", str(len(report.get("fallbacks", [])))],
    ]
    export = report.get("export")
    if isinstance(export, dict) and isinstance(export.get("stored"), dict):
        stored = export["stored"]
        overhead = sum(stored.get("overhead", {}).values())
        rows.append(["export", f"{export.get('format')}: {export.get('weights_bytes', 0):,} bytes of safetensors = "
                               f"{stored.get('bytes', 0):,} of tensors ({stored.get('bits_per_weight')} bits per weight) "
                               f"+ {overhead:,} of headers and format extras"])
    return rows


def _section(heading: str, body: str, section_id: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(heading)}</h2>\n{body}</section>'


def summary_section(report: dict[str, Any]) -> str | None:
    rows = _summary(report)
    return f'<section id="summary">{_table(None, rows, [["", "text"]] * len(rows))}</section>'


def metrics_section(report: dict[str, Any]) -> str | None:
    rows = [list(row) for row in metric_rows(report)]
    # For every metric we report today (perplexity), lower is better, so a rise is drawn as a loss.
    classes = [["", "", "", "", "worse" if row[4].startswith("+") else "better" if row[4].startswith("-") else ""]
               for row in rows]
    body = (_table(["metric", "dataset", "baseline", "compressed", "change"], rows, classes) if rows
            else '<p class="muted">no evaluations in this recipe</p>')
    return _section("Metrics", body, "metrics")


def _dash(value: Any) -> str:
    return "—" if value is None else value_text(value)


def protocol_row(metric: str, label: str, protocol: dict[str, Any], from_cache: bool | None = None) -> list[str]:
    """metric, data set or task, protocol and version, seq_len, stride, what was scored, the limit as run, and
    whether the baseline was computed by this run or read from the cache (— in reports from before the cache)."""
    settings = protocol.get("settings") or {}
    if "docs" in protocol:
        scored = f"{protocol['docs']:,} documents"
    elif "windows" in protocol:
        scored = f"{protocol['windows']:,} windows, {protocol.get('scored_tokens', 0):,} tokens"
    else:
        scored = "—"
    if settings.get("max_windows") is not None:
        limit = f"first {settings['max_windows']:,} windows"
    elif settings.get("limit") is not None:
        limit = f"first {settings['limit']:,} documents"
    else:
        limit = "none: all of it" if "max_windows" in settings or "limit" in settings else "—"
    return [metric, str(protocol.get("dataset") or protocol.get("task") or label),
            f"{protocol.get('name', '?')} v{protocol.get('version', '?')}",
            _dash(protocol.get("seq_len", protocol.get("max_length"))), _dash(protocol.get("stride")), scored, limit,
            "—" if from_cache is None else "from the cache" if from_cache else "computed"]


def protocol_section(report: dict[str, Any]) -> str | None:
    cached = (report.get("cache") or {}).get("baseline_from_cache") or {}
    rows = [protocol_row(metric, label, values.get("protocol") or {}, cached.get(metric, {}).get(label))
            for metric, per_dataset in report.get("metrics", {}).items() for label, values in per_dataset.items()]
    if not rows:
        return None
    header = ["metric", "data set / task", "protocol", "seq_len", "stride", "scored", "limit", "baseline"]
    return _section("Evaluation protocol",
                    _table(header, rows, [["", "text", "text", "", "", "", "text", "text"]] * len(rows)), "protocol")


def passes_section(report: dict[str, Any]) -> str | None:
    rows = [[p.get("name", "?"), settings_text(p.get("params", {})), f"{p.get('seconds', 0):.2f}",
             ", ".join(f"{k}={value_text(v)}" for k, v in p.get("summary", {}).items())]
            for p in report.get("passes", [])]
    body = (_table(["pass", "parameters as run", "seconds", "summary"], rows, [["", "text", "", "text"]] * len(rows))
            if rows else '<p class="muted">no passes in this recipe</p>')
    return _section("Passes", body, "passes")


# report.json `timings`: top-level phases in run order, each with the phases timed inside it.
PHASES = {
    "load": ("load the model", {"calibration_data": "of which calibration data (read, tokenize, sample)"}),
    "baseline_eval": ("baseline evaluation", {}),
    "passes": ("passes", {"propagation": "of which calibration forwards between layers"}),
    "save": ("write what is outside the layers (lazy)", {}),
    "eval": ("final evaluation", {}),
    "export": ("save the run state and the export", {}),
}


def timing_rows(report: dict[str, Any]) -> list[list[str]]:
    """Seconds per phase and share of the total, with each pass inside `passes`; `other` is what no phase covers."""
    timings = {k: v for k, v in report.get("timings", {}).items() if isinstance(v, (int, float))}
    total = float(timings.get("total", 0)) or 1.0
    inner = {name for _, subs in PHASES.values() for name in subs}

    def row(label: str, seconds: float) -> list[str]:
        return [label, f"{seconds:.2f}", f"{seconds / total:.1%}"]

    rows = []
    for name, (label, subs) in PHASES.items():
        if name not in timings:
            continue
        rows.append(row(label, timings[name]))
        if name == "passes":
            rows += [row(f"  {p.get('name', '?')}", float(p.get("seconds", 0))) for p in report.get("passes", [])]
        rows += [row(f"  {sub_label}", timings[sub]) for sub, sub_label in subs.items() if sub in timings]
    extra = [name for name in timings if name not in PHASES and name not in inner and name != "total"]
    rows += [row(name.replace("_", " "), timings[name]) for name in extra]
    covered = sum(timings[name] for name in [*PHASES, *extra] if name in timings)
    rows.append(row("other (setup, report)", max(0.0, timings.get("total", 0) - covered)))
    rows.append(row("total", timings.get("total", 0)))
    return rows


def timings_section(report: dict[str, Any]) -> str | None:
    rows = timing_rows(report)
    return _section("Time", _table(["phase", "seconds", "share"], rows, [["text", "", ""]] * len(rows)), "time")


def _allocation(report: dict[str, Any]) -> dict[str, Any]:
    found = report.get("allocation")
    return found if isinstance(found, dict) else {}


def _figure_section(title: str, uri: str | None, section_id: str) -> str | None:
    return _section(title, f'<img alt="{html.escape(title)}" src="{uri}">', section_id) if uri else None


def fallbacks_section(report: dict[str, Any]) -> str | None:
    if not report.get("fallbacks"):
        return None
    items = "".join(f"<li>{html.escape(settings_text(f) if isinstance(f, dict) else str(f))}</li>"
                    for f in report["fallbacks"])
    return _section("Fallbacks", f"<ul>{items}</ul>", "fallbacks")


Section = Callable[[dict[str, Any]], "str | None"]

# The page, top to bottom: each entry renders one <section> from report.json, or None when the run has nothing
# for it. A new chart is one more function here.
SECTIONS: list[Section] = [
    summary_section,
    metrics_section,
    protocol_section,
    passes_section,
    timings_section,
    lambda r: _figure_section("Bits per module", heatmap(module_field(r, "bits"), "bits per module", "bits"), "bits"),
    lambda r: _figure_section("Sparsity per module",
                              heatmap(module_field(r, "sparsity"), "sparsity per module", "sparsity"), "sparsity"),
    lambda r: _figure_section("Sensitivities", sensitivity_plot(_allocation(r)), "sensitivities"),
    lambda r: _figure_section("Pareto frontier", frontier_plot(_allocation(r)), "frontier"),
    fallbacks_section,
]


def render_html(report: dict[str, Any]) -> str:
    title = page_title(report)
    parts = [f"<h1>{html.escape(title)}</h1>"] + [section(report) for section in SECTIONS]
    return _page(f"{title} · compress run", "\n".join(p for p in parts if p))


def write_html_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(render_html(report), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Several runs side by side


def compare_rows(runs: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """One row per run: size, bits per weight, every metric's compressed value (baseline in the header), time."""
    metrics: list[tuple[str, str]] = []
    for _, report in runs:
        for metric, per_dataset in report.get("metrics", {}).items():
            metrics += [(metric, label) for label in per_dataset if (metric, label) not in metrics]
    header = ["run", "size MiB", "bits/weight"]
    for metric, label in metrics:
        baselines = {report["metrics"][metric][label].get("baseline") for _, report in runs
                     if label in report.get("metrics", {}).get(metric, {})}
        baseline = next(iter(baselines)) if len(baselines) == 1 else None
        header.append(f"{metric}[{label}]" + (f" (baseline {baseline:.4f})" if isinstance(baseline, float) else ""))
    header.append("time s")
    rows = []
    for name, report in runs:
        size = report.get("size", {})
        row = [name, f"{size.get('bytes', 0) / 2**20:.2f}", str(size.get("bits_per_weight"))]
        for metric, label in metrics:
            value = report.get("metrics", {}).get(metric, {}).get(label, {}).get("compressed")
            row.append("—" if value is None else f"{value:.4f}")
        row.append(f"{report.get('timings', {}).get('total', 0):.1f}")
        rows.append(row)
    return header, rows


def size_metric_plot(runs: list[tuple[str, dict[str, Any]]]) -> str | None:
    """Perplexity (first dataset) against size in MiB, one labelled point per run."""
    points = []
    for name, report in runs:
        per_dataset = report.get("metrics", {}).get("perplexity", {})
        if per_dataset:
            value = next(iter(per_dataset.values())).get("compressed")
            if isinstance(value, (int, float)):
                points.append((report.get("size", {}).get("bytes", 0) / 2**20, float(value), name))
    if len(points) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    for x, y, name in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity against size")
    ax.grid(alpha=0.3)
    return _png(fig)


def render_compare_html(runs: list[tuple[str, dict[str, Any]]]) -> str:
    header, rows = compare_rows(runs)
    body = ["<h1>compress: runs compared</h1>", _table(header, rows),
            _figure("Perplexity against size", size_metric_plot(runs))]
    return _page("compress: runs compared", "\n".join(b for b in body if b))
