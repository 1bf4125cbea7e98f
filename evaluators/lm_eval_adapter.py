"""Run lm-evaluation-harness itself on the in-memory (compressed) model: any of its tasks, its numbers.

Needs the optional extra: `pip install 'compress[lm-eval]'`. The model is wrapped in lm-eval's `HFLM`
(which accepts an nn.Module), so the baseline and the compressed model are scored in the same run without
saving a checkpoint. lm-eval's own protocol applies (its task versions are in the report).

Offline, `data_dir` points lm-eval at local copies of the built-in tasks (`piqa`, `arc_easy`,
`arc_challenge`, `hellaswag`, `winogrande`, `boolq`, `lambada_openai` laid out like ../shared/data): for each
one we write the documents in the hub's schema to JSONL and a task YAML that `include`s lm-eval's own
task YAML and only swaps the data source:

    include: <site-packages>/lm_eval/tasks/piqa/piqa.yaml
    task: compress_piqa
    dataset_path: json
    dataset_kwargs: {data_files: {validation: <folder>/piqa.jsonl}}

so prompts, preprocessing (`!function` hooks) and metrics stay lm-eval's. The folder is passed as the
TaskManager's `include_path`.

Memory: lm-eval keeps two numbers per request (log-likelihood, is-greedy), but each of its batches takes a float32
log_softmax over every position, (batch_size, T, vocab): 9 GiB peak for batches of 32 HellaSwag inputs at a
128,256-token vocabulary, and its first batch holds the longest inputs, so the peak rises with the longest document
(bench/results/eval_memory.md). That is lm-eval's own code, bounded only by `batch_size` x the context length; the
`zero_shot` evaluator scores the same tasks in `logit_chunk_mb` chunks.

Recipe example:

    evaluate:
      lm_eval: {tasks: [piqa, arc_easy], limit: 200, batch_size: 32}
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


from compress.engine.context import RunContext
from compress.engine.layer_sweep import model_on_device
from compress.recipe.errors import UserError
from compress.engine.model_io import ModelHandle
from compress.recipe.registry import EvalResult
from compress.evaluators.tasks import TaskDef, registry
from compress.evaluators.zero_shot import resolve_data_dir
from compress.evaluators.configs import LmEvalConfig  # noqa: F401  (re-exported; defined without torch)

# Our task name -> lm-eval's task YAML, relative to lm_eval/tasks.
LM_EVAL_YAMLS = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
LOCAL_PREFIX = "compress_"


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UserError("the lm_eval evaluator needs lm-evaluation-harness: pip install 'compress[lm-eval]'") from None
    return lm_eval


def local_metric_list(task: TaskDef) -> list[dict[str, Any]]:
    """acc and acc_norm for every multiple-choice task (lm-eval's boolq and winogrande list only acc)."""
    if task.output == "last_word":
        return [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]


def write_local_tasks(names: list[str], data_dir: Path, folder: Path, limit: int | None = None) -> dict[str, str]:
    """Write JSONL documents and task YAMLs for lm-eval into `folder`; returns {our name: lm-eval task name}."""
    tasks_root = Path(require_lm_eval().__file__).parent / "tasks"
    known = registry()
    renamed = {}
    for name in names:
        if name not in LM_EVAL_YAMLS:
            raise UserError(f"lm_eval: no local layout for task '{name}' (data_dir works for {', '.join(LM_EVAL_YAMLS)})")
        task = known[name]
        assert task.hub is not None
        docs = task.read_local(data_dir / task.local_file)[:limit]
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        split = task.hub.split
        config = {
            "include": str(tasks_root / LM_EVAL_YAMLS[name]),
            "task": LOCAL_PREFIX + name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data_file)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "metric_list": local_metric_list(task),
        }
        # JSON is valid YAML, and keeps lm-eval's loader away from any tag we did not write.
        (folder / f"{LOCAL_PREFIX}{name}.yaml").write_text(json.dumps(config, indent=2), encoding="utf-8")
        renamed[name] = LOCAL_PREFIX + name
    return renamed


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], *, limit: int | None, batch_size: int,
                num_fewshot: int | None = None, data_dir: Path | None = None, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an in-memory model; `data_dir` swaps built-in tasks to local files."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="compress-lm-eval-") as tmp:
        renamed = write_local_tasks(tasks, data_dir, Path(tmp), limit) if data_dir is not None else {}
        manager = TaskManager(include_path=tmp if renamed else None)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=[renamed.get(t, t) for t in tasks], limit=limit,
                                         num_fewshot=num_fewshot, task_manager=manager, log_samples=log_samples,
                                         bootstrap_iters=1000, verbosity="ERROR")
    output["renamed"] = renamed
    return output


def evaluate_lm_eval(handle: ModelHandle, cfg: LmEvalConfig, run: RunContext) -> list[EvalResult]:
    """Any lm-evaluation-harness task, run by lm-eval itself on the in-memory model."""
    data_dir = resolve_data_dir(cfg.data_dir)
    with model_on_device(handle, handle.device):
        output = run_lm_eval(handle.model, handle.tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size,
                             num_fewshot=cfg.num_fewshot, data_dir=data_dir)
    original = {v: k for k, v in output["renamed"].items()}
    version = getattr(require_lm_eval(), "__version__", None)
    results = []
    for task_name, metrics in output["results"].items():
        label = original.get(task_name, task_name)
        protocol = {"name": "lm_eval_harness", "version": str(output.get("versions", {}).get(task_name)),
                    "lm_eval": version,
                    "task": task_name, "limit": cfg.limit}
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            results.append(EvalResult(f"lm_eval_{metric}", label, float(value),
                                      {**protocol, "stderr": stderr if isinstance(stderr, float) else None}))
    return results
