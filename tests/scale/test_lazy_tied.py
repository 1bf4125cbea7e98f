"""Lazy runs on tied-embedding models (the demo model, Qwen2.5-style, Llama-3.2): lm_head.weight is the input
embedding, read once, and the written folder stores it once and reloads tied, as eager runs and save_pretrained do.

The untied side (a missing head is refused) is in tests/core/test_hostile_models.py and test_model_loading.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.compressors.gptq import GPTQConfig, run_gptq
from compress.engine.context import RunContext, RunInputs
from compress.engine.lazy import load_lazy
from compress.engine.layer_sweep import SweepStep, model_on_device, run_sweep
from compress.engine.model_io import load_model
from compress.evaluators.perplexity import perplexity_of
from compress.recipe.errors import UserError
from tests.conftest import DEMO_DIR, DEMO_MODEL, requires_demo_model
from tests.scale.helpers import run_lazy_and_eager
from tests.tiny_models import save_tiny_model, save_tokenizer, tiny_config


@pytest.fixture(scope="module")
def tied_qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with tied embeddings in bf16, as Qwen2.5-0.5B/1.5B ship (the head is not stored)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tied-qwen") / "model"
    folder.mkdir()
    save_tokenizer(folder)
    config = tiny_config("qwen2", vocab_size=320)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _calibration() -> torch.Tensor:
    return torch.randint(2, 300, (4, 24), generator=torch.Generator().manual_seed(0))


def _gptq_sweep(handle) -> None:
    run = RunContext(RunInputs(device=handle.device, calibration=_calibration(), calibration_batch_size=2))
    run_sweep(handle, [SweepStep("gptq", run_gptq, GPTQConfig(bits=4, group_size=32), True)], run)


def test_lazy_gptq_on_a_tied_model_equals_eager_and_reloads_tied(tied_qwen, tmp_path):
    eager = load_model(str(tied_qwen))
    _gptq_sweep(eager)
    lazy = load_lazy(str(tied_qwen), save_to=tmp_path / "out")
    assert lazy.model.get_output_embeddings().weight is lazy.model.get_input_embeddings().weight  # one parameter
    _gptq_sweep(lazy)
    lazy.finish_saving()

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # the embedding stored once, as save_pretrained stores it
    reloaded = _reload_tied(tmp_path / "out", torch.bfloat16)
    # Exactly the eager run's weights in the checkpoint's bf16 (the lazy run writes each layer in that dtype).
    expected = {name: p.detach().to(torch.bfloat16) for name, p in eager.model.named_parameters(remove_duplicate=False)}
    got = dict(reloaded.named_parameters(remove_duplicate=False))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    changed = [n for n in got if n.endswith("proj.weight") and not torch.equal(got[n], _as_stored(tied_qwen, n))]
    assert len(changed) == 2 * 7  # GPTQ rewrote every projection of both layers


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "opt", "gpt2"])
def test_lazy_rtn_on_the_tied_families_equals_eager(family, tmp_path):
    """The other tied families the README names: each ties its own way (OPT's decoder.embed_tokens, GPT-2's wte)."""
    from compress.compressors.rtn import RTNConfig, run_rtn

    folder = save_tiny_model(tmp_path / family, family)
    handles = {"eager": load_model(str(folder)), "lazy": load_lazy(str(folder), save_to=tmp_path / "out")}
    for handle in handles.values():
        run = RunContext(RunInputs(device=handle.device, calibration=None, calibration_batch_size=2))
        run_sweep(handle, [SweepStep("rtn", run_rtn, RTNConfig(bits=4, group_size=32), False)], run)
    handles["lazy"].finish_saving()
    reloaded = _reload_tied(tmp_path / "out", torch.float32)  # stored in float32: equal without rounding
    expected = dict(handles["eager"].model.named_parameters(remove_duplicate=False))
    got = dict(reloaded.named_parameters(remove_duplicate=False))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def _reload_tied(folder: Path, dtype: torch.dtype):
    """`from_pretrained` of a written folder, which must load with no key left over or missing and the head tied."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model


def _as_stored(folder: Path, name: str) -> torch.Tensor:
    """`name` as the checkpoint stores it."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise KeyError(name)


def test_a_tied_head_is_read_once_per_evaluation_and_scores_as_eager(tied_qwen, text_file, monkeypatch):
    from compress.engine.data import tokenize_text

    eager = load_model(str(tied_qwen))
    lazy = load_lazy(str(tied_qwen))
    ids = tokenize_text(eager.tokenizer, text_file.read_text())
    expected, _ = perplexity_of(eager.model, ids, 32, 4, torch.device("cpu"), max_windows=6)
    reads: list[str] = []
    read = lazy.weights.read

    def counted(names, *args, **kwargs):
        reads.extend(names)
        return read(names, *args, **kwargs)

    monkeypatch.setattr(lazy.weights, "read", counted)
    with model_on_device(lazy, lazy.device):
        got, _ = perplexity_of(lazy.model, ids, 32, 4, torch.device("cpu"), max_windows=6)
    # Same bf16 shards, same float32 compute, same ops in the same order: bit for bit.
    assert got == expected
    assert reads.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in reads


def test_a_tied_config_over_a_checkpoint_with_a_different_head_stays_untied(tied_qwen, tmp_path):
    """Both names stored with different values: as from_pretrained, no tie, so each name reads its own tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "both"
    shutil.copytree(tied_qwen, folder)
    tensors = load_file(folder / "model.safetensors")
    head = tensors["model.embed_tokens.weight"].clone()
    head[0] += 1
    save_file({**tensors, "lm_head.weight": head}, folder / "model.safetensors", metadata={"format": "pt"})
    lazy = load_lazy(str(folder))
    assert lazy.model.lm_head.weight is not lazy.model.model.embed_tokens.weight
    with lazy.outside_layers_on(lazy.device):
        assert torch.equal(lazy.model.lm_head.weight, head.float())
        assert torch.equal(lazy.model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"].float())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})  # no head, and untied: refused
    untied = r"no tensor for lm_head\.weight in the checkpoint\. config\.json leaves the head untied \(tie_word_embeddings: false\)"
    with pytest.raises(UserError, match=untied):
        load_lazy(str(folder))


@pytest.mark.slow
@requires_demo_model()
def test_compress_run_lazy_on_the_demo_model_equals_eager(tmp_path):
    """The whole `compress run`: the streamed compressed-tensors export equals the eager one tensor for tensor, and
    the perplexities agree (see the tolerance below)."""

    def recipe_text(lazy: bool) -> str:
        return (
            f"model: {DEMO_MODEL}\nlazy: {str(lazy).lower()}\n"
            f"calibration: {{dataset: {DEMO_DIR / 'calib.txt'}, samples: 4, seq_len: 64, batch_size: 2}}\n"
            "passes:\n  - rtn: {bits: 4, group_size: 64}\n"
            f"evaluate:\n  perplexity:\n    - {{dataset: {DEMO_DIR / 'eval.txt'}, seq_len: 64, max_windows: 4}}\n"
            "export: {format: compressed-tensors}\n")

    runs = run_lazy_and_eager(tmp_path, recipe_text)
    (out, report), (eager_out, eager) = runs[True], runs[False]
    assert report["status"] == "ok" and report["passes"][-1]["summary"]["modules"] == 4 * 7
    streamed = _tensors(out / "export-compressed-tensors")
    whole = _tensors(eager_out / "export-compressed-tensors")
    assert set(streamed) == set(whole) and "lm_head.weight" not in whole
    for name, tensor in whole.items():
        assert torch.equal(streamed[name], tensor), name
    _reload_tied(out / "model", torch.float16)
    # The baseline reads the same float16 file either way: equal. The compressed lazy model is the layers it wrote,
    # rounded to the checkpoint's float16 (a relative step of 2^-11 per weight); the eager one keeps its float32
    # dequantized weights: that rounding alone separates the two.
    lazy_ppl, eager_ppl = (next(iter(r["metrics"]["perplexity"].values())) for r in (report, eager))
    assert lazy_ppl["baseline"] == eager_ppl["baseline"]
    assert lazy_ppl["compressed"] == pytest.approx(eager_ppl["compressed"], rel=5e-5)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
