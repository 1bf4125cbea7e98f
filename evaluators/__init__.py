"""Evaluators score a model; each declares its protocol and version in the report."""

from evaluators import perplexity  # noqa: F401  (registers the evaluator)
from evaluators import zero_shot  # noqa: F401
from evaluators import lm_eval_adapter  # noqa: F401  (lm-eval itself is imported only when the evaluator runs)
