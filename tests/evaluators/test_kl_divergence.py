"""kl_divergence against a direct computation on full logits of two tiny models: exact when top_k covers the
vocabulary, a lower bound short by exactly the tail term otherwise; and end to end in a recipe's report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from compress.app.runner import run_recipe
from compress.engine.context import RunContext, RunInputs
from compress.engine.data import contiguous_windows
from compress.engine.model_io import load_model
from compress.evaluators.kl_divergence import KLDivergenceConfig, baseline_top, coarse_kl, evaluate_kl_divergence
from compress.quant.modules import find_linears, weight_matrix
from compress.recipe.schema import parse_recipe

SEQ_LEN, WINDOWS = 32, 6


def perturbed(handle, scale=1.0, seed=0):
    """The model with noise on every decoder linear: a 'compressed' model whose distributions really differ."""
    g = torch.Generator().manual_seed(seed)
    for module in find_linears(handle.layers, handle.layers_prefix).values():
        w = weight_matrix(module)
        w.add_(torch.randn(w.shape, generator=g) * scale * w.std())
    return handle


def direct(baseline, compressed, windows):
    """Per-position exact KL(P || Q) and argmax agreement from the models' own full logits."""
    with torch.no_grad():
        logp = torch.log_softmax(baseline.model(windows).logits[:, :-1].float(), -1).reshape(-1, 320)
        logq = torch.log_softmax(compressed.model(windows).logits[:, :-1].float(), -1).reshape(-1, 320)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl, (logp.argmax(-1) == logq.argmax(-1)), logp, logq


def scored(tiny_llama, text_file, top_k):
    cfg = KLDivergenceConfig(dataset=str(text_file), seq_len=SEQ_LEN, max_windows=WINDOWS, top_k=top_k, batch_size=4,
                             logit_chunk_mb=1)
    baseline, compressed = load_model(str(tiny_llama)), perturbed(load_model(str(tiny_llama)))
    run = RunContext(RunInputs(device=baseline.device))
    before = evaluate_kl_divergence(baseline, cfg, run)
    records = next(iter(run.cache.evaluator_state.values()))
    assert records.path.is_file()
    after = evaluate_kl_divergence(compressed, cfg, run)
    assert not records.path.exists() and run.cache.evaluator_state == {}  # the temporary file is gone
    windows = contiguous_windows(run.cache.token_ids((str(text_file), None), baseline.tokenizer), SEQ_LEN)[:WINDOWS]
    return before, after, direct(baseline, compressed, windows)


def test_full_top_k_equals_direct_kl(tiny_llama, text_file):
    before, after, (kl, agrees, _, _) = scored(tiny_llama, text_file, top_k=320)
    assert [r.value for r in before] == [0.0, 0.0, 1.0]
    mean, p99, top1 = (r.value for r in after)
    assert kl.mean() > 1e-3  # the perturbation is not negligible, so the comparison means something
    assert mean == pytest.approx(float(kl.double().mean()), rel=1e-4)
    assert p99 == pytest.approx(float(np.percentile(kl.double().numpy(), 99)), rel=1e-4)
    assert top1 == pytest.approx(float(agrees.float().mean()))
    assert after[0].details["positions"] == WINDOWS * (SEQ_LEN - 1) and after[0].details["baseline_tail_mass"] == 0


def test_small_top_k_is_a_lower_bound_short_by_the_tail_term(tiny_llama, text_file):
    _, after, (kl, agrees, logp, logq) = scored(tiny_llama, text_file, top_k=8)
    values, ids = logp.topk(8, -1)
    tail = torch.ones_like(logp, dtype=torch.bool).scatter(1, ids, False)
    p_rest = (logp.exp() * tail).sum(-1)
    # the gap of the module docstring: P(R) * KL(P(.|R) || Q(.|R)), computed from the full distributions
    p_tail = torch.where(tail, logp, -math.inf) - torch.log(p_rest)[:, None]
    q_tail = torch.where(tail, logq, -math.inf) - torch.logsumexp(torch.where(tail, logq, -math.inf), -1)[:, None]
    gap = p_rest * torch.where(tail, p_tail.exp() * (p_tail - q_tail), torch.zeros_like(logp)).sum(-1)
    assert float(gap.mean()) > 0.1 * float(kl.mean())  # the bound is not vacuous: 8 of 320 tokens leave a real tail
    assert after[0].value == pytest.approx(float((kl - gap).double().mean()), rel=1e-4)
    assert after[0].value < float(kl.mean())
    assert after[2].value == pytest.approx(float(agrees.float().mean()))  # agreement stays exact
    assert after[0].details["baseline_tail_mass"] == pytest.approx(float(p_rest.mean()), rel=1e-4)


def test_coarse_kl_of_identical_logits_is_zero():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    found = coarse_kl(baseline_top(logits, 7), logits)
    assert torch.all(found.kl < 1e-6) and torch.all(found.agrees)


def test_recipe_reports_kl_metrics(tiny_llama, text_file, tmp_path):
    text = f"""
model: {tiny_llama}
passes:
  - rtn: {{bits: 2, group_size: 32}}
evaluate:
  kl_divergence: [{{dataset: {text_file}, seq_len: {SEQ_LEN}, max_windows: 4, top_k: 32}}]
"""
    run_recipe(parse_recipe(text), tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["metrics"]
    label = text_file.stem
    assert metrics["kl_divergence"][label]["baseline"] == 0 < metrics["kl_divergence"][label]["compressed"]
    assert metrics["kl_divergence_p99"][label]["compressed"] >= metrics["kl_divergence"][label]["compressed"]
    assert 0 <= metrics["top1_agreement"][label]["compressed"] < 1 == metrics["top1_agreement"][label]["baseline"]
    assert "kl_divergence" in (tmp_path / "out" / "report.html").read_text()


def test_a_divergence_that_rose_reads_worse():
    from compress.report.summary import change_verdict

    assert change_verdict("kl_divergence", {"baseline": 0.0, "compressed": 0.05}) == "worse"
    assert change_verdict("kl_divergence_p99", {"baseline": 0.0, "compressed": 0.5}) == "worse"
    assert change_verdict("top1_agreement", {"baseline": 1.0, "compressed": 0.9}) == "worse"
