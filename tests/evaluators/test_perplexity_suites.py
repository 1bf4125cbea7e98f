"""Perplexity suites: sliding windows (token_ppl v2) against a reference, v1 unchanged, local copies of hub names."""

import math

import pytest
import torch
import torch.nn.functional as F

from compress.engine.context import RunContext, RunInputs
from compress.engine.data import load_text
from compress.engine.model_io import load_model
from compress.evaluators.perplexity import PerplexityConfig, evaluate_perplexity, perplexity_of, sliding_perplexity_of, sliding_windows
from tests.conftest import SHARED_DATA, requires_shared_data
from tests.tiny_models import synthetic_text

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama), device="cpu")


def test_sliding_windows_worked_example():
    assert sliding_windows(1050, 512, 256) == [(0, 512, 1), (256, 768, 512), (512, 1024, 768), (768, 1050, 1024)]
    scored = sum(end - first for _, end, first in sliding_windows(1050, 512, 256))
    assert scored == 1049  # every token but the first, once


def reference_sliding_nll(model, ids, seq_len, stride):
    """Token by token: each target t is predicted from the window that first covers it."""
    total, count, scored_until, begin = 0.0, 0, 1, 0
    while True:
        end = min(begin + seq_len, ids.numel())
        logprobs = F.log_softmax(model(ids[None, begin:end]).logits[0].double(), dim=-1)
        for t in range(max(scored_until, begin + 1), end):
            total -= logprobs[t - begin - 1, ids[t]].item()
            count += 1
        scored_until = end
        if end == ids.numel():
            return math.exp(total / count), count
        begin += stride


def test_sliding_perplexity_matches_reference(tiny):
    ids = torch.tensor(tiny.tokenizer.encode(synthetic_text(120)))[:150]
    value, counts = sliding_perplexity_of(tiny.model, ids, seq_len=64, stride=24, batch_size=3, device=CPU)
    expected, count = reference_sliding_nll(tiny.model, ids, 64, 24)
    assert counts["scored_tokens"] == count == ids.numel() - 1
    assert value == pytest.approx(expected, rel=1e-5)


def test_stride_equal_to_seq_len_reproduces_v1_on_whole_windows(tiny):
    ids = torch.tensor(tiny.tokenizer.encode(synthetic_text(200)))[:192]
    v1, _ = perplexity_of(tiny.model, ids, 64, 4, CPU)
    v2, counts = sliding_perplexity_of(tiny.model, ids, 64, 64, 4, CPU)
    assert v2 == pytest.approx(v1, rel=1e-6) and counts["windows"] == 3


def test_protocol_versions_in_the_report(tiny, text_file):
    run = RunContext(RunInputs(device=CPU))
    v1 = evaluate_perplexity(tiny, PerplexityConfig(dataset=str(text_file), seq_len=64, max_windows=2), run)
    v2 = evaluate_perplexity(tiny, PerplexityConfig(dataset=str(text_file), seq_len=64, stride=32, max_windows=2), run)
    assert (v1.details["version"], v2.details["version"], v2.details["stride"]) == (1, 2, 32)
    with pytest.raises(ValueError, match="stride .* must not exceed seq_len"):
        PerplexityConfig(dataset="x.txt", seq_len=64, stride=65)


@requires_shared_data("wikitext2_raw", "wiki.test.raw")
def test_wikitext2_from_a_local_copy_rebuilds_the_hub_rows():
    text = load_text("wikitext2", SHARED_DATA)
    # Hub rows joined with "\n\n": "", " = Robert Boulter = \n", "", " Robert Boulter is ...\n", ...
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    lines = (SHARED_DATA / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:-1]
    assert "\r" not in text and len(lines) == 4358 and text.count("\n") == sum(1 for line in lines if line.strip()) + 2 * (len(lines) - 1)


def test_local_copy_missing_is_named(tmp_path):
    from compress.recipe.errors import UserError

    with pytest.raises(UserError, match=r"dataset 'wikitext2': file not found: .*wikitext2_raw/wiki.test.raw"):
        load_text("wikitext2", tmp_path)
