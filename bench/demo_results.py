"""The README's "Results on the demo model": each shipped recipe run as a user runs it, numbers read from its report.

    python bench/demo_results.py                 # runs every row, writes bench/results/demo_results.md, updates README.md
    python bench/demo_results.py --only gptq-w4  # rerun some rows (the others are kept from demo_results.json)
    python bench/demo_results.py --assemble      # rewrite the section and the README's table from demo_results.json

Every row is `compress run <recipe> [--set ...]` in a subprocess, so the number is what that command prints on this
machine, not a bench harness's re-implementation of it. The table between the README's `<!-- demo-results -->`
markers is this script's output, and tests/test_readme_numbers.py fails when the two differ or when a recipe's
evaluation protocol (the windows it scores) is not the one the table quotes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
SAVED = RESULTS / "demo_results.json"  # raw numbers per row, so --only can refresh a few rows
BEGIN, END = "<!-- demo-results: begin (bench/demo_results.py writes this table) -->", "<!-- demo-results: end -->"


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    recipe: str  # a shipped recipe name
    overrides: tuple[str, ...] = ()
    peer_title: str | None = None  # its row in bench/results/quantization.md (llm-compressor, same windows)

    def command(self) -> list[str]:
        return ["compress", "run", self.recipe, *[part for value in self.overrides for part in ("--set", value)]]


ROWS = [
    Row("rtn-w8", "RTN W8 per channel", "demo", ("passes[0].rtn.bits=8", "passes[0].rtn.group_size=null")),
    Row("rtn-w4", "RTN W4 g128", "demo", (), "RTN W4 g128"),
    Row("gptq-w4", "GPTQ W4 g128 (true-sequential, the default)", "gptq-w4", (), "GPTQ W4 g128, ours true-sequential"),
    Row("gptq-w4-plain", "GPTQ W4 g128 (`true_sequential: false`)", "gptq-w4",
        ("passes[0].gptq.true_sequential=false",), "GPTQ W4 g128"),
    Row("awq-w4", "AWQ W4 g128", "awq-w3", ("passes[0].awq.bits=4",)),
    Row("rtn-w3", "RTN W3 g128", "demo", ("passes[0].rtn.bits=3",), "RTN W3 g128"),
    Row("gptq-w3", "GPTQ W3 g128 (true-sequential)", "gptq-w4", ("passes[0].gptq.bits=3",),
        "GPTQ W3 g128, ours true-sequential"),
    Row("awq-w3", "AWQ W3 g128", "awq-w3"),
    Row("gptq-w3-16", "GPTQ W3 g128, 16 calibration windows", "gptq-w4",
        ("passes[0].gptq.bits=3", "calibration.samples=16")),
    Row("mixed", "hessian_trace + ilp at 3.125 bits, then GPTQ (16 windows)", "mixed-precision"),
    Row("sparsegpt-2of4-w4", "SparseGPT 2:4 + GPTQ W4 g128", "sparsegpt-2of4-w4"),
    Row("smoothquant", "SmoothQuant + W8A8 (RTN int8 weights, int8 per-token activations)", "smoothquant-w8a8"),
]


def json_numbers() -> dict[str, dict[str, Any]]:
    """The numbers of the last run, per row key (what the README's table was made from)."""
    return json.loads(SAVED.read_text(encoding="utf-8"))


def run_row(row: Row, workdir: Path) -> dict[str, Any]:
    """`compress run` for one row; the report's perplexity, size and protocol."""
    output = workdir / row.key
    command = [sys.executable, "-m", "compress.cli.main", *row.command()[1:], "--output", str(output), "--quiet",
               "--no-checkpoints"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env, cwd=workdir)
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    (metric,) = report["metrics"]["perplexity"].values()
    return {"baseline": metric["baseline"], "compressed": metric["compressed"],
            "windows": metric["protocol"]["windows"], "seq_len": metric["protocol"]["seq_len"],
            "bits_per_weight": report["size"]["quantized_bits_per_weight"],
            "seconds": report["timings"].get("total"), "command": shlex.join(row.command())}


def peer_numbers(quantization_md: Path) -> dict[str, str]:
    """{scheme title: llm-compressor perplexity} from bench/run.py's table (its `peer ppl` column)."""
    if not quantization_md.is_file():
        return {}
    found = {}
    for line in quantization_md.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"\d+\.\d+", cells[2]):
            found[cells[0]] = cells[2]
    return found


def change(compressed: float, baseline: float) -> str:
    percent = 100 * (compressed / baseline - 1)
    return f"{percent:+.2f}%" if abs(percent) < 1 else f"{percent:+.1f}%"


def readme_block(numbers: dict[str, dict[str, Any]], peers: dict[str, str]) -> str:
    """The Markdown between the README's markers: protocol line, table, and how to reproduce it."""
    rows = [row for row in ROWS if row.key in numbers]
    first = numbers[rows[0].key]
    windows = {numbers[row.key]["windows"] for row in rows}
    baselines = {f"{numbers[row.key]['baseline']:.3f}" for row in rows}
    assert len(windows) == 1 and len(baselines) == 1, "every row must score the same windows against one baseline"
    lines = [
        f"Held-out perplexity on `recipes/demo/eval.txt` (token_ppl v1: all {first['windows']} windows of "
        f"{first['seq_len']} tokens; fp baseline {first['baseline']:.3f}, an add-one unigram model scores 782), "
        "each row the shipped recipe as `compress run` runs it (128 calibration windows unless the row says "
        "otherwise, seed 0, CPU, float32):",
        "",
        "| scheme | command | bits/weight | perplexity | vs fp | llm-compressor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        got = numbers[row.key]
        peer = peers.get(row.peer_title, "") if row.peer_title else ""
        lines.append(f"| {row.title} | `{got['command']}` | {got['bits_per_weight']:.3f} | {got['compressed']:.3f} "
                     f"| {change(got['compressed'], got['baseline'])} | {peer} |")
    lines += ["", "bits/weight: storage of the quantized linears (codes, 16-bit scales, zero points). The llm-compressor "
              "column is `bench/run.py`'s (`bench/results/quantization.md`: the same model, calibration windows and "
              "evaluation windows, in one process). Regenerate with `python bench/demo_results.py`."]
    return "\n".join(lines)


def replace_between_markers(text: str, block: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def machine_lines(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> list[str]:
    import torch
    import transformers

    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, `nproc` = {os.cpu_count()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, its default), transformers {transformers.__version__}, "
        f"python {platform.python_version()}",
        f"- load average (1 min) at start / end: {load_before[0]:.1f} / {load_after[0]:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated row keys: " + ", ".join(r.key for r in ROWS))
    parser.add_argument("--assemble", action="store_true", help="run nothing: rewrite the table from demo_results.json")
    args = parser.parse_args()
    wanted = [] if args.assemble else [key for key in args.only.split(",") if key] or [row.key for row in ROWS]
    keep = SAVED.is_file() and (args.only or args.assemble)
    numbers: dict[str, dict[str, Any]] = json.loads(SAVED.read_text()) if keep else {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="demo-results-") as workdir:
        for row in ROWS:
            if row.key in wanted:
                print(f"{row.key}: {shlex.join(row.command())}", file=sys.stderr, flush=True)
                numbers[row.key] = run_row(row, Path(workdir))
                SAVED.write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    if wanted:  # the machine the rows ran on, kept for a later --assemble
        numbers["_machine"] = machine_lines(load_before, os.getloadavg())  # type: ignore[assignment]
        SAVED.write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    block = readme_block(numbers, peer_numbers(RESULTS / "quantization.md"))
    section = ["## Results on the demo model (shipped recipes)", "",
               "Generated by `bench/demo_results.py`; the README's table is the block below. Do not edit by hand.", "",
               *numbers.get("_machine", []), "", block, ""]
    (RESULTS / "demo_results.md").write_text("\n".join(section), encoding="utf-8")
    README.write_text(replace_between_markers(README.read_text(encoding="utf-8"), block), encoding="utf-8")
    print(f"wrote {RESULTS / 'demo_results.md'} and the README's table", file=sys.stderr)


if __name__ == "__main__":
    main()
