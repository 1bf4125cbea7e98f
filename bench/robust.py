"""What surviving a kill costs and saves: layer checkpoints, `--resume`, against llm-compressor (which has no resume).

    .venv-bench/bin/python bench/robust.py            # writes bench/results/robust.md

Ours runs as the CLI does (a subprocess per run, GPTQ W4 g128 on the demo model, matched settings as in
bench/schemes.py): without checkpoints, with checkpoints, and killed with SIGKILL after 2 of the 4 decoder layers
then resumed. The peer's `oneshot` on the same calibration windows is timed once; it cannot resume, so its
cost after the same kill is computed as the time until the kill plus a full rerun.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from compress.engine.checkpoint import FAULT_ENV, checkpoint_dir_for  # noqa: E402
from compress.engine.data import load_text, sample_windows, tokenize_text  # noqa: E402

SAMPLES, SEQ_LEN, EVAL_WINDOWS = 32, 512, 16
DEMO = REPO / "recipes" / "demo"
RECIPE = f"""model: {DEMO / 'model'}
calibration: {{dataset: {DEMO / 'calib.txt'}, samples: {SAMPLES}, seq_len: {SEQ_LEN}, seed: 0}}
passes:
  - gptq: {{bits: 4, group_size: 128, symmetric: true, damp: 0.01, block_size: 128, true_sequential: false}}
evaluate:
  perplexity: [{{dataset: {DEMO / 'eval.txt'}, seq_len: {SEQ_LEN}, max_windows: {EVAL_WINDOWS}}}]
"""


def ours(workdir: Path, output: str, *extra: str, fault: str | None = None) -> tuple[float, int, dict | None]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if fault:
        env[FAULT_ENV] = fault
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compress.cli.main", "run", "recipe.yaml", "--output", output, "--quiet", *extra],
                          cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, -9):
        raise SystemExit(f"our run {output} {' '.join(extra)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((workdir / output / "report.json").read_text()) if done.returncode == 0 else None
    return wall, done.returncode, report


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def peer_seconds() -> float | None:
    from schemes import SCHEMES
    from tools import Setup, run_peer

    from compress.engine.model_io import load_model

    handle = load_model(str(DEMO / "model"), dtype="float32", device="cpu")
    windows = sample_windows(tokenize_text(handle.tokenizer, load_text(DEMO / "calib.txt")), SAMPLES, SEQ_LEN, 0)
    setup = Setup(DEMO / "model", windows, torch.zeros(1, dtype=torch.long), SEQ_LEN, EVAL_WINDOWS)
    outcome = run_peer(SCHEMES["gptq-w4"], setup, evaluate=False)
    return outcome.seconds


def main() -> None:
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench-robust-"))
    (workdir / "recipe.yaml").write_text(RECIPE)
    plain_wall, _, plain = ours(workdir, "plain", "--no-checkpoints")
    ckpt_wall, _, ckpt = ours(workdir, "ckpt")
    killed_wall, killed_rc, _ = ours(workdir, "resumed", fault="1:KILL")
    checkpoint_bytes = folder_bytes(checkpoint_dir_for(workdir / "resumed"))
    resume_wall, _, resumed = ours(workdir, "resumed", "--resume")
    if killed_rc != -9 or not (plain and ckpt and resumed):
        raise SystemExit(f"expected a SIGKILLed run (-9), got {killed_rc}")
    identical = resumed["weights_sha256"] == plain["weights_sha256"] == ckpt["weights_sha256"]
    peer = peer_seconds()
    load_after = os.getloadavg()[0]
    shutil.rmtree(workdir, ignore_errors=True)

    passes = lambda r: r["timings"]["passes"]  # noqa: E731
    overhead = (passes(ckpt) / passes(plain) - 1) * 100
    half = peer / 2 if peer else None
    lines = [
        "## Surviving faults: layer checkpoints and --resume",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: `python bench/robust.py`",
        f"- machine: {platform.machine()}, `nproc` = {os.cpu_count()}, no GPU; load average (1 min) at start / end: "
        f"{load_before:.1f} / {load_after:.1f} — **shared machine, seconds are noisy**",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, compress {plain['versions']['compress']}, "
        f"transformers {plain['versions']['transformers']}",
        f"- GPTQ W4 g128 (one Hessian forward per layer, as the peer), demo model (4 decoder layers), {SAMPLES} windows "
        f"of {SEQ_LEN} tokens, fp32 CPU; kill = SIGKILL right after decoder layer 2 of 4 was checkpointed",
        "",
        "| | ours | llm-compressor 0.14 |",
        "|---|---:|---:|",
        f"| compression, no checkpoints (s) | {passes(plain):.1f} | {peer:.1f} |" if peer else
        f"| compression, no checkpoints (s) | {passes(plain):.1f} | not run |",
        f"| compression, with layer checkpoints (s) | {passes(ckpt):.1f} ({overhead:+.0f}%) | no checkpoints |",
        f"| checkpoint folder at the kill (MiB) | {checkpoint_bytes / 2**20:.1f} | — |",
        f"| whole run, uninterrupted (wall s, incl. load + eval) | {plain_wall:.1f} | — |",
        f"| killed after layer 2, then finished (wall s, both processes) | {killed_wall + resume_wall:.1f} "
        f"(resume alone {resume_wall:.1f}) | compression redone from layer 0: ≈ {half + peer:.1f} (computed: half a run lost + a full rerun) |"
        if half is not None else f"| killed, then finished (wall s) | {killed_wall + resume_wall:.1f} | — |",
        f"| resumed weights bit-identical to uninterrupted | {'yes' if identical else 'NO'} (weights_sha256) | — |",
        f"| resumed perplexity / uninterrupted | {resumed['metrics']['perplexity']['eval']['compressed']:.4f} / "
        f"{plain['metrics']['perplexity']['eval']['compressed']:.4f} | — |",
        "",
        "llm-compressor 0.14's `oneshot` has no option to checkpoint or resume a calibration run (none in its "
        "entrypoint or pipeline arguments), so a kill costs everything done so far. On a model this small the "
        "wall times are dominated by process start, model load and evaluation; on a 70B model the layers are hours.",
        "",
    ]
    out = REPO / "bench" / "results" / "robust.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
