"""Recipes that validate are recipes that run: every value `compress validate` accepts is one the run can use.

Each test names the defect class of issue 15 it pins down: pass order (3), files that are not UTF-8 and
self-referencing anchors (11), values that crashed after validation (12), and recipe hygiene (duplicate keys,
strict types, bounded integers, lines for every problem, size caps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app
from compress.recipe.schema import parse_recipe
from tests.conftest import recipe_text

BASE = """\
model: org/some-model
calibration: {dataset: text.txt, samples: 4, seq_len: 32}
passes:
  - rtn: {bits: 4}
evaluate:
  perplexity: [{dataset: text.txt}]
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "text.txt").write_text("hello world " * 50, encoding="utf-8")
    return tmp_path


def validate(folder: Path, text: str | bytes, *args: str) -> tuple[int, str]:
    path = folder / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))
    result = CliRunner().invoke(app, ["validate", str(path), *args])
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    return result.exit_code, result.output.replace(str(path), "r.yaml")


def refused(folder: Path, text: str | bytes, *args: str) -> str:
    code, output = validate(folder, text, *args)
    assert code == 2, output
    return output


def with_passes(passes: str) -> str:
    return BASE.replace("  - rtn: {bits: 4}\n", passes)


# ---------------------------------------------------------------------------------------------------
# Defect 3: pass order


@pytest.mark.parametrize("passes, line, message", [
    ("  - rtn: {bits: 4}\n  - magnitude: {sparsity: 0.5}\n", 5,
     "passes[1].magnitude: 'magnitude' must come before 'rtn' (passes[0]): the export saves the quantizer's integer codes"),
    ("  - gptq: {bits: 4}\n  - wanda: {sparsity: 0.5}\n", 5, "passes[1].wanda: 'wanda' must come before 'gptq'"),
    ("  - rtn: {bits: 8}\n  - rtn: {bits: 4}\n", 5, "passes[1].rtn: 'rtn' would be a second quantizer after 'rtn' (passes[0])"),
    ("  - awq: {bits: 4}\n  - gptq: {bits: 4}\n", 5, "passes[1].gptq: 'gptq' would be a second quantizer after 'awq'"),
    ("  - rtn: {bits: 4}\n  - smoothquant: {alpha: 0.5}\n", 5, "passes[1].smoothquant: 'smoothquant' must come before 'rtn'"),
    ("  - magnitude: {sparsity: 0.5}\n  - layer_drop: {count: 1}\n", 5,
     "passes[1].layer_drop: 'layer_drop' must come before 'magnitude' (passes[0]): it removes layers or channels"),
    ("  - owl: {sparsity: 0.5}\n  - width_prune: {mlp_ratio: 0.25}\n  - wanda: {}\n", 5,
     "passes[1].width_prune: 'width_prune' must come before 'owl'"),
    ("  - rtn: {bits: 4}\n  - layer_drop: {count: 1}\n", 5, "passes[1].layer_drop: 'layer_drop' must come before 'rtn'"),
])
def test_refused_pass_orders_name_the_line_and_the_order_that_works(folder, passes, line, message):
    output = refused(folder, with_passes(passes))
    assert f"r.yaml:{line} {message}" in output
    assert "Order that works: restructure/rotate (layer_drop, width_prune, rotate), then" in output


@pytest.mark.parametrize("passes", [
    "  - layer_drop: {count: 1}\n  - width_prune: {mlp_ratio: 0.25}\n  - owl: {sparsity: 0.5}\n  - wanda: {sparsity: 0.5}\n  - gptq: {}\n",
    "  - smoothquant: {alpha: 0.5}\n  - rtn: {bits: 8, group_size: null, activations: {bits: 8}}\n",
    "  - awq: {bits: 4, quantize: false}\n  - gptq: {bits: 4}\n",  # AWQ scales + GPTQ rounding: awq acts as a transform
    '  - sparsegpt: {pattern: "2:4"}\n  - allocate: {budget: {avg_bits: 4}}\n  - gptq: {}\n',
    "  - magnitude: {sparsity: 0.3}\n  - magnitude: {sparsity: 0.5}\n",  # pruning twice: masks are AND-ed
])
def test_allowed_pass_orders_validate(folder, passes):
    code, output = validate(folder, with_passes(passes))
    assert code == 0, output


def test_prune_then_quantize_exports_exactly_the_weights_it_evaluated(tiny_llama, text_file, tmp_path):
    """The order that is allowed is exported as evaluated: the same zeros and the same bytes in every linear."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from compress.app.runner import run_recipe
    from compress.export import STATE_DIR, load_state

    passes = "  - magnitude: {sparsity: 0.5}\n  - rtn: {bits: 4, group_size: 32}"
    text = recipe_text(tiny_llama, text_file, passes, text_file) + "export: {format: compressed-tensors}\n"
    report = run_recipe(parse_recipe(text), tmp_path / "out")
    evaluated = load_state(tmp_path / "out" / STATE_DIR).model.state_dict()  # what the evaluators scored
    decompress = CompressedTensorsConfig(run_compressed=False)  # plain float weights, decoded by compressed-tensors
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "export-compressed-tensors", dtype=torch.float32,
                                                    quantization_config=decompress).state_dict()
    linears = [f"{fqn}.weight" for fqn in sorted(report["passes"][1]["modules"])]
    assert len(linears) == 14

    def digest(weights: dict) -> str:
        return hashlib.sha256(b"".join(weights[name].float().numpy().tobytes() for name in linears)).hexdigest()

    assert digest(exported) == digest(evaluated)
    zeros = sum(int((exported[name] == 0).sum()) for name in linears) / sum(exported[name].numel() for name in linears)
    assert zeros == pytest.approx(report["passes"][0]["summary"]["mean_sparsity"], abs=1e-3)
    assert zeros == pytest.approx(0.5, abs=1e-3)


# ---------------------------------------------------------------------------------------------------
# Defect 11: files that are not UTF-8, self-referencing anchors, alias bombs


def test_recipe_that_is_not_utf8_names_the_byte_offset(folder):
    text = BASE.encode() + b"model: caf\xe9\n"
    output = refused(folder, text)
    offset = len(BASE.encode()) + len(b"model: caf")
    assert f"r.yaml:7 <root>: not UTF-8: byte 0xe9 at byte offset {offset} cannot be decoded" in output


@pytest.mark.parametrize("field, old, new", [
    ("calibration.dataset", "dataset: text.txt, samples", "dataset: latin1.txt, samples"),
    ("evaluate.perplexity[0].dataset", "[{dataset: text.txt}]", "[{dataset: latin1.txt}]"),
])
def test_calibration_and_evaluation_files_that_are_not_utf8_fail_validation(folder, field, old, new):
    (folder / "latin1.txt").write_bytes(b"hello\nna\xefve text\n")
    output = refused(folder, BASE.replace(old, new))
    assert f"{field}: {folder / 'latin1.txt'}: not UTF-8: byte 0xef at byte offset 8 (line 2)" in output


def test_text_loader_names_the_file_and_offset_too(tmp_path):
    """The run reads the files again; one that changed since validation is still a user error, not exit 1."""
    from compress.engine.data import load_text
    from compress.recipe.errors import UserError

    (tmp_path / "a.txt").write_bytes(b"ok\n\xff")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"a.txt:2: not UTF-8: byte 0xff at byte offset 3"):
        load_text(str(tmp_path / "a.txt"))
    with pytest.raises(UserError, match=r"b.jsonl:2: not UTF-8: byte 0xff at byte offset 25"):
        load_text(str(tmp_path / "b.jsonl"))


@pytest.mark.parametrize("text, line, path", [
    (BASE + "x: &a [1, *a]\n", 7, "x[1]"),
    ("passes: &a\n  - *a\n", 1, "passes[0]"),
    (BASE + "y: &b {c: {d: *b}}\n", 7, "y.c.d"),
])
def test_self_referencing_anchor_is_refused(folder, text, line, path):
    output = refused(folder, text)
    assert f"r.yaml:{line} {path}: an anchor's value contains its own alias" in output


def test_billion_laughs_is_refused_at_once(folder):
    levels = ["a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 values expanded
    start = time.perf_counter()
    output = refused(folder, "\n".join(levels) + "\npasses: *a8\n")
    assert "more than 100,000 values (YAML anchors and aliases expand)" in output
    assert time.perf_counter() - start < 20  # milliseconds when idle; the bound only catches an expansion


# ---------------------------------------------------------------------------------------------------
# Defect 12: values that validated and then crashed the run


@pytest.mark.parametrize("passes, message", [
    ("  - rtn: {bits: 4, ignore: ['re:(']}\n",
     "passes[0].rtn.ignore: 're:(' is not a valid regular expression: missing ), unterminated subpattern"),
    ("  - magnitude: {sparsity: 0.5, ignore: ['re:[z-a]']}\n", "passes[0].magnitude.ignore: 're:[z-a]' is not a valid regular"),
    ("  - allocate: {budget: {avg_bits: 4}, constraints: {min_bits: {'re:*down': 4}}}\n  - gptq: {}\n",
     "passes[0].allocate.constraints.min_bits: min_bits: 're:*down' is not a valid regular expression"),
])
def test_invalid_regex_in_a_pattern_field(folder, passes, message):
    assert message in refused(folder, with_passes(passes))


def test_seed_beyond_what_torch_takes(folder):
    output = refused(folder, BASE.replace("seq_len: 32}", f"seq_len: 32, seed: {2**64}}}"))
    assert "r.yaml:2 calibration.seed: expected less than or equal to 9223372036854775807" in output
    import torch

    torch.Generator().manual_seed(2**63 - 1)  # the bound is one torch accepts


@pytest.mark.parametrize("budget, message", [
    ("{cpu: lots}", "max_memory.cpu: expected a size such as 70GiB or 500MB, got 'lots'"),
    ("{0: 70GiB, gpu: 1GB}", "max_memory.gpu: expected a GPU index (0, 1, ...) or cpu, got 'gpu'"),
    ("{cpu: -5GB}", "max_memory.cpu: expected a size such as 70GiB"),
])
def test_max_memory_is_read_by_accelerate_at_validate_time(folder, budget, message):
    assert f"r.yaml:7 {message}" in refused(folder, BASE + f"max_memory: {budget}\n")


def test_max_memory_that_accelerate_reads_is_accepted(folder):
    assert validate(folder, BASE + "max_memory: {0: 70GiB, 1: 500MB, cpu: 200GiB}\n")[0] == 0


PATH_FIELDS = [
    ("model", lambda v: BASE.replace("model: org/some-model", f'model: "{v}"'), 1),
    ("calibration.dataset", lambda v: BASE.replace("dataset: text.txt, samples", f'dataset: "{v}", samples'), 2),
    ("calibration.offload_dir", lambda v: BASE.replace("seq_len: 32}", f'seq_len: 32, offload_dir: "{v}"}}'), 2),
    ("evaluate.perplexity[0].dataset", lambda v: BASE.replace("[{dataset: text.txt}]", f'[{{dataset: "{v}"}}]'), 6),
    ("evaluate.perplexity[0].data_dir", lambda v: BASE.replace("[{dataset: text.txt}]", f'[{{dataset: text.txt, data_dir: "{v}"}}]'), 6),
    ("passes[0].rtn.plan", lambda v: with_passes(f'  - rtn: {{plan: "{v}"}}\n'), 4),
    ("export.path", lambda v: BASE + f'export: {{path: "{v}"}}\n', 7),
]


@pytest.mark.parametrize("field, make, line", PATH_FIELDS, ids=[f[0] for f in PATH_FIELDS])
@pytest.mark.parametrize("value, message", [
    ("a\\0b", "a path cannot contain a NUL character"),
    ("x" * 5000, "the path is 5,000 bytes long; file systems allow at most 4,095"),
    ("d/" + "y" * 300, "a file or folder name in the path is 300 bytes long"),
])
def test_unusable_paths_in_every_path_field(folder, field, make, line, value, message):
    assert f"r.yaml:{line} {field}: {message}" in refused(folder, make(value))


def test_unusable_model_option(folder):
    assert "(--set) model: a path cannot contain a NUL character" in refused(folder, BASE, "--model", "bad\0name")


# ---------------------------------------------------------------------------------------------------
# Recipe hygiene


def test_duplicate_keys_are_errors_naming_both_lines(folder):
    output = refused(folder, BASE + "trust_remote_code: false\ntrust_remote_code: true\n")
    assert ("r.yaml:8 trust_remote_code: duplicate key 'trust_remote_code' (lines 7 and 8): YAML would silently keep "
            "only the last; remove one") in output
    nested = refused(folder, with_passes("  - rtn: {bits: 4, bits: 3}\n"))
    assert "r.yaml:4 passes[0].rtn.bits: duplicate key 'bits' (twice on line 4)" in nested


def test_yaml_merge_keys_may_override_what_they_bring(folder):
    text = BASE.replace("  perplexity: [{dataset: text.txt}]\n",
                        "  perplexity:\n    - &ppl {dataset: text.txt, seq_len: 32}\n    - {<<: *ppl, seq_len: 64}\n")
    code, output = validate(folder, text)
    assert code == 0, output
    recipe = parse_recipe(text, base_dir=folder)
    assert [e.config.seq_len for e in recipe.evaluations] == [32, 64]


@pytest.mark.parametrize("text, message", [
    (BASE + 'trust_remote_code: "yes"\n', "r.yaml:7 trust_remote_code: expected a valid boolean, got 'yes'"),
    (BASE + "lazy: 1\n", "r.yaml:7 lazy: expected a valid boolean, got 1"),
    (with_passes("  - rtn: {bits: 4, group_size: true}\n"), "r.yaml:4 passes[0].rtn.group_size: expected a valid integer, got True"),
    (with_passes("  - rtn: {bits: 4.0}\n"), "r.yaml:4 passes[0].rtn.bits: expected a valid integer, got 4.0"),
    (with_passes('  - rtn: {bits: "4"}\n'), "r.yaml:4 passes[0].rtn.bits: expected a valid integer, got '4'"),
    (with_passes("  - smoothquant: {alpha: .nan}\n  - rtn: {}\n"), "r.yaml:4 passes[0].smoothquant.alpha: expected a finite number"),
])
def test_strict_types_do_not_coerce(folder, text, message):
    assert message in refused(folder, text)


def test_integers_are_still_valid_floats(folder):
    assert validate(folder, with_passes("  - smoothquant: {alpha: 1}\n  - rtn: {}\n"))[0] == 0


@pytest.mark.parametrize("text, message", [
    (BASE.replace("seq_len: 32", "seq_len: 1000000000000000000000000000000"), "calibration.seq_len: expected less than or equal to 1000000"),
    (with_passes("  - layer_drop: {count: 1000000000000000000000000000000}\n"), "passes[0].layer_drop.count: expected less than or equal to 10000"),
    (BASE.replace("[{dataset: text.txt}]", "[{dataset: text.txt, batch_size: 10000000000000}]"),
     "evaluate.perplexity[0].batch_size: expected at most 2,147,483,647 (no setting needs more)"),
    (with_passes("  - gptq: {block_size: 99999999999}\n"), "passes[0].gptq.block_size: expected less than or equal to 1048576"),
])
def test_every_integer_has_an_upper_bound(folder, text, message):
    assert message in refused(folder, text)


def test_control_characters_get_the_file_line_not_set(folder):
    output = refused(folder, BASE + "model2: a\x01b\n")
    assert "r.yaml:7 <root>: not valid YAML: unacceptable character #x0001" in output and "(--set)" not in output


def test_recipe_file_size_is_capped(folder):
    output = refused(folder, BASE + "#" * 1_100_000 + "\n")
    assert "r.yaml:1 <root>: the file is 1,100," in output and "a recipe is at most 1,000,000 bytes (1 MB)" in output


def test_large_allowed_recipe_with_many_problems_validates_in_linear_time(folder):
    """190 kB, 2,500 passes, each after the first a problem: each located by an index per mapping and checked
    against the pass order in one walk, not by a scan per problem or per pair of passes."""
    body = "".join("  - rtn: {bits: 4, group_size: 128, ignore: [lm_head, 're:layers\\.0\\.']}\n" for _ in range(2500))
    text = with_passes(body)
    assert 150_000 < len(text) < 1_000_000
    start = time.perf_counter()
    code, output = validate(folder, text)
    assert code == 2 and "2499 problems in recipe" in output and "... and 2479 more" in output  # 20 listed
    assert time.perf_counter() - start < 60  # seconds under load


def test_sweep_grid_is_capped_before_it_is_expanded(tmp_path):
    from compress.app.sweep import load_sweep
    from compress.recipe.errors import RecipeError

    grid = "\n".join(f"  passes[0].rtn.k{i}: [{', '.join(map(str, range(10)))}]" for i in range(7))  # 10^7 trials
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"recipe: demo\ngrid:\n{grid}\n", encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_sweep(sweep)
    assert [issue.render("sweep.yaml") for issue in info.value.issues] == [
        "sweep.yaml:2 grid: 10,000,000 trials (models x the product of the grid's lists); a sweep runs at most 1,000: "
        "split it into several sweep files"]
    assert time.perf_counter() - start < 20  # counted, not expanded: the 13.9-million grid hung for 10 minutes
    sweep.write_text("recipe: demo\nparallel: 100000\ngrid:\n  passes[0].rtn.bits: [3, 4]\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_sweep(sweep)
    assert [issue.render("sweep.yaml") for issue in info.value.issues] == [
        "sweep.yaml:2 parallel: expected less than or equal to 256, got 100000"]


def test_json_output_of_a_refused_recipe_has_lines(folder):
    (folder / "r.yaml").write_text(BASE + "lazy: true\nlazy: false\n")
    result = CliRunner().invoke(app, ["validate", str(folder / "r.yaml"), "--json"])  # stderr has the message
    assert result.exit_code == 2
    issue = json.loads(result.stdout)["issues"][0]
    assert issue["line"] == 8 and issue["path"] == "lazy"
