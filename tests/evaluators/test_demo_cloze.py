"""The shipped demo cloze task: the demo model scores well above chance (25%), and quantization damage shows."""

import pytest
import torch

from compress.engine.context import RunContext, RunInputs
from compress.engine.model_io import load_model
from compress.recipe.schema import parse_recipe
from compress.app.runner import run_passes
from compress.evaluators.zero_shot import load_task, score_task
from tests.conftest import DEMO_DIR, DEMO_MODEL, requires_demo_model

DOCS = 100


def cloze_acc(handle, task) -> float:
    scores = score_task(handle.model, handle.tokenizer, task, batch_size=32, max_length=1024, device=torch.device("cpu"))
    return scores["acc"][0]


@pytest.mark.slow
@requires_demo_model()
def test_demo_model_beats_chance_and_low_bits_hurt():
    task = load_task(str(DEMO_DIR / "cloze.jsonl"), None, limit=DOCS)
    assert len(task.docs) == DOCS and all(len(d.requests) == 4 for d in task.docs)
    accuracy = {}
    for bits in (None, 2):
        handle = load_model(str(DEMO_MODEL), device="cpu")
        if bits is not None:
            recipe = parse_recipe(f"passes:\n  - rtn: {{bits: {bits}, group_size: 128}}\n", base_dir=DEMO_DIR)
            run_passes(handle, recipe.passes, RunContext(RunInputs(device=torch.device("cpu"))))
        accuracy[bits] = cloze_acc(handle, task)
    assert accuracy[None] > 0.45  # chance is 0.25; the standard error at 100 documents is about 0.05
    assert accuracy[None] - accuracy[2] > 0.1  # RTN W2 g128 (W3 costs ~1 point, within the noise of 100 docs)
