"""Dataset references: local text, JSONL with a text field, hub names (a clear error offline)."""

import json

import pytest
import torch

from compress.engine.data import contiguous_windows, dataset_label, load_text, sample_windows
from compress.recipe.errors import UserError
from tests.conftest import SHARED_DATA, requires_shared_data


def test_jsonl_documents_are_joined_with_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["first doc", "second doc"])) + "\n\n")
    assert load_text(str(path)) == "first doc\n\nsecond doc"
    assert dataset_label(str(path)) == "docs"


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        load_text(str(path))
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_text(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="dataset file not found"):
        load_text(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_datasets_are_a_clear_error_offline(name):
    with pytest.raises(UserError, match="offline mode is on"):
        load_text(name)


def test_calibration_windows_are_reproducible_and_in_range():
    ids = torch.arange(1000)
    a = sample_windows(ids, samples=16, seq_len=64, seed=3)
    b = sample_windows(ids, samples=16, seq_len=64, seed=3)
    assert torch.equal(a, b) and a.shape == (16, 64)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1), "windows are contiguous slices of the text"
    assert not torch.equal(a, sample_windows(ids, samples=16, seq_len=64, seed=4))
    with pytest.raises(UserError, match="fewer than seq_len"):
        sample_windows(ids[:10], samples=1, seq_len=64, seed=0)


def test_evaluation_windows_drop_the_short_tail():
    windows = contiguous_windows(torch.arange(1050), 512)
    assert windows.shape == (2, 512) and windows[1, -1].item() == 1023


@requires_shared_data("web_text_ccnet_sample", "cc_en_head-0091.jsonl")
def test_reads_real_dolma_jsonl():
    text = load_text(str(SHARED_DATA / "web_text_ccnet_sample" / "cc_en_head-0091.jsonl"))
    records = (SHARED_DATA / "web_text_ccnet_sample" / "cc_en_head-0091.jsonl").read_text().strip().splitlines()
    assert text.count("\n\n") >= len(records) - 1
    assert len(text) > 1000
