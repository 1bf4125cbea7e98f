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

from compress.report.charts import heatmap_svg, scatter_svg, stacked_bars_svg
from compress.report.summary import (
    SIZE_PARTS,
    change_verdict,
    page_title,
    settings_text,
    size_rows,
    value_text,
)

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
.multiples { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.side-by-side { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 1.5em; }
.side-by-side > div { overflow-x: auto; }
svg.chart { max-width: 100%; height: auto; }
.said { display: grid; grid-template-columns: 1fr 1fr; gap: 0.5em 1.5em; margin: 0.5em 0 1.5em; }
.said .prompt { grid-column: 1 / 3; font-style: italic; }
.tokens { font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap; line-height: 1.6; }
.tokens span.diff { background: #fde2e1; color: #8a1c1c; border-radius: 2px; }
.agree { display: flex; gap: 1px; grid-column: 1 / 3; }
.agree i { width: 10px; height: 10px; display: inline-block; background: #7cb87e; }
.agree i.no { background: #d9534f; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; color: #000; }
  section { break-inside: avoid; page-break-inside: avoid; }
  h1, h2 { break-after: avoid; }
  img, svg.chart { max-width: 100%; }
  .tokens span.diff { outline: 1px solid #8a1c1c; }
  th { background: none; }
}
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


def _with_stderr(value: Any, stderr: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, (int, float)) else f"{value:.4f}"


def _protocol_name(protocol: dict[str, Any]) -> str:
    if not protocol:
        return "—"
    length = protocol.get("seq_len", protocol.get("max_length"))
    return f"{protocol.get('name', '?')} v{protocol.get('version', '?')}" + (f", {length} tokens" if length else "")


def metric_table_rows(report: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows (metric, data set, protocol, baseline ± se, compressed ± se, change, verdict) and their CSS classes."""
    rows, classes = [], []
    for metric, per_dataset in report.get("metrics", {}).items():
        for label, values in per_dataset.items():
            baseline, compressed = values.get("baseline"), values.get("compressed")
            verdict = change_verdict(metric, values)
            change = (f"{(compressed / baseline - 1) * 100:+.2f}%" if isinstance(baseline, (int, float))
                      and isinstance(compressed, (int, float)) and baseline else "—")
            if "perplexity" not in metric and isinstance(baseline, (int, float)) and isinstance(compressed, (int, float)):
                change = f"{compressed - baseline:+.4f}"  # an accuracy's change in points, not percent of itself
            rows.append([metric, label, _protocol_name(values.get("protocol") or {}),
                         _with_stderr(baseline, values.get("baseline_stderr")),
                         _with_stderr(compressed, values.get("compressed_stderr")), change, verdict or "—"])
            css = verdict if verdict in ("worse", "better") else "muted" if verdict else ""
            classes.append(["", "text", "text", "", "", css, css])
    return rows, classes


def metrics_section(report: dict[str, Any]) -> str | None:
    rows, classes = metric_table_rows(report)
    if not rows:
        return _section("Metrics", '<p class="muted">no evaluations in this recipe</p>', "metrics")
    note = ('<p class="muted">± is the standard error; a change is marked only when it exceeds the standard error '
            'of the difference. Perplexity has no standard error here: any change is marked.</p>')
    header = ["metric", "data set / task", "protocol", "baseline", "compressed", "change", "verdict"]
    return _section("Metrics", _table(header, rows, classes) + note, "metrics")


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
    "startup": ("start-up (interpreter, imports, recipe, output checks)", {}),
    "load": ("load the model", {"calibration_data": "of which calibration data (read, tokenize, sample)"}),
    "baseline_eval": ("baseline evaluation", {}),
    "continuations": ("continuations (baseline before the passes, compressed after)", {}),
    "passes": ("passes", {"propagation": "of which calibration forwards between layers"}),
    "save": ("write what is outside the layers (lazy)", {}),
    "eval": ("final evaluation", {}),
    "export": ("save the run state and the export", {}),
    "report": ("write report.md and report.html", {}),
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
            for entry in report.get("passes", []):
                rows.append(row(f"  {entry.get('name', '?')}", float(entry.get("seconds", 0))))
                rows += [row(f"    {part}", float(value)) for part, value in entry.get("seconds_by_part", {}).items()]
        rows += [row(f"  {sub_label}", timings[sub]) for sub, sub_label in subs.items() if sub in timings]
    extra = [name for name in timings if name not in PHASES and name not in inner and name != "total"]
    rows += [row(name.replace("_", " "), timings[name]) for name in extra]
    covered = sum(timings[name] for name in [*PHASES, *extra] if name in timings)
    rows.append(row("other (report.json, between phases)", max(0.0, timings.get("total", 0) - covered)))
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


# ---------------------------------------------------------------------------------------------------
# Where the damage is, where the bytes are, what the model now says

# Per-module numbers the passes report, drawn as small multiples: (field, what the chart calls it).
DAMAGE_FIELDS = (("gptq_loss", "GPTQ loss"), ("weight_rel_error", "relative weight error"),
                 ("sparsity", "sparsity achieved"), ("awq_output_mse", "AWQ output MSE"))


def _short_kind(kind: str) -> str:
    return kind.rpartition(".")[2]  # "self_attn.q_proj" -> "q_proj"


def module_heatmap(values: dict[str, float], title: str) -> str | None:
    """Layers x module kinds as an SVG heatmap, each cell titled with the module's full name."""
    layers, kinds, grid = layer_grid(values)
    if not layers:
        return None
    prefix = {fqn[: m.start()] for fqn in values if (m := _LAYER_MODULE.search(fqn))}
    root = next(iter(prefix)) if len(prefix) == 1 else ""
    names = [[f"{root}.{layer}.{kind}" for kind in kinds] for layer in layers]
    return heatmap_svg(title, [str(layer) for layer in layers], [_short_kind(k) for k in kinds], grid, names=names)


def layer_strip(layers: dict[str, dict[str, Any]], title: str) -> str | None:
    """One column: each decoder layer's output error against the uncompressed layer."""
    cells = sorted((int(m.group(1)), float(e["output_rel_error"]), name) for name, e in layers.items()
                   if (m := re.search(r"\.(\d+)$", name)) and isinstance(e.get("output_rel_error"), (int, float)))
    if not cells:
        return None
    return heatmap_svg(title, [str(layer) for layer, _, _ in cells], ["layer out"], [[value] for _, value, _ in cells],
                       names=[[name] for _, _, name in cells])


def worst_modules(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The ten most damaged modules: by measured output error when the run has one, else by weight error."""
    damage = _damage(report)
    if damage.get("worst"):
        return "output_rel_error", damage["worst"]
    ranked = sorted(((float(result["weight_rel_error"]), fqn, entry.get("name", "?"))
                     for entry in report.get("passes", []) for fqn, result in (entry.get("modules") or {}).items()
                     if isinstance(result, dict) and isinstance(result.get("weight_rel_error"), (int, float))),
                    reverse=True)
    return "weight_rel_error", [{"module": fqn, "weight_rel_error": error, "passes": name} for error, fqn, name in ranked[:10]]


def _damage(report: dict[str, Any]) -> dict[str, Any]:
    found = report.get("damage")
    return found if isinstance(found, dict) else {}


def damage_charts(report: dict[str, Any]) -> list[str]:
    """The small multiples: measured output errors per sweep, then each per-module number each pass reported."""
    charts: list[str] = []
    damage = _damage(report)
    for sweep in damage.get("sweeps", []):
        label = ", ".join(sweep.get("passes", []))
        errors = {fqn: float(e["output_rel_error"]) for fqn, e in sweep.get("modules", {}).items()
                  if isinstance(e.get("output_rel_error"), (int, float))}
        charts += [c for c in (module_heatmap(errors, f"output error after {label}"),
                               layer_strip(sweep.get("layers", {}), "layer output error")) if c]
    for entry in report.get("passes", []):
        for field, title in DAMAGE_FIELDS:
            values = {fqn: float(r[field]) for fqn, r in (entry.get("modules") or {}).items()
                      if isinstance(r, dict) and isinstance(r.get(field), (int, float)) and not isinstance(r.get(field), bool)}
            chart = module_heatmap(values, f"{title} ({entry.get('name', '?')})")
            if chart:
                charts.append(chart)
    return charts


def damage_section(report: dict[str, Any]) -> str | None:
    charts = damage_charts(report)
    field, worst = worst_modules(report)
    if not charts and not worst:
        return None
    damage = _damage(report)
    measured = (f'<p class="muted">Output error = ||compressed - uncompressed|| / ||uncompressed|| of each module\'s '
                f'and each layer\'s output, measured on {html.escape(str(damage["measured_on"]))}.</p>'
                if damage.get("measured_on") else
                '<p class="muted">No pass in this run calibrated, so no output error was measured; the relative '
                'weight error ||W - W_compressed|| / ||W|| stands in.</p>')
    rows = [[str(i + 1), str(item["module"]), f"{float(item[field]):.4g}", str(item.get("passes", ""))]
            for i, item in enumerate(worst)]
    table = _table(["#", "module", field.replace("_", " "), "pass"], rows, [["", "text", "", "text"]] * len(rows))
    body = measured + f'<div class="multiples">{"".join(charts)}</div><h3>Worst {len(rows)} modules</h3>{table}'
    return _section("Where the damage is", body, "damage")


def _bytes_of(bits: dict[str, int]) -> dict[str, float]:
    return {part: value / 8 for part, value in bits.items() if value}


def byte_rows(size: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Bars for the byte chart: per part of the model, before and after, largest first; then the two totals."""
    after = size.get("stored_bits_by_part") or {}
    before = size.get("baseline_bits_by_part") or {}
    names = sorted(set(after) | set(before), key=lambda n: -sum((before.get(n) or after.get(n) or {}).values()))
    rows: list[tuple[str, dict[str, float]]] = []
    for name in names:
        if name in before:
            rows.append((f"{name} before", _bytes_of(before[name])))
        rows.append((f"{name} after", _bytes_of(after.get(name, {}))))
    def total(by_part: dict[str, dict[str, int]]) -> dict[str, float]:
        return {part: sum(bits.get(part, 0) for bits in by_part.values()) / 8 for part in SIZE_PARTS}
    if before:
        rows.append(("total before", total(before)))
    rows.append(("total after", total(after)))
    return rows


def bytes_section(report: dict[str, Any]) -> str | None:
    size = report.get("size") or {}
    by_part = size.get("stored_bits_by_part")
    if not by_part:
        return None
    total_bytes = sum(sum(bits.values()) for bits in by_part.values()) // 8  # as size.bytes: bits summed, then floored
    chart = stacked_bars_svg("bytes by part of the model, before and after", byte_rows(size))
    rows = []
    baseline = size.get("baseline_bits_by_part") or {}
    for name in sorted(by_part, key=lambda n: -sum(by_part[n].values())):
        bits = by_part[name]
        rows.append([name, f"{sum(baseline.get(name, {}).values()) // 8:,}" if baseline else "—",
                     f"{sum(bits.values()) // 8:,}", *[f"{bits.get(p, 0) / 8:,.0f}" for p in ("codes", "scales", "zero_points")],
                     f"{sum(v for p, v in bits.items() if p not in ('codes', 'scales', 'zero_points')) / 8:,.0f}"])
    table = _table(["part", "bytes before", "bytes after", "codes", "scales", "zero points", "other (unquantized, tables, ...)"],
                   rows, [["text", "", "", "", "", "", ""]] * len(rows))
    note = (f'<p>Total after: <strong data-total-bytes="{total_bytes}">{total_bytes:,} bytes</strong> of tensors, '
            f'what <code>compress inspect</code> reports as <code>bytes</code> for an export in the run\'s own layout '
            '(bytes on disk less the safetensors header and the format extras it itemises).</p>')
    return _section("Where the bytes are", note + chart + table, "bytes")


def _token_spans(pieces: list[str], tokens: list[int], other: list[int]) -> str:
    """Each token as a span; one that differs from the other side's token at that position is marked."""
    spans = []
    for i, (piece, token) in enumerate(zip(pieces, tokens)):
        differs = i >= len(other) or other[i] != token
        spans.append(f'<span class="diff">{html.escape(piece)}</span>' if differs else html.escape(piece))
    return "".join(spans)


def continuations_section(report: dict[str, Any]) -> str | None:
    said = report.get("continuations")
    if not isinstance(said, dict) or not said.get("prompts"):
        return None
    blocks = []
    for item in said["prompts"]:
        before, after = item["baseline"], item["compressed"]
        agree = "".join(f'<i class="{"" if a else "no"}" title="position {i}: {"same" if a else "different"} top-1"></i>'
                        for i, a in enumerate(item.get("top1_agreement", [])))
        share = item.get("agreement")
        blocks.append(
            f'<div class="said"><div class="prompt">{html.escape(item["prompt"])}</div>'
            f'<div><strong>baseline</strong><div class="tokens">{_token_spans(before["pieces"], before["tokens"], after["tokens"])}</div></div>'
            f'<div><strong>compressed</strong><div class="tokens">{_token_spans(after["pieces"], after["tokens"], before["tokens"])}</div></div>'
            f'<div class="agree" aria-label="top-1 agreement per position">{agree}</div>'
            f'<div class="muted">top-1 agreement with the baseline continuation: '
            f'{"—" if share is None else f"{share:.0%}"}</div></div>')
    overall = said.get("agreement")
    intro = (f'<p class="muted">{html.escape(str(said.get("decoding")))}, {said.get("new_tokens")} new tokens per prompt; '
             f'prompts: {html.escape(str(said.get("source")))}. Highlighted: tokens that differ from the other side '
             f'at the same position. Squares: whether the compressed model\'s top-1 next token, fed the baseline\'s '
             f'continuation, is the baseline\'s (green) or not (red). Overall: '
             f'{"—" if overall is None else f"{overall:.0%}"}.</p>')
    return _section("What the model now says", intro + "".join(blocks), "continuations")


Section = Callable[[dict[str, Any]], "str | None"]

# The page, top to bottom: each entry renders one <section> from report.json, or None when the run has nothing
# for it. A new chart is one more function here.
SECTIONS: list[Section] = [
    summary_section,
    metrics_section,
    damage_section,
    bytes_section,
    continuations_section,
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


def quality_points(runs: list[tuple[str, dict[str, Any]]]) -> tuple[str, list[tuple[float, float, str]]]:
    """(metric label, [(MiB, compressed value, run)]) for the first metric every run measured, perplexity first."""
    keys: list[tuple[str, str]] = []
    for _, report in runs:
        for metric, per_dataset in report.get("metrics", {}).items():
            keys += [(metric, label) for label in per_dataset if (metric, label) not in keys]
    keys.sort(key=lambda key: key[0] != "perplexity")  # stable: perplexity first, then the rest in run order
    for metric, label in keys:
        points = [(report.get("size", {}).get("bytes", 0) / 2**20, float(value), name) for name, report in runs
                  if isinstance(value := report.get("metrics", {}).get(metric, {}).get(label, {}).get("compressed"),
                                (int, float))]
        if len(points) == len(runs):
            return f"{metric} [{label}]", points
    return "", []


def size_metric_plot(runs: list[tuple[str, dict[str, Any]]]) -> str | None:
    """Quality against size in MiB, one labelled point per run (inline SVG)."""
    label, points = quality_points(runs)
    if len(points) < 2:
        return None
    return scatter_svg(f"{label} against size", points, "size (MiB)", label)


def _run_column(name: str, report: dict[str, Any]) -> str:
    """One run's charts for the side-by-side view: bytes by part, then the damage small multiples."""
    size = report.get("size") or {}
    charts = [stacked_bars_svg("bytes by part", byte_rows(size))] if size.get("stored_bits_by_part") else []
    charts += damage_charts(report)[:2]
    said = report.get("continuations")
    if isinstance(said, dict) and said.get("agreement") is not None:
        charts.append(f'<p>top-1 agreement with the baseline\'s continuations: {said["agreement"]:.0%}</p>')
    body = "".join(charts) or '<p class="muted">no per-part sizes or damage in this report</p>'
    return f'<div><h3>{html.escape(name)}</h3>{body}</div>'


def render_compare_html(runs: list[tuple[str, dict[str, Any]]]) -> str:
    header, rows = compare_rows(runs)
    plot = size_metric_plot(runs)
    body = ["<h1>compress: runs compared</h1>", _table(header, rows),
            _section("Quality against size", plot, "quality-vs-size") if plot else "",
            _section("Side by side", f'<div class="side-by-side">{"".join(_run_column(n, r) for n, r in runs)}</div>',
                     "side-by-side")]
    return _page("compress: runs compared", "\n".join(b for b in body if b))
