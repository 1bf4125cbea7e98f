"""A sweep's comparison: one row per trial, the Pareto front of size vs. each metric, compare.{md,json}, pareto.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from compress.app.sweep import Status, Sweep, Trial

# Every other metric we report (acc, acc_norm, lm_eval_exact_match, ...) is a score: higher is better.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")


def higher_is_better(metric: str) -> bool:
    """For a compare column such as "perplexity/eval" or "acc/piqa"."""
    name = metric.split("/", 1)[0]
    return not any(word in name for word in LOWER_IS_BETTER)


def pareto_front(points: list[tuple[float, float]], *, higher_is_better: bool = False) -> list[int]:
    """Indices of the (size, metric) points that no other point dominates.

    A point dominates another when its size is no larger and its metric no worse, and one of them strictly
    better. Smaller size is always better; the metric's direction is `higher_is_better`. Points with a
    non-finite metric (a trial whose perplexity diverged) are never on the front and dominate nothing.
    """
    sign = -1.0 if higher_is_better else 1.0
    keyed = [(size, sign * value) for size, value in points]  # now lower is better on both axes
    usable = [i for i, (_, value) in enumerate(keyed) if math.isfinite(value)]
    front = []
    for i in usable:
        size, value = keyed[i]
        dominated = any(keyed[j][0] <= size and keyed[j][1] <= value and (keyed[j][0] < size or keyed[j][1] < value)
                        for j in usable if j != i)
        if not dominated:
            front.append(i)
    return front


def _finite_or_none(value: Any) -> Any:
    # NaN and Infinity are not JSON; a diverged metric is recorded as null
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _row(sweep: Sweep, trial: Trial, status: Status | None) -> dict[str, Any]:
    row: dict[str, Any] = {"id": trial.id, "index": trial.index, "model": trial.model, "params": trial.params(),
                           "launch": status.get("status") if status else None}
    state = sweep.state(trial)
    if state != "finished":
        failed = status is not None and status.get("status") == "failed"
        row.update(status="failed" if failed else state, error=status.get("error") if status and failed else None)
        return row
    report = json.loads((sweep.trial_dir(trial) / "report.json").read_text(encoding="utf-8"))
    per_dataset = [(f"{metric}/{label}", values) for metric, per in report["metrics"].items() for label, values in per.items()]
    row.update(
        status="ok",
        model=report["model"]["name"],
        bytes=report["size"]["bytes"],
        bits_per_weight=report["size"]["bits_per_weight"],
        metrics={name: _finite_or_none(values["compressed"]) for name, values in per_dataset},
        baseline={name: _finite_or_none(values["baseline"]) for name, values in per_dataset},
        seconds=report["timings"]["total"],
        run_dir=str(sweep.trial_dir(trial)),
        pareto=[],
    )
    return row


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Each finished row's `pareto`: the metrics for which it is on the front of size vs. that metric."""
    done = [r for r in rows if r["status"] == "ok"]
    for metric in sorted({m for r in done for m in r["metrics"]}):
        have = [r for r in done if r["metrics"].get(metric) is not None]
        points = [(float(r["bytes"]), float(r["metrics"][metric])) for r in have]
        for i in pareto_front(points, higher_is_better=higher_is_better(metric)):
            have[i]["pareto"].append(metric)


def collect(sweep: Sweep, statuses: dict[str, Status] | None = None) -> list[dict[str, Any]]:
    """One row per trial from its report.json: parameters, size, bits per weight, metrics, time, status.

    `status` is the trial's state (ok, failed, pending, stale: finished with another recipe); `launch` is what
    this launch did with it (ok, failed, skipped; null when nothing was launched).
    """
    rows = [_row(sweep, trial, (statuses or {}).get(trial.id)) for trial in sweep.trials]
    mark_pareto(rows)
    return rows


def render_compare(rows: list[dict[str, Any]]) -> str:
    metric_names = sorted({m for r in rows for m in r.get("metrics", {})})
    param_names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    arrows = {m: "↑" if higher_is_better(m) else "↓" for m in metric_names}
    header = ["trial", "model", *param_names, "status", "MiB", "bits/weight", *(f"{m} {arrows[m]}" for m in metric_names),
              "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ok = r["status"] == "ok"

        def metric_cell(m: str) -> str:
            value = r["metrics"].get(m) if ok else None
            return "—" if value is None else f"{value:.4f}" + ("*" if m in r["pareto"] else "")

        cells = [r["id"], Path(str(r["model"])).name if r["model"] else "—",
                 *[str(r["params"].get(p, "—")) for p in param_names], r["status"],
                 f"{r['bytes'] / 2**20:.2f}" if ok else "—", str(r["bits_per_weight"]) if ok else "—",
                 *[metric_cell(m) for m in metric_names],
                 f"{r['seconds']:.1f}" if ok else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: on the Pareto front of size vs. that metric (no other trial is both smaller and better)."]
    lines += [f"- {r['id']} failed: {r.get('error')}" for r in rows if r["status"] == "failed"]
    return "\n".join(lines).rstrip() + "\n"


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Size vs. each metric, one panel per metric, Pareto front joined; None without matplotlib or metrics."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [r for r in rows if r["status"] == "ok"]
    metric_names = sorted({m for r in done for m in r["metrics"]})
    if not done or not metric_names:
        return None
    fig, axes = plt.subplots(1, len(metric_names), figsize=(5 * len(metric_names), 4), squeeze=False)
    for ax, metric in zip(axes[0], metric_names):
        have = [r for r in done if r["metrics"].get(metric) is not None]
        points = [(r["bytes"] / 2**20, r["metrics"][metric]) for r in have]
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for r, (x, y) in zip(have, points):
            ax.annotate(r["id"].split("-", 1)[-1], (x, y), fontsize=7)
        front = sorted(p for r, p in zip(have, points) if metric in r["pareto"])
        ax.plot([p[0] for p in front], [p[1] for p in front], "r-", label="Pareto front")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_compare(sweep: Sweep, statuses: dict[str, Status] | None = None) -> list[dict[str, Any]]:
    rows = collect(sweep, statuses)
    sweep.output.mkdir(parents=True, exist_ok=True)
    (sweep.output / "compare.json").write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (sweep.output / "compare.md").write_text(
        f"# sweep {sweep.source.name}\n\nbase recipe: {sweep.recipe}\n\n" + render_compare(rows), encoding="utf-8")
    plot_pareto(rows, sweep.output / "pareto.png")
    return rows
