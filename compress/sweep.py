"""Sweeps: one base recipe, a grid of `--set` overrides, one or more models; each trial an ordinary run folder.

    recipe: ../recipes/demo.yaml        # base recipe (relative to this file) or a shipped recipe name
    models: [path/a, path/b]            # optional; default: the recipe's own model
    grid:                               # `--set` key -> list of values; the trials are the cartesian product
      passes[0].rtn.bits: [3, 4]
      passes[0].rtn.group_size: [32, 128]
    output: sweeps/demo                 # default: compress-out/sweep-<file stem>
    backend: local                      # local | ray | slurm (the CLI's --backend wins)
    parallel: 1                         # local: trials at once, each in its own process when > 1
    resources: {cpus: 1, gpus: 0}       # per trial: the Ray request and the SLURM array task's request
    slurm: {partition: gpu, time: "04:00:00", setup: ["module load cuda"]}

Layout: `<output>/trials/<id>/` is each trial's run folder (report.json appears only when it finished, so a
re-launched sweep skips exactly the finished trials), `<output>/logs/<id>.log` the SLURM logs, and
`<output>/compare.{md,json}` plus `pareto.png` the comparison written when the trials are done.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from compress.errors import RecipeError, RecipeIssue, UserError
from compress.registry import StrictConfig

Backend = Literal["local", "ray", "slurm"]


class Resources(StrictConfig):
    cpus: int = Field(1, ge=1)
    gpus: float = Field(0, ge=0)
    memory_gb: float | None = Field(None, gt=0)


class SlurmConfig(StrictConfig):
    """Options of the generated `sbatch` array script (one trial per array index)."""

    partition: str | None = None
    time: str = "04:00:00"
    account: str | None = None
    max_parallel: int | None = Field(None, ge=1, description="array throttle: at most this many trials at once")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the trial (module load, venv)")
    python: str | None = Field(None, description="interpreter on the nodes; default: the one writing the script")
    extra: list[str] = Field(default_factory=list, description="more '#SBATCH ...' lines, verbatim")


class SweepFile(StrictConfig):
    recipe: str
    models: list[str] | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    output: str | None = None
    backend: Backend = "local"
    parallel: int = Field(1, ge=1)
    resources: Resources = Resources()
    slurm: SlurmConfig = SlurmConfig()


@dataclass(frozen=True)
class Trial:
    index: int
    id: str
    model: str | None
    overrides: tuple[str, ...]  # `key=value` as for --set

    def params(self) -> dict[str, Any]:
        return {o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1]) for o in self.overrides}


@dataclass(frozen=True)
class Sweep:
    source: Path
    recipe: Path
    config: SweepFile
    output: Path
    trials: tuple[Trial, ...]

    def trial_dir(self, trial: Trial) -> Path:
        return self.output / "trials" / trial.id

    def finished(self, trial: Trial) -> bool:
        return (self.trial_dir(trial) / "report.json").is_file()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40]


def _short_key(key: str) -> str:
    return key.replace("]", "").split(".")[-1]


def expand_trials(config: SweepFile, base_dir: Path) -> list[Trial]:
    """The cartesian product of models x grid values, in a stable order with readable ids."""
    models: list[str | None] = list(config.models) if config.models else [None]
    keys = list(config.grid)
    trials: list[Trial] = []
    for model in models:
        if model is not None and not Path(model).is_absolute() and (base_dir / model).exists():
            model = str((base_dir / model).resolve())
        for values in itertools.product(*(config.grid[k] for k in keys)):
            overrides = tuple(f"{k}={json.dumps(v)}" for k, v in zip(keys, values))
            label = "-".join(f"{_short_key(k)}{_slug(str(v))}" for k, v in zip(keys, values)) or "base"
            if len(models) > 1:
                label = f"{_slug(Path(model).name if model else 'model')}-{label}"
            trials.append(Trial(len(trials), f"t{len(trials):03d}-{label}", model, overrides))
    return trials


def load_sweep(path: Path, *, output: Path | None = None) -> Sweep:
    """Read and validate a sweep file, and every trial's recipe, before anything runs."""
    from compress.recipe import load_recipe
    from recipes import resolve_recipe_path

    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        config = SweepFile.model_validate(data)
    except ValidationError as exc:
        issues = [RecipeIssue(".".join(str(p) for p in e["loc"]), e["msg"], None) for e in exc.errors()]
        raise RecipeError(str(path), issues) from None
    if any(not values for values in config.grid.values()):
        raise UserError(f"{path}: every grid key needs at least one value")
    recipe_ref = config.recipe if not Path(config.recipe).suffix else str((path.parent / config.recipe))
    recipe = resolve_recipe_path(recipe_ref)
    trials = expand_trials(config, path.parent)
    for trial in trials:  # a typo in the grid fails now, not in trial 37 on the cluster
        load_recipe(recipe, overrides=list(trial.overrides), model=trial.model)
    target = output or (path.parent / config.output if config.output else Path("compress-out") / f"sweep-{path.stem}")
    return Sweep(path.resolve(), Path(recipe).resolve(), config, target.resolve(), tuple(trials))


# ---------------------------------------------------------------------------------------------------
# Running one trial (the same function for every backend)


def run_trial(sweep_file: str, output: str, index: int) -> dict[str, Any]:
    """Run trial `index` of a sweep in this process; returns {id, status, seconds[, error]}. Never raises."""
    sweep = load_sweep(Path(sweep_file), output=Path(output))
    trial = sweep.trials[index]
    if sweep.finished(trial):
        return {"id": trial.id, "status": "skipped"}
    from compress.recipe import load_recipe
    from compress.runner import run_recipe

    start = time.perf_counter()
    try:
        recipe = load_recipe(sweep.recipe, overrides=list(trial.overrides), model=trial.model)
        run_recipe(recipe, sweep.trial_dir(trial), overwrite=True)
        return {"id": trial.id, "status": "ok", "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # one failed trial must not stop the others; it is reported in compare
        return {"id": trial.id, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5), "seconds": round(time.perf_counter() - start, 2)}


def pending(sweep: Sweep) -> list[Trial]:
    return [t for t in sweep.trials if not sweep.finished(t)]


def run_local(sweep: Sweep, parallel: int) -> list[dict[str, Any]]:
    todo = pending(sweep)
    if parallel <= 1:
        return [run_trial(str(sweep.source), str(sweep.output), t.index) for t in todo]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter per worker, no forked torch thread pools
    with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_trial, str(sweep.source), str(sweep.output), t.index) for t in todo]
        return [f.result() for f in futures]


def run_ray(sweep: Sweep, address: str | None) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise UserError("the ray backend needs Ray: pip install 'compress[ray]'") from None
    todo = pending(sweep)
    started_here = not ray.is_initialized()
    if started_here:
        # Embedded local Ray unless an address is given; the repo must be importable by the workers.
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ":".join(p for p in sys.path if p)}})
    try:
        res = sweep.config.resources
        request: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus}
        if res.memory_gb:
            request["memory"] = int(res.memory_gb * 2**30)
        remote = ray.remote(**request)(run_trial)
        refs = [remote.remote(str(sweep.source), str(sweep.output), t.index) for t in todo]
        return list(ray.get(refs))
    finally:
        if started_here:
            ray.shutdown()


def slurm_script(sweep: Sweep) -> str:
    """An sbatch array script: array index i runs trial i (finished trials exit at once), one log per trial."""
    cfg, res = sweep.config.slurm, sweep.config.resources
    count = len(sweep.trials)
    array = f"0-{count - 1}" + (f"%{cfg.max_parallel}" if cfg.max_parallel else "")
    logs = sweep.output / "logs"
    lines = [
        "#!/bin/bash",
        f"# compress sweep {sweep.source.name}: {count} trials, one per array index (generated; edit the sweep file instead)",
        f"#SBATCH --job-name={shlex.quote('compress-' + sweep.source.stem)}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={logs}/%a.log",
        f"#SBATCH --error={logs}/%a.log",
        f"#SBATCH --time={cfg.time}",
        f"#SBATCH --cpus-per-task={res.cpus}",
    ]
    if res.gpus:
        lines.append(f"#SBATCH --gpus-per-task={int(res.gpus) if res.gpus == int(res.gpus) else res.gpus}")
    if res.memory_gb:
        lines.append(f"#SBATCH --mem={int(res.memory_gb)}G")
    if cfg.partition:
        lines.append(f"#SBATCH --partition={cfg.partition}")
    if cfg.account:
        lines.append(f"#SBATCH --account={cfg.account}")
    lines += list(cfg.extra)
    python = cfg.python or sys.executable
    lines += ["", "set -euo pipefail", *cfg.setup,
              f"cd {shlex.quote(str(Path.cwd()))}",
              "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}",
              f"{shlex.quote(python)} -m cli.main sweep {shlex.quote(str(sweep.source))} "
              f"--output {shlex.quote(str(sweep.output))} --only \"$SLURM_ARRAY_TASK_ID\"", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Comparison


def collect(sweep: Sweep, statuses: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per trial from its report.json: parameters, size, bits per weight, metrics, time, status."""
    rows = []
    for trial in sweep.trials:
        row: dict[str, Any] = {"id": trial.id, "model": trial.model, "params": trial.params()}
        report_path = sweep.trial_dir(trial) / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text(encoding="utf-8"))
            row.update(
                status="ok",
                model=report["model"]["name"],
                bytes=report["size"]["bytes"],
                bits_per_weight=report["size"]["bits_per_weight"],
                metrics={f"{metric}/{label}": values["compressed"]
                         for metric, per in report["metrics"].items() for label, values in per.items()},
                baseline={f"{metric}/{label}": values["baseline"]
                          for metric, per in report["metrics"].items() for label, values in per.items()},
                seconds=report["timings"]["total"],
                run_dir=str(sweep.trial_dir(trial)),
            )
        else:
            status = (statuses or {}).get(trial.id, {})
            row.update(status=status.get("status", "pending"), error=status.get("error"))
        rows.append(row)
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and metric (lower is better for both)."""
    front = []
    for i, (size, value) in enumerate(points):
        dominated = any(
            (s <= size and v <= value) and (s < size or v < value) for j, (s, v) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def render_compare(rows: list[dict[str, Any]]) -> str:
    metric_names = sorted({m for r in rows for m in r.get("metrics", {})})
    param_names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    header = ["trial", "model", *param_names, "status", "MiB", "bits/weight", *metric_names, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ok = r["status"] == "ok"
        cells = [r["id"], Path(str(r["model"])).name if r["model"] else "—",
                 *[str(r["params"].get(p, "—")) for p in param_names], r["status"],
                 f"{r['bytes'] / 2**20:.2f}" if ok else "—", str(r["bits_per_weight"]) if ok else "—",
                 *[f"{r['metrics'][m]:.4f}" if ok and m in r["metrics"] else "—" for m in metric_names],
                 f"{r['seconds']:.1f}" if ok else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    lines += [""] + [f"- {r['id']} failed: {r.get('error')}" for r in failed]
    return "\n".join(lines).rstrip() + "\n"


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Size vs. each metric, Pareto front joined; None when matplotlib is missing (compare.md still has it all)."""
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
        have = [r for r in done if metric in r["metrics"]]
        points = [(r["bytes"] / 2**20, r["metrics"][metric]) for r in have]
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for r, (x, y) in zip(have, points):
            ax.annotate(r["id"].split("-", 1)[-1], (x, y), fontsize=7)
        front = sorted(points[i] for i in pareto_front(points))
        ax.plot([p[0] for p in front], [p[1] for p in front], "r-", label="Pareto front")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_compare(sweep: Sweep, statuses: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    rows = collect(sweep, statuses)
    sweep.output.mkdir(parents=True, exist_ok=True)
    (sweep.output / "compare.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (sweep.output / "compare.md").write_text(
        f"# sweep {sweep.source.name}\n\nbase recipe: {sweep.recipe}\n\n" + render_compare(rows), encoding="utf-8")
    plot_pareto(rows, sweep.output / "pareto.png")
    return rows
