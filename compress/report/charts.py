"""Inline SVG charts for report.html, drawn from the numbers themselves: no JavaScript, no plotting library, a few
kilobytes per chart, crisp in print. Each cell, bar and point carries a <title> (the browser shows it on hover)
and the values it was drawn from as data- attributes, so a test can read the chart back."""

from __future__ import annotations

import html
import math
from typing import Sequence

FONT = 'font-family="system-ui, sans-serif" font-size="11"'
# Stored parts (compress/report/summary.py SIZE_PARTS), each its own colour in every byte chart.
PART_COLOURS = {"codes": "#3b6fb6", "scales": "#e39b2d", "zero_points": "#7a4ea3", "codebooks": "#2c9c8f",
                "outliers": "#c2410c", "low_rank": "#5b8c3a", "metadata": "#8d6e63", "unquantized": "#9aa5b1"}


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def number_text(value: float) -> str:
    if value != value:
        return "—"
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def heat_colour(fraction: float) -> str:
    """White (0) through amber to dark red (1): darker is worse."""
    fraction = min(1.0, max(0.0, fraction))
    stops = [(255, 255, 255), (253, 204, 138), (227, 74, 51), (127, 0, 0)]
    position = fraction * (len(stops) - 1)
    low = min(int(position), len(stops) - 2)
    t = position - low
    r, g, b = (round(a + (c - a) * t) for a, c in zip(stops[low], stops[low + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_svg(title: str, rows: Sequence[str], columns: Sequence[str], grid: Sequence[Sequence[float]], *,
                row_label: str = "decoder layer", top: float | None = None, names: Sequence[Sequence[str]] | None = None) -> str:
    """Rows x columns of cells shaded by value from 0 to `top` (default: the largest value); NaN cells are blank.

    `names[r][c]` is each cell's hover title (the module's full name); values are written in cells when they fit.
    """
    finite = [v for line in grid for v in line if v == v and math.isfinite(v)]
    top = top if top is not None else max(finite, default=0.0)
    cell_w, cell_h = 50, 16 if len(rows) > 12 else 20
    left, head = 34, 74
    width = max(left + cell_w * len(columns) + 48, 7 * len(title) + 10, 230)  # the title and scale line fit too
    height = head + cell_h * len(rows) + 24
    parts = [f'<svg class="chart heatmap" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" {FONT}>',
             f'<text x="0" y="12" font-weight="600">{_esc(title)}</text>',
             f'<text x="0" y="28" fill="#666">rows: {_esc(row_label)}</text>']
    for c, column in enumerate(columns):
        x = left + c * cell_w + cell_w / 2
        parts.append(f'<text x="{x:.0f}" y="{head - 4}" text-anchor="start" transform="rotate(-40 {x:.0f} {head - 4})">'
                     f'{_esc(column)}</text>')
    for r, row in enumerate(rows):
        y = head + r * cell_h
        parts.append(f'<text x="{left - 4}" y="{y + cell_h * 0.7:.0f}" text-anchor="end" fill="#444">{_esc(row)}</text>')
        for c, value in enumerate(grid[r]):
            if value != value:
                continue
            fraction = value / top if top and math.isfinite(value) else (1.0 if not math.isfinite(value) else 0.0)
            name = names[r][c] if names else f"{row} {columns[c]}"
            parts.append(f'<rect x="{left + c * cell_w}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" '
                         f'fill="{heat_colour(fraction)}" data-value="{value!r}"><title>{_esc(name)}: '
                         f'{number_text(value)}</title></rect>')
            ink = "#fff" if fraction > 0.6 else "#222"
            parts.append(f'<text x="{left + c * cell_w + cell_w / 2 - 0.5:.1f}" y="{y + cell_h * 0.7:.0f}" '
                         f'text-anchor="middle" fill="{ink}" font-size="9">{number_text(value)}</text>')
    parts.append(f'<text x="0" y="{height - 6}" fill="#666">scale: 0 (white) to {number_text(top)} (dark red)</text>')
    parts.append("</svg>")
    return "".join(parts)


def stacked_bars_svg(title: str, rows: Sequence[tuple[str, dict[str, float]]], *, unit: str = "bytes") -> str:
    """Horizontal bars, one per (label, {part: amount}), each stacked by part in PART_COLOURS order, on one scale.

    Every bar carries `data-total` (its amounts summed); the legend lists the parts that occur.
    """
    totals = [sum(amounts.values()) for _, amounts in rows]
    top = max(totals, default=0.0) or 1.0
    left, bar_w, bar_h, gap = 150, 520, 14, 5
    used = [part for part in PART_COLOURS if any(amounts.get(part) for _, amounts in rows)]
    height = 30 + len(rows) * (bar_h + gap) + 28
    width = left + bar_w + 110
    parts = [f'<svg class="chart bars" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" {FONT}>',
             f'<text x="0" y="12" font-weight="600">{_esc(title)}</text>']
    for i, ((label, amounts), total) in enumerate(zip(rows, totals)):
        y = 24 + i * (bar_h + gap)
        parts.append(f'<g class="bar" data-label="{_esc(label)}" data-total="{total!r}">'
                     f'<text x="{left - 6}" y="{y + bar_h - 3}" text-anchor="end">{_esc(label)}</text>')
        x = float(left)
        for part in PART_COLOURS:
            amount = amounts.get(part, 0)
            if not amount:
                continue
            w = bar_w * amount / top
            parts.append(f'<rect x="{x:.2f}" y="{y}" width="{max(w, 0.5):.2f}" height="{bar_h}" fill="{PART_COLOURS[part]}" '
                         f'data-part="{part}" data-amount="{amount!r}"><title>{_esc(label)}, {part}: '
                         f'{number_text(amount)} {unit}</title></rect>')
            x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + bar_h - 3}" fill="#444">{number_text(total)}</text></g>')
    legend_y = height - 10
    for i, part in enumerate(used):
        x = left + i * 95
        parts.append(f'<rect x="{x}" y="{legend_y - 9}" width="10" height="10" fill="{PART_COLOURS[part]}"/>'
                     f'<text x="{x + 14}" y="{legend_y}">{part.replace("_", " ")}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(title: str, points: Sequence[tuple[float, float, str]], xlabel: str, ylabel: str) -> str:
    """Labelled points (x, y, name) on linear axes padded 8% each side, with four ticks per axis."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    def span(values: list[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        pad = (high - low) * 0.08 or abs(high) * 0.05 or 1.0
        return low - pad, high + pad
    (x0, x1), (y0, y1) = span(xs), span(ys)
    left, top, w, h = 64, 24, 480, 280
    width, height = left + w + 160, top + h + 44
    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w
    def py(y: float) -> float:
        return top + h - (y - y0) / (y1 - y0) * h
    parts = [f'<svg class="chart scatter" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" {FONT}>',
             f'<text x="0" y="12" font-weight="600">{_esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{px(xv):.0f}" y="{top + h + 14}" text-anchor="middle" fill="#444">{number_text(xv)}</text>'
                     f'<text x="{left - 4}" y="{py(yv) + 4:.0f}" text-anchor="end" fill="#444">{number_text(yv)}</text>')
    parts.append(f'<text x="{left + w / 2:.0f}" y="{height - 6}" text-anchor="middle">{_esc(xlabel)}</text>'
                 f'<text x="12" y="{top + h / 2:.0f}" transform="rotate(-90 12 {top + h / 2:.0f})" '
                 f'text-anchor="middle">{_esc(ylabel)}</text>')
    for x, y, name in points:
        parts.append(f'<g class="point" data-x="{x!r}" data-y="{y!r}"><circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" '
                     f'fill="#3b6fb6"><title>{_esc(name)}: {number_text(x)}, {number_text(y)}</title></circle>'
                     f'<text x="{px(x) + 7:.1f}" y="{py(y) - 6:.1f}">{_esc(name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
