"""Evaluators score a model; each declares its protocol and version in the report."""

from evaluators import perplexity  # noqa: F401  (registers the evaluator)
