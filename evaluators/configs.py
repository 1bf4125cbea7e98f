"""Every built-in evaluator's config, in a module that imports no torch: `compress validate` checks a recipe's
`evaluate:` section against these, and `compress.app.builtins` declares each evaluator with its config here and its
implementation by name, imported only when a run scores a model. Each evaluator's module re-exports its config.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from compress.engine.settings import DEFAULT_LOGIT_CHUNK_MB, MAX_LOGIT_CHUNK_MB
from compress.recipe.registry import StrictConfig, did_you_mean
from compress.evaluators.tasks import registry


# -- perplexity.py

class PerplexityConfig(StrictConfig):
    """Recipe example:

        evaluate:
          perplexity: [{dataset: eval.txt, seq_len: 512}, {dataset: wikitext2, seq_len: 2048}]

    `logit_chunk_mb`: MiB of float32 logits (positions x vocabulary x 4 bytes) alive at once. The model's head
    runs on that many positions at a time, each chunk reduced to its summed NLL, so a batch's memory is its
    activations plus 2-4 times this (the logsumexp's temporaries), not batch_size x seq_len x vocabulary
    (8 GiB for 8 x 2048 at 128k).
    """

    dataset: str
    seq_len: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    max_windows: int | None = Field(None, ge=1, description="score only the first N windows (quick checks)")
    stride: int | None = Field(None, ge=1, description="sliding windows (token_ppl v2); unset: disjoint windows (v1)")
    data_dir: str | None = Field(None, description="local copies of hub names, laid out like ../shared/data")
    logit_chunk_mb: int = Field(DEFAULT_LOGIT_CHUNK_MB, ge=1, le=MAX_LOGIT_CHUNK_MB,
                                description="MiB of float32 vocabulary-wide logits scored at once")

    @model_validator(mode="after")
    def _stride_within_window(self) -> "PerplexityConfig":
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride ({self.stride}) must not exceed seq_len ({self.seq_len}): tokens would be skipped")
        return self


# -- kl_divergence.py

class KLDivergenceConfig(StrictConfig):
    """KL(baseline || compressed) of the next-token distributions on a text, its 99th percentile, top-1 agreement.

    Recipe example:

        evaluate:
          kl_divergence: [{dataset: eval.txt, seq_len: 512, top_k: 128}]

    The windows are perplexity's (disjoint, `seq_len` tokens). `top_k`: baseline tokens kept per position (the
    rest's mass is one bucket): the reported KL is a lower bound of the exact one, short of it by at most the
    tail's own divergence weighted by its mass (report.json: `baseline_tail_mass`); a temporary file holds
    (2 top_k + 1) x 4 bytes per position between the baseline and the compressed evaluation.
    """

    dataset: str
    seq_len: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    max_windows: int | None = Field(None, ge=1, description="compare only the first N windows (quick checks)")
    top_k: int = Field(128, ge=1, le=65_536, description="baseline tokens kept per position")
    data_dir: str | None = Field(None, description="local copies of hub names, laid out like ../shared/data")
    logit_chunk_mb: int = Field(DEFAULT_LOGIT_CHUNK_MB, ge=1, le=MAX_LOGIT_CHUNK_MB,
                                description="MiB of float32 vocabulary-wide logits scored at once")


# -- zero_shot.py

class ZeroShotConfig(StrictConfig):
    """Recipe example:

        evaluate:
          zero_shot: {tasks: [piqa, arc_easy, my_task.jsonl], limit: 200, batch_size: 32, data_dir: ../data}

    `tasks`: built-in names (piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, lambada_openai)
    or paths to JSONL files of `{context, choices, gold}`. `data_dir`: a folder laid out like
    ../shared/data (piqa/valid.jsonl, arc_easy/arc_easy.jsonl, ...) to read the built-in tasks from
    instead of the hub; defaults to $COMPRESS_DATA_DIR. `logit_chunk_mb`: how many MiB of float32 logits
    (positions x vocabulary x 4 bytes) the scorer holds at once (256 MiB is 523 positions at a 128,256-token
    vocabulary); larger is no faster once the head's matmul is big, smaller bounds memory further.
    """

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1, description="score only the first N documents of each task")
    batch_size: int = Field(32, ge=1, description="model inputs per forward pass")
    data_dir: str | None = None
    max_length: int | None = Field(None, ge=2, description="context length; default: the model's (as lm-eval)")
    logit_chunk_mb: int = Field(DEFAULT_LOGIT_CHUNK_MB, ge=1, le=MAX_LOGIT_CHUNK_MB,
                                description="MiB of float32 vocabulary-wide logits scored at once")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        known = registry()
        for task in tasks:
            if task not in known and not task.endswith(".jsonl"):
                raise ValueError(f"unknown task '{task}' (or give a .jsonl file).{did_you_mean(task, list(known))}")
        return tasks


# -- lm_eval_adapter.py

class LmEvalConfig(StrictConfig):
    """Recipe example:

        evaluate:
          lm_eval: {tasks: [piqa, mmlu], limit: 100, batch_size: 16}
    """

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    data_dir: str | None = Field(None, description="local copies of the built-in tasks (../shared/data layout)")
