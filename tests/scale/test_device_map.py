"""Evaluation through an accelerate device map (`max_memory`): same perplexity, and the model comes back clean."""

from __future__ import annotations

import pytest
import torch

from compress.engine.layer_sweep import evaluation_device_map, model_on_device
from compress.engine.model_io import load_model
from compress.evaluators.perplexity import perplexity_of


def test_max_memory_dispatch_matches_plain_evaluation(tiny_llama, text_file):
    from compress.engine.data import tokenize_text

    handle = load_model(str(tiny_llama))
    ids = tokenize_text(handle.tokenizer, text_file.read_text())
    expected, _ = perplexity_of(handle.model, ids, 32, 4, torch.device("cpu"), max_windows=4)
    handle.max_memory = {"cpu": "2GiB"}
    assert set(evaluation_device_map(handle).values()) == {"cpu"}
    with model_on_device(handle, handle.device):
        got, _ = perplexity_of(handle.model, ids, 32, 4, torch.device("cpu"), max_windows=4)
    assert got == pytest.approx(expected, rel=1e-6)
    assert not any(hasattr(m, "_hf_hook") for m in handle.model.modules())  # no hooks left behind
    assert all(p.device.type == "cpu" for p in handle.model.parameters())
