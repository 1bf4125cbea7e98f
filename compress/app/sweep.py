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

Layout: `<output>/trials/<id>/` is each trial's run folder. It appears only when the trial finished (the runner
builds it in a hidden sibling and renames it), and its report.json records the recipe that ran, so a
re-launched sweep skips exactly the trials that finished with the recipe they would run now; a trial killed
half-way resumes from its layer checkpoints. `<output>/logs/tNNN.log` holds the log of trial NNN when it ran
in a process of its own (local with parallel > 1, SLURM), and `<output>/compare.{md,json}` plus `pareto.png`
the comparison written when the trials are done (compress/app/sweep_compare.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError

from compress.engine.checkpoint import checkpoint_dir_for, model_files_fingerprint, recipe_fingerprint, resume_refusal
from compress.engine.output import OutputBusy, hold_output
from compress.recipe.errors import RecipeError, RecipeIssue, UserError
from compress.recipe.reading import YamlProblems, read_text_file
from compress.recipe.schema import describe_pydantic_error, format_loc, line_of, load_yaml_with_marks, split_key_path
from compress.recipe.registry import StrictConfig

Backend = Literal["local", "ray", "slurm"]
TrialState = Literal["finished", "stale", "pending"]
Status = dict[str, Any]  # one trial's outcome in this launch: {id, index, status: ok|failed|skipped, seconds, error, log}
OnResult = Callable[[Status], None]
MAX_TRIALS = 1_000  # each trial's recipe is validated at load; a grid past this is a typo or a job for several files
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `compress` package that trial processes import


class Resources(StrictConfig):
    cpus: int = Field(1, ge=1, le=4096)
    gpus: float = Field(0, ge=0, le=1024)
    memory_gb: float | None = Field(None, gt=0, le=10**7)


class SlurmConfig(StrictConfig):
    """Options of the generated `sbatch` array script (one trial per array index)."""

    partition: str | None = None
    time: str = "04:00:00"
    account: str | None = None
    max_parallel: int | None = Field(None, ge=1, le=MAX_TRIALS, description="array throttle: at most this many trials at once")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the trial (module load, venv)")
    python: str | None = Field(None, description="interpreter on the nodes; default: the one writing the script")
    extra: list[str] = Field(default_factory=list, description="more '#SBATCH ...' lines, verbatim")


class SweepFile(StrictConfig):
    recipe: str
    models: list[str] | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    output: str | None = None
    backend: Backend = "local"
    parallel: int = Field(1, ge=1, le=256)
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
    fingerprints: tuple[str, ...]  # per trial: fingerprint of its resolved recipe, what a finished run must match
    use_cache: bool = True  # trials read and write the user's cache (baseline metrics, token ids); --no-cache: not

    def trial_dir(self, trial: Trial) -> Path:
        return self.output / "trials" / trial.id

    def log_path(self, trial: Trial) -> Path:
        # the index, not the id: SLURM names its logs from the array index (`t%3a.log` is `t007.log`)
        return self.output / "logs" / f"t{trial.index:03d}.log"

    def state(self, trial: Trial) -> TrialState:
        """`finished` only when the run folder's report records the recipe this trial would run now."""
        report = self.trial_dir(trial) / "report.json"
        if not report.is_file():
            return "pending"
        try:
            ran = json.loads(report.read_text(encoding="utf-8"))["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            return "stale"
        return "finished" if recipe_fingerprint(ran) == self.fingerprints[trial.index] else "stale"

    def finished(self, trial: Trial) -> bool:
        return self.state(trial) == "finished"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40]


def _short_key(key: str) -> str:
    return key.replace("]", "").split(".")[-1]


def trial_count(config: SweepFile) -> int:
    """How many trials `config` makes, counted without making them (a grid of 10 keys x 10 values is 10^10)."""
    return max(len(config.models or []), 1) * math.prod(len(values) for values in config.grid.values())


def expand_trials(config: SweepFile, base_dir: Path) -> list[Trial]:
    """The cartesian product of models x grid values, in a stable order with readable ids.

    An id depends only on the trial's own model and values, not on its position, so adding a value to the grid
    later keeps the finished trials' folders (a re-launch skips them) instead of renumbering everything.
    """
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
            trials.append(Trial(len(trials), label, model, overrides))
    counts = Counter(t.id for t in trials)
    # labels are cut to readable lengths; where two collide, a digest of the trial's own settings tells them apart
    return [t if counts[t.id] == 1 else replace(t, id=f"{t.id}-{_digest(t)}") for t in trials]


def _digest(trial: Trial) -> str:
    return hashlib.sha256(json.dumps([trial.model, list(trial.overrides)]).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------------
# Loading: every problem is reported against the sweep file's own lines, before anything runs


def _issue(root: yaml.Node | None, loc: tuple[str | int, ...], message: str) -> RecipeIssue:
    # line 1 when the key is absent (or the file empty): the problem is with the file as a whole
    return RecipeIssue(format_loc(loc), message, line_of(root, loc) or 1)


def _read_sweep_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    try:
        data, root = load_yaml_with_marks(read_text_file(path, kind="sweep file"))
    except YamlProblems as exc:
        raise RecipeError(str(path), exc.issues, kind="sweep file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [RecipeIssue("", f"expected a mapping at the top level, got {type(data).__name__}", 1)],
                          kind="sweep file")
    return data, root


def _validate_sweep_file(path: Path, data: dict[str, Any], root: yaml.Node | None) -> SweepFile:
    """The sweep file's own schema; every problem at once, each at its line."""
    grid = data.get("grid")
    issues = [_issue(root, ("grid", key), "needs at least one value, e.g. [3, 4]")
              for key, values in (grid.items() if isinstance(grid, dict) else []) if isinstance(values, list) and not values]
    config = None
    try:
        config = SweepFile.model_validate(data)
    except ValidationError as exc:
        issues += [_issue(root, tuple(e["loc"]), describe_pydantic_error(e, SweepFile, tuple(e["loc"])))
                   for e in exc.errors()]
    if config is not None and not config.grid and not config.models:  # (a misspelled `grid:` is reported as such)
        issues.append(_issue(root, ("grid",), "nothing to sweep: give `grid:` keys with lists of values, or `models:`"))
    if config is not None and trial_count(config) > MAX_TRIALS:
        issues.append(_issue(root, ("grid",), f"{trial_count(config):,} trials (models x the product of the grid's "
                             f"lists); a sweep runs at most {MAX_TRIALS:,}: split it into several sweep files"))
    if issues or config is None:
        raise RecipeError(str(path), sorted(issues, key=lambda issue: issue.line or 0), kind="sweep file")
    return config


def _base_recipe(path: Path, config: SweepFile, root: yaml.Node | None) -> Path:
    from compress.recipes import resolve_recipe_path

    ref = config.recipe if not Path(config.recipe).suffix else str(path.parent / config.recipe)
    try:
        return resolve_recipe_path(ref)
    except UserError as exc:
        raise RecipeError(str(path), [_issue(root, ("recipe",), str(exc))], kind="sweep file") from None


def _sweep_issue(root: yaml.Node | None, issue: RecipeIssue, config: SweepFile, trial: Trial) -> RecipeIssue:
    """A problem of one trial's recipe that came from the sweep, placed at its grid key or `models` entry."""
    if issue.path == "model" and config.models:
        per_model = math.prod(len(values) for values in config.grid.values())
        return _issue(root, ("models", trial.index // per_model), issue.message)
    for key in sorted(config.grid, key=len, reverse=True):
        try:
            prefix = format_loc(tuple(split_key_path(key.strip())))
        except UserError:
            continue
        if issue.path == prefix:
            return _issue(root, ("grid", key), issue.message)
        if issue.path.startswith((prefix + ".", prefix + "[")):
            return _issue(root, ("grid", key), f"{issue.path}: {issue.message}")
    return _issue(root, ("grid",), f"{issue.path}: {issue.message}")


def _override_error_loc(message: str, config: SweepFile) -> tuple[tuple[str | int, ...], str]:
    """A `--set` that cannot be applied names its key ("--set KEY: index 5 is out of range"); point at that key."""
    for key in config.grid:
        prefix = f"--set {key.strip()}: "
        if message.startswith(prefix):
            return ("grid", key), message[len(prefix):]
        if repr(key.strip()) in message:
            return ("grid", key), message
    return ("grid",), message


def _check_trial_recipes(path: Path, root: yaml.Node | None, config: SweepFile, recipe: Path,
                         trials: list[Trial]) -> tuple[str, ...]:
    """Load every trial's recipe (a typo in the grid fails now, not in trial 37 on the cluster); their fingerprints."""
    import compress.app.builtins  # noqa: F401  (the trials' pass names validate against the built-ins)
    from compress.recipe.schema import load_recipe

    issues: dict[tuple[str, str], RecipeIssue] = {}  # the same bad key fails every trial; list it once
    fingerprints: list[str] = []
    for trial in trials:
        try:
            resolved = load_recipe(recipe, overrides=list(trial.overrides), model=trial.model)
        except RecipeError as exc:
            if any(issue.line is not None for issue in exc.issues):
                raise  # the base recipe itself is wrong; its error names the recipe file and line
            for issue in exc.issues:  # line None: the value came from the sweep (a grid key or a model)
                found = _sweep_issue(root, issue, config, trial)
                issues.setdefault((found.path, found.message), found)
            continue
        except UserError as exc:
            loc, message = _override_error_loc(str(exc), config)
            found = _issue(root, loc, message)
            issues.setdefault((found.path, found.message), found)
            continue
        fingerprints.append(recipe_fingerprint(resolved.to_dict()))
    if issues:
        raise RecipeError(str(path), list(issues.values()), kind="sweep file")
    return tuple(fingerprints)


def load_sweep(path: Path, *, output: Path | None = None, use_cache: bool = True) -> Sweep:
    """Read and validate a sweep file, and every trial's recipe, before anything runs.

    Raises RecipeError (a UserError) whose lines point into the sweep file: `sweep.yaml:4 grid.passes[0].rtn.bitz: ...`.
    """
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    data, root = _read_sweep_yaml(path)
    config = _validate_sweep_file(path, data, root)
    recipe = _base_recipe(path, config, root)
    trials = expand_trials(config, path.parent)
    fingerprints = _check_trial_recipes(path, root, config, recipe, trials)
    target = output or (path.parent / config.output if config.output else Path("compress-out") / f"sweep-{path.stem}")
    return Sweep(path.resolve(), Path(recipe).resolve(), config, target.resolve(), tuple(trials), fingerprints,
                 use_cache)


def pending(sweep: Sweep) -> list[Trial]:
    return [t for t in sweep.trials if not sweep.finished(t)]


# ---------------------------------------------------------------------------------------------------
# Running one trial (the same function for every backend)


def _resume_from_checkpoints(sweep: Sweep, trial: Trial, fingerprint: str, model: str | None) -> bool:
    """A trial killed half-way left layer checkpoints: continue from them if they are this recipe's and the model's
    files are unchanged, else drop them. The caller holds the trial's lock, so they are no live trial's.

    Without this, a re-launched sweep would fail such a trial forever ("an interrupted run left checkpoints").
    """
    folder = checkpoint_dir_for(sweep.trial_dir(trial))
    if not folder.exists():
        return False
    if resume_refusal(folder, fingerprint, model_files_fingerprint(model)) is None:
        return True
    shutil.rmtree(folder, ignore_errors=True)  # made by an older version of this trial's recipe, or another model
    return False


def run_loaded_trial(sweep: Sweep, trial: Trial) -> Status:
    """Run one trial in this process unless it finished already, or another launch is running it. Never raises:
    a failure is a status.

    The trial's folder is locked from the first look at it to the end (`hold_output`), so two launches of one
    sweep share the trials out instead of adopting (or deleting) each other's checkpoints.
    """
    start = time.perf_counter()
    try:
        with hold_output(sweep.trial_dir(trial), "trial folder"):
            return _run_held_trial(sweep, trial, start)
    except OutputBusy as exc:
        return {"id": trial.id, "index": trial.index, "status": "skipped",
                "busy": f"running in another launch: {exc.holder}"}
    except Exception as exc:  # one failed trial must not stop the others; it is reported in compare
        return {"id": trial.id, "index": trial.index, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5), "seconds": round(time.perf_counter() - start, 2)}


def _run_held_trial(sweep: Sweep, trial: Trial, start: float) -> Status:
    if sweep.finished(trial):
        return {"id": trial.id, "index": trial.index, "status": "skipped"}
    from compress.recipe.schema import load_recipe
    from compress.app.runner import run_recipe

    recipe = load_recipe(sweep.recipe, overrides=list(trial.overrides), model=trial.model)
    resume = _resume_from_checkpoints(sweep, trial, recipe_fingerprint(recipe.to_dict()), recipe.model)
    run_recipe(recipe, sweep.trial_dir(trial), overwrite=True, resume=resume, use_cache=sweep.use_cache)
    return {"id": trial.id, "index": trial.index, "status": "ok", "seconds": round(time.perf_counter() - start, 2),
            "resumed": resume}


def run_trial(sweep_file: str, output: str, index: int, use_cache: bool) -> Status:
    """Trial `index` of the sweep file, run here: what a Ray task and a SLURM array task (`--only`) do."""
    sweep = load_sweep(Path(sweep_file), output=Path(output), use_cache=use_cache)
    return run_loaded_trial(sweep, sweep.trials[index])


def _failed(trial: Trial, error: str, **extra: Any) -> Status:
    return {"id": trial.id, "index": trial.index, "status": "failed", "error": error, **extra}


def parse_status(stdout: str) -> Status | None:
    """The status a `compress sweep --only N --json` process printed (its last stdout line), if it got that far."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            status = json.loads(line)
        except ValueError:
            continue
        return status if isinstance(status, dict) and "status" in status else None
    return None


def trial_command(sweep: Sweep, trial: Trial) -> list[str]:
    return [sys.executable, "-m", "compress.cli.main", "sweep", str(sweep.source), "--output", str(sweep.output),
            "--only", str(trial.index), "--json", *([] if sweep.use_cache else ["--no-cache"])]


def trial_env(threads: int) -> dict[str, str]:
    """The environment of a trial process: this checkout importable, and its share of the cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    # N processes that each start a thread per core would oversubscribe the CPU N times over
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


class TrialProcesses:
    """The trial processes running now, so an interrupted sweep can stop them: Ctrl-C reaches every process of the
    terminal's group, but a scheduler's or `kill`'s SIGTERM reaches only this one, which would otherwise wait for
    every running trial to finish before it exits."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()

    def run(self, command: list[str], **options: Any) -> tuple[int, str]:
        """(exit code, stdout) of `command`, tracked while it runs."""
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **options) as process:
            with self._lock:
                self._running.add(process)
            try:
                stdout, _ = process.communicate()
            finally:
                with self._lock:
                    self._running.discard(process)
        return process.returncode, stdout

    def __len__(self) -> int:
        with self._lock:
            return len(self._running)

    def interrupt(self) -> None:
        """SIGTERM to each running trial: it stops as an interrupted run does, keeping its layer checkpoints."""
        with self._lock:
            for process in self._running:
                process.send_signal(signal.SIGTERM)


def run_trial_process(sweep: Sweep, trial: Trial, threads: int, processes: TrialProcesses | None = None) -> Status:
    """Run one trial in a fresh Python process; a crash there (OOM kill, segfault) fails this trial only."""
    log = sweep.log_path(trial)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as stderr:
        returncode, stdout = (processes or TrialProcesses()).run(trial_command(sweep, trial), stderr=stderr,
                                                                 env=trial_env(threads), cwd=Path.cwd())
    status = parse_status(stdout)
    if status is None:
        how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
               else f"exited with code {returncode}")
        status = _failed(trial, f"trial process {how} before reporting a result",
                         seconds=round(time.perf_counter() - start, 2))
    status.pop("traceback", None)  # it is in the log
    return {**status, "log": str(log)}


def run_local(sweep: Sweep, parallel: int, on_result: OnResult | None = None) -> list[Status]:
    """The pending trials one after another in this process, or `parallel` at a time, each in its own process."""
    todo = pending(sweep)
    report = on_result or (lambda status: None)
    if parallel <= 1:
        results = []
        for trial in todo:
            results.append(run_loaded_trial(sweep, trial))
            report(results[-1])
        return results
    threads = max(1, (os.cpu_count() or 1) // parallel)
    processes = TrialProcesses()
    # Threads only wait here; each trial runs in a process of its own.
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run_trial_process, sweep, trial, threads, processes) for trial in todo]
        results = []
        try:
            for future in as_completed(futures):
                results.append(future.result())
                report(results[-1])
        except KeyboardInterrupt:  # leaving the pool waits for its threads: stop the trials they wait for
            for future in futures:
                future.cancel()
            processes.interrupt()
            raise
    return sorted(results, key=lambda status: status["index"])


def ray_request(resources: Resources) -> dict[str, Any]:
    """The per-trial `ray.remote` options: Ray schedules a trial where these CPUs, GPUs and memory are free."""
    request: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus}
    if resources.memory_gb:
        request["memory"] = int(resources.memory_gb * 2**30)
    return request


def ray_init_options(address: str | None) -> dict[str, Any]:
    """`ray.init` options: embedded local Ray when `address` is None, else that cluster ("auto", "ray://host:10001")."""
    # the workers import this checkout, as the driver does
    return {"address": address, "include_dashboard": False, "log_to_driver": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": ":".join(p for p in sys.path if p)}}}


def run_ray(sweep: Sweep, address: str | None, on_result: OnResult | None = None) -> list[Status]:
    try:
        import ray
    except ImportError:
        raise UserError("the ray backend needs Ray: pip install 'compress[ray]'") from None
    todo = pending(sweep)
    report = on_result or (lambda status: None)
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(**ray_init_options(address))
        except ConnectionError as exc:  # a wrong --address or a cluster that is down: the user's to fix
            raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}; check --address "
                            "(`ray status` on the head node prints it)") from None
    try:
        remote = ray.remote(**ray_request(sweep.config.resources))(run_trial)
        refs = [remote.remote(str(sweep.source), str(sweep.output), t.index, sweep.use_cache) for t in todo]
        results = []
        for trial, ref in zip(todo, refs):
            try:
                status = ray.get(ref)
            except Exception as exc:  # the worker died (OOM, segfault) or Ray lost it: this trial failed, not the sweep
                status = _failed(trial, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}")
            results.append(status)
            report(status)
        return results
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------------
# SLURM


def array_spec(indices: list[int], max_parallel: int | None = None) -> str:
    """`--array` value for these trial indices: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8", throttled with "%N"."""
    ranges: list[str] = []
    for _, run in itertools.groupby(enumerate(sorted(indices)), key=lambda pair: pair[1] - pair[0]):
        members = [index for _, index in run]
        ranges.append(str(members[0]) if len(members) == 1 else f"{members[0]}-{members[-1]}")
    return ",".join(ranges) + (f"%{max_parallel}" if max_parallel else "")


def slurm_script(sweep: Sweep, indices: list[int] | None = None) -> str:
    """An sbatch array script: array index i runs trial i, one log per trial (`logs/tNNN.log`).

    `indices` (default: every trial) lets a re-launch queue only the trials that are not finished.
    """
    cfg, res = sweep.config.slurm, sweep.config.resources
    if res.gpus != int(res.gpus):
        raise UserError(f"{sweep.source}: resources.gpus is {res.gpus}, but SLURM allocates whole GPUs; use an integer")
    chosen = list(range(len(sweep.trials))) if indices is None else indices
    logs = sweep.output / "logs"
    lines = [
        "#!/bin/bash",
        f"# compress sweep {sweep.source.name}: {len(chosen)} of {len(sweep.trials)} trials, one per array index "
        "(generated; edit the sweep file instead)",
        f"#SBATCH --job-name={shlex.quote('compress-' + sweep.source.stem)}",
        f"#SBATCH --array={array_spec(chosen, cfg.max_parallel)}",
        f"#SBATCH --output={logs}/t%3a.log",  # %3a: the index zero-padded to 3, as in the trial ids
        f"#SBATCH --error={logs}/t%3a.log",
        f"#SBATCH --time={cfg.time}",
        f"#SBATCH --cpus-per-task={res.cpus}",
    ]
    if res.gpus:
        lines.append(f"#SBATCH --gpus-per-task={int(res.gpus)}")
    if res.memory_gb:
        lines.append(f"#SBATCH --mem={math.ceil(res.memory_gb)}G")
    if cfg.partition:
        lines.append(f"#SBATCH --partition={cfg.partition}")
    if cfg.account:
        lines.append(f"#SBATCH --account={cfg.account}")
    lines += list(cfg.extra)
    python = cfg.python or sys.executable
    lines += ["", "set -euo pipefail", *cfg.setup,
              f"cd {shlex.quote(str(Path.cwd()))}",
              "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}",
              f"{shlex.quote(python)} -m compress.cli.main sweep {shlex.quote(str(sweep.source))} "
              f"--output {shlex.quote(str(sweep.output))} --only \"$SLURM_ARRAY_TASK_ID\""
              + ("" if sweep.use_cache else " --no-cache"), ""]
    return "\n".join(lines)


def parse_job_id(stdout: str) -> str:
    """`sbatch --parsable` prints `<job id>` or `<job id>;<cluster>`."""
    match = re.match(r"\s*(\d+)(?:;\S+)?\s*$", stdout)
    if match is None:
        raise UserError(f"sbatch printed no job id: {stdout.strip()!r}")
    return match.group(1)


def submit_slurm(script: Path) -> str:
    """Submit the array script with sbatch; returns the job id."""
    if shutil.which("sbatch") is None:
        raise UserError("--submit needs `sbatch` on PATH (run this on the cluster's login node)")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_job_id(done.stdout)
