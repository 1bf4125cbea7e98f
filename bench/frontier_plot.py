"""The frontier plot: perplexity and KL divergence against bits per weight, one marker per method, from the tables
bench/frontier.py wrote.

    python bench/frontier_plot.py bench/results/frontier.md [more.md ...] --output bench/results/frontier.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

HEADER_START = "| method | bits | group | bits/weight |"


def rows_of(path: Path) -> tuple[list[str], list[list[str]]]:
    """The table's column names and its data rows (failed rows dropped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER_START))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(columns) and cells[3] not in ("—", ""):
            rows.append(cells)
    return columns, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=Path("bench/results/frontier.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[str, list[tuple[float, float]]]] = {}  # text metric -> method -> (bits, value)
    for table in args.tables:
        columns, rows = rows_of(table)
        metrics = [c for c in columns if c.endswith(" ppl") or c.endswith(" KL")]
        for cells in rows:
            for metric in metrics:
                value = float(cells[columns.index(metric)])
                points.setdefault(metric, {}).setdefault(cells[0], []).append((float(cells[3]), value))
    figure, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4.2), squeeze=False)
    for axis, (metric, methods) in zip(axes[0], points.items()):
        for method, xy in sorted(methods.items()):
            xy.sort()
            axis.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=method)
        axis.set_xlabel("bits per weight (quantized linears, everything counted)")
        axis.set_ylabel(metric)
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
