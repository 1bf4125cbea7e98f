"""Parity with lm-evaluation-harness itself: same model, same documents, same acc and acc_norm.

lm-eval is pointed at the local files in ../shared/data through task YAMLs that `include` its own task
configs and swap only the data source (see evaluators/lm_eval_adapter.py: `write_local_tasks`).
"""

import pytest
import torch

from compress.engine.model_io import load_model
from compress.evaluators.lm_eval_adapter import run_lm_eval
from compress.evaluators.zero_shot import load_task, model_max_length, score_task
from tests.conftest import DEMO_MODEL, SHARED_DATA, requires_demo_model, requires_shared_data

TASKS = ["piqa", "arc_easy", "hellaswag", "winogrande", "boolq"]
DOCS = 40  # 200 documents over 5 tasks, each scored by both: exact equality, in under half a minute of make test


@pytest.mark.slow
@requires_demo_model()
@requires_shared_data("piqa", "valid.jsonl")
def test_acc_and_acc_norm_equal_lm_eval_on_the_demo_model():
    pytest.importorskip("lm_eval")
    handle = load_model(str(DEMO_MODEL), device="cpu")
    theirs = run_lm_eval(handle.model, handle.tokenizer, TASKS, limit=DOCS, batch_size=32, data_dir=SHARED_DATA)["results"]
    max_length = model_max_length(handle.model, handle.tokenizer)
    for name in TASKS:
        task = load_task(name, SHARED_DATA, limit=DOCS)
        ours = score_task(handle.model, handle.tokenizer, task, batch_size=32, max_length=max_length, device=torch.device("cpu"))
        reference = theirs[f"compress_{name}"]
        assert reference["sample_len"] == len(task.docs) == DOCS
        for metric in ("acc", "acc_norm"):
            assert ours[metric][0] == reference[f"{metric},none"], (name, metric, ours[metric], reference)
            assert ours[metric][1] == pytest.approx(reference[f"{metric}_stderr,none"], rel=1e-9)


@pytest.mark.slow
@requires_shared_data("winogrande", "winogrande.jsonl")
def test_lm_eval_evaluator_on_the_in_memory_model(tiny_llama):
    pytest.importorskip("lm_eval")
    from compress.engine.context import RunContext, RunInputs
    from compress.evaluators.lm_eval_adapter import LmEvalConfig, evaluate_lm_eval
    from compress.evaluators.zero_shot import ZeroShotConfig, evaluate_zero_shot

    handle = load_model(str(tiny_llama), device="cpu")
    run = RunContext(RunInputs(device=torch.device("cpu")))
    theirs = evaluate_lm_eval(handle, LmEvalConfig(tasks=["winogrande"], limit=20, data_dir=str(SHARED_DATA)), run)
    ours = evaluate_zero_shot(handle, ZeroShotConfig(tasks=["winogrande"], limit=20, data_dir=str(SHARED_DATA)), run)
    by_metric = {r.metric: r for r in theirs}
    assert {r.label for r in theirs} == {"winogrande"} and by_metric["lm_eval_acc"].details["name"] == "lm_eval_harness"
    for result in ours:
        assert by_metric[f"lm_eval_{result.metric}"].value == result.value
