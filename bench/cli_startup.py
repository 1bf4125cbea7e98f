"""What a quick command costs: `compress validate` of a recipe with a typo, `--help` and `recipes list`, whole process.

    python bench/cli_startup.py            # writes bench/results/cli_startup.md

Each command runs REPEATS times as a fresh process (stdout and stderr to a pipe, as in a script); the table gives
the median wall time and the median CPU time (user + system, from the child's rusage), and what `import torch`
alone costs, which every command paid before the registry stopped importing the passes to validate them. On a
shared machine wall time is CPU time stretched by the load, so CPU time is the figure to compare across machines.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPEATS = 7
TYPO = "model: some/model\npasses:\n  - gptq: {bits: 4, gropu_size: 128}\n"


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit code) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def measure(name: str, command: list[str], cwd: Path, env: dict[str, str]) -> str:
    runs = [timed(command, cwd, env) for _ in range(REPEATS)]
    codes = sorted({code for _, _, code in runs})
    wall = statistics.median(w for w, _, _ in runs)
    cpu = statistics.median(c for _, c, _ in runs)
    return f"| {name} | {wall:.2f} | {cpu:.2f} | {', '.join(map(str, codes))} |"


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "compress.cli.main"]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        (cwd / "typo.yaml").write_text(TYPO)
        rows = [
            measure("`compress validate typo.yaml` (exit 2, the typo named by line)", [*cli, "validate", "typo.yaml"], cwd, env),
            measure("`compress validate mixed-precision` (a valid shipped recipe)", [*cli, "validate", "mixed-precision"], cwd, env),
            measure("`compress validate recipes/demo.yaml`", [*cli, "validate", str(REPO / "recipes" / "demo.yaml")], cwd, env),
            measure("`compress --help`", [*cli, "--help"], cwd, env),
            measure("`compress recipes list`", [*cli, "recipes", "list"], cwd, env),
            measure("`python -c 'import torch, transformers'` (what each command paid before)",
                    [sys.executable, "-c", "import torch, transformers"], cwd, env),
            measure("`python -c pass` (the interpreter alone)", [sys.executable, "-c", "pass"], cwd, env),
        ]
    load_end = os.getloadavg()[0]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        "## Command start-up: validate without torch",
        "",
        f"- date: {now}; command: `python bench/cli_startup.py`",
        f"- machine: {platform.machine()}, `nproc` = {os.cpu_count()}; load average (1 min) at start / end: "
        f"{load_start:.1f} / {load_end:.1f}" + (" — **shared machine: wall times are stretched by the load**"
                                                 if max(load_start, load_end) > 1 else ""),
        f"- python {platform.python_version()}; median of {REPEATS} fresh processes each, stdout/stderr to a pipe",
        "",
        "| command | wall (s) | CPU user+sys (s) | exit code |",
        "|---|---:|---:|---|",
        *rows,
        "",
        "No quick command imports torch or transformers (tests/core/test_lean_import.py checks `sys.modules` after "
        "validating every shipped recipe and a broken one): the registry knows each pass's config from "
        "compress/compressors/configs.py and imports the pass itself only when a run needs it.",
    ])
    out = REPO / "bench" / "results" / "cli_startup.md"
    out.write_text(section + "\n", encoding="utf-8")
    print(section)


if __name__ == "__main__":
    main()
