"""Every family compress claims (compress/engine/families.py), proven on a tiny random model through the runner:
GPTQ with perplexity, a zero-shot task and an export that plain transformers reloads to the same logits; RTN; and
a run SIGKILLed after its first layer that resumes bit-identically. Other families are refused at load by name.

One model build and one GPTQ reference run per family (module cache); sizes are tiny (2 layers, hidden 64,
4 calibration windows of 32 tokens, 2 perplexity windows, 4 zero-shot documents).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from compress.app.runner import run_recipe
from compress.engine.checkpoint import FAULT_ENV, checkpoint_dir_for
from compress.engine.families import SUPPORTED, UNTESTED_ENV, check_supported_family
from compress.engine.model_io import load_model
from compress.export import export_run
from compress.recipe.errors import UserError
from compress.recipe.schema import parse_recipe
from tests.tiny_models import save_tokenizer, synthetic_text, tiny_config

# One entry per supported model_type (llama3: the llama type with GQA and llama3 rope scaling).
MATRIX = ("llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "gpt2", "gpt_neox",
          "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
# GPT-2's Conv1D weights are not what compressed-tensors targets: that export is refused, dense reloads.
EXPORT_FORMAT = {"gpt2": "dense"}
PROBE = torch.randint(2, 300, (2, 20), generator=torch.Generator().manual_seed(7))  # token ids for logit checks


def test_matrix_covers_every_supported_family():
    assert {tiny_config(family, 320).model_type for family in MATRIX} == set(SUPPORTED)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: a forked child cannot use the OpenMP pool its parent started (it hangs),
    and the killed child and the runs it is compared with must compute alike to be bit-identical. Tiny models
    gain nothing from a second thread anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    (root / "text.txt").write_text(synthetic_text(), encoding="utf-8")
    docs = [{"context": "The model", "choices": ["layer weight scale", "zero one two"], "gold": i % 2} for i in range(4)]
    (root / "task.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return root


_BUILT: dict[str, Path] = {}
_REFERENCE: dict[str, tuple[dict, torch.Tensor]] = {}


def family_model(workspace: Path, family: str) -> Path:
    if family not in _BUILT:
        from transformers import AutoModelForCausalLM

        folder = workspace / family
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=320)).save_pretrained(folder)
        save_tokenizer(folder)
        _BUILT[family] = folder
    return _BUILT[family]


def gptq_recipe(workspace: Path, family: str):
    text, task = workspace / "text.txt", workspace / "task.jsonl"
    return parse_recipe(f"""
model: {family_model(workspace, family)}
calibration: {{dataset: {text}, samples: 4, seq_len: 32, seed: 0}}
passes:
  - gptq: {{bits: 4, group_size: 32}}
evaluate:
  perplexity: [{{dataset: {text}, seq_len: 32, max_windows: 2}}]
  zero_shot: {{tasks: [{task}]}}
export: {{format: {EXPORT_FORMAT.get(family, "compressed-tensors")}}}
""")


def run_capturing_logits(recipe, output: Path, monkeypatch, **options) -> tuple[dict, torch.Tensor]:
    """run_recipe, plus the in-memory compressed model's logits on PROBE, taken as the run saves its outputs."""
    import compress.app.runner as runner

    captured: list[torch.Tensor] = []
    save = runner.save_run_outputs

    def save_and_probe(handle, *args, **kwargs):
        with torch.no_grad():
            captured.append(handle.model(PROBE).logits)
        return save(handle, *args, **kwargs)

    monkeypatch.setattr(runner, "save_run_outputs", save_and_probe)
    report = run_recipe(recipe, output, **options)
    return report, captured[0]


def reference_run(workspace: Path, family: str, monkeypatch) -> tuple[dict, torch.Tensor]:
    if family not in _REFERENCE:
        _REFERENCE[family] = run_capturing_logits(gptq_recipe(workspace, family), workspace / f"gptq-{family}",
                                                  monkeypatch)
    return _REFERENCE[family]


def reloaded_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing newly initialised or dropped
    with torch.no_grad():
        return model.eval()(PROBE).logits


_LINEARS: dict[Path, int] = {}


def decoder_linears(model_dir: Path) -> int:
    """How many linears (Conv1D for GPT-2, each expert's own) the loaded model's decoder layers hold."""
    from compress.quant.modules import is_linear

    if model_dir not in _LINEARS:
        handle = load_model(str(model_dir), device="cpu")
        _LINEARS[model_dir] = sum(1 for module in handle.layers.modules() if is_linear(module))
    return _LINEARS[model_dir]


@pytest.mark.parametrize("family", MATRIX)
def test_gptq_evaluates_and_its_export_reloads_with_the_same_logits(workspace, family, monkeypatch):
    report, in_memory = reference_run(workspace, family, monkeypatch)
    modules = report["passes"][0]["modules"]
    assert len(modules) == decoder_linears(family_model(workspace, family))  # every decoder linear, experts too
    ppl = report["metrics"]["perplexity"]["text"]
    assert 1 < ppl["baseline"] < 1000 and 1 < ppl["compressed"] < 1000  # random weights over 320 tokens: ~320
    assert ppl["compressed"] != ppl["baseline"]
    for metric in ("acc", "acc_norm"):
        zero_shot = report["metrics"][metric]["task"]
        assert zero_shot["protocol"]["docs"] == 4 and zero_shot["compressed"] in (0.0, 0.25, 0.5, 0.75, 1.0)

    export = Path(report["export"]["path"])
    torch.testing.assert_close(reloaded_logits(export), in_memory, rtol=1e-4, atol=1e-4)
    # `compress export` later, from the state the run kept, gives the same model
    dense = export_run(workspace / f"gptq-{family}", "dense", workspace / f"dense-{family}")
    torch.testing.assert_close(reloaded_logits(Path(dense["path"])), in_memory, rtol=1e-4, atol=1e-4)


def test_gpt2_compressed_tensors_export_is_refused_naming_the_module(workspace, monkeypatch):
    reference_run(workspace, "gpt2", monkeypatch)
    with pytest.raises(UserError, match=r"transformer\.h\.0\.attn\.c_attn is not an nn\.Linear .*--format dense"):
        export_run(workspace / "gptq-gpt2", "compressed-tensors", workspace / "ct-gpt2")
    assert not (workspace / "ct-gpt2").exists()


def test_gpt2_compressed_tensors_export_in_a_recipe_is_refused_before_the_passes(workspace, monkeypatch):
    import compress.app.runner as runner

    def no_passes(*args, **kwargs):
        raise AssertionError("the passes ran before the export format was refused")

    monkeypatch.setattr(runner, "run_passes", no_passes)
    text = workspace / "text.txt"
    recipe = parse_recipe(f"""
model: {family_model(workspace, "gpt2")}
calibration: {{dataset: {text}, samples: 4, seq_len: 32, seed: 0}}
passes:
  - rtn: {{bits: 4, group_size: 32}}
export: {{format: compressed-tensors}}
""")
    with pytest.raises(UserError, match=r"packs nn\.Linear weights only.*transformer\.h\.0\.attn\.c_attn.*format: dense"):
        run_recipe(recipe, workspace / "gpt2-ct-refused")
    assert not (workspace / "gpt2-ct-refused").exists()


@pytest.mark.parametrize("family", MATRIX)
def test_rtn_quantizes_every_decoder_linear(workspace, family):
    text = workspace / "text.txt"
    recipe = parse_recipe(f"""
model: {family_model(workspace, family)}
passes: [{{rtn: {{bits: 4, group_size: 32}}}}]
evaluate:
  perplexity: [{{dataset: {text}, seq_len: 32, max_windows: 2}}]
""")
    report = run_recipe(recipe, workspace / f"rtn-{family}", checkpoints=False)
    modules = report["passes"][0]["modules"]
    assert len(modules) == decoder_linears(family_model(workspace, family))
    assert all(m["bits"] == 4 for m in modules.values()), next(iter(modules.values()))
    ppl = report["metrics"]["perplexity"]["text"]
    assert 1 < ppl["compressed"] < 1000 and ppl["compressed"] != ppl["baseline"]


def killed_after_first_layer(recipe, output: Path) -> int:
    """Run `recipe` in a forked copy of this process that SIGKILLs itself right after its first layer checkpoint
    (nothing gets to clean up, as with a real kill); returns the child's exit code (-9)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)
            os.environ[FAULT_ENV] = "0:KILL"
            run_recipe(recipe, output)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill is simulated in a forked process")
@pytest.mark.parametrize("family", MATRIX)
def test_killed_run_resumes_bit_identically(workspace, family, monkeypatch):
    reference, _ = reference_run(workspace, family, monkeypatch)
    recipe, output = gptq_recipe(workspace, family), workspace / f"resumed-{family}"
    assert killed_after_first_layer(recipe, output) == -9
    assert sorted(p.name for p in (checkpoint_dir_for(output) / "sweep-0").iterdir()) == ["layer-0000"]
    assert not output.exists()

    resumed = run_recipe(recipe, output, resume=True)
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["passes"][0]["modules"] == reference["passes"][0]["modules"]
    assert resumed["metrics"] == reference["metrics"]
    assert "resuming at decoder layer 1 of 2" in (output / "run.log").read_text()


def write_config_only(folder: Path, config) -> Path:
    """config.json beside a safetensors file that holds no tensor: the refusal must come before any weight is read."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({}, folder / "model.safetensors")
    return folder


def test_encoder_decoder_is_refused_by_name_before_weights_are_read(tmp_path):
    import transformers as tf

    folder = write_config_only(tmp_path / "t5", tf.T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64))
    with pytest.raises(UserError, match=r"model_type 't5' is an encoder-decoder model; compress compresses "
                                        r"decoder-only causal LMs"):
        load_model(str(folder))


def test_unsupported_layout_is_refused_by_name_unless_the_user_opts_in(tmp_path, monkeypatch):
    import transformers as tf

    folder = write_config_only(tmp_path / "mamba", tf.MambaConfig(hidden_size=32, num_hidden_layers=1))
    with pytest.raises(UserError, match=r"model_type 'mamba' is not supported: it is a state-space model"):
        load_model(str(folder))
    falcon = write_config_only(tmp_path / "falcon", tf.FalconConfig(hidden_size=32, num_hidden_layers=1))
    with pytest.raises(UserError, match=r"model_type 'falcon' is not a supported family \(supported: Llama .*"
                                        rf"Set {UNTESTED_ENV}=1 to try it anyway"):
        load_model(str(falcon))
    monkeypatch.setenv(UNTESTED_ENV, "1")
    check_supported_family(str(falcon), tf.FalconConfig().to_dict())  # the user's own risk: no refusal
