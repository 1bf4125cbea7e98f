"""Zero-shot memory does not grow with the number of documents, at Llama 3's 128,256-token vocabulary.

Issue 15: the scorer kept a (T, vocab) log-probability table per distinct input until the task ended, 0.5 MiB per
token at this vocabulary (20 HellaSwag-format documents held ~1 GiB, 100 held ~5 GiB). Each run here is a fresh
process, so its peak RSS (`ru_maxrss`) is that run's alone; both runs start together to share the wall time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluators.peak_memory import write_hellaswag
from tests.real_shapes import save_real_shape_model

REPO = Path(__file__).resolve().parents[2]
DOCS = 20
CHUNK_MB = 16  # small enough that the first batch already fills a chunk: the steady state is reached in both runs
# Above the loaded model: one batch of 32 inputs (activations, hidden states) plus a chunk of logits and the
# logsumexp's copy (2 x 16 MiB); the old table for 20 documents alone was ~1 GiB.
SCORING_BOUND_MIB = 160


def peak_of(model: Path, data: Path, docs: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.evaluators.peak_memory", str(model), "zero_shot", str(data), str(docs),
               "--chunk-mb", str(CHUNK_MB)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measured(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_zero_shot_peak_memory_is_flat_in_documents(tmp_path):
    model = save_real_shape_model(tmp_path / "llama3", "llama3")
    data = write_hellaswag(tmp_path / "data", 5 * DOCS)
    few, many = peak_of(model, data, DOCS), peak_of(model, data, 5 * DOCS)
    few, many = measured(few), measured(many)
    assert few["docs"] == DOCS and many["docs"] == 5 * DOCS
    assert many["peak_mib"] <= 1.10 * few["peak_mib"], (few, many)
    for run in (few, many):
        assert run["peak_mib"] - run["loaded_mib"] < SCORING_BOUND_MIB, run
        assert 0.0 <= run["results"]["acc/hellaswag"] <= 1.0
