"""A corpus of hostile model folders: every one is exit 2, names the folder or file (and the tensor), no traceback,
no run folder left behind; none exits 0 on missing, unexpected or non-finite weights.

Each variant is a copy of a good model with one thing broken, the way a careless download, a hand-edited
config.json or a crashed save breaks it. The CLI runs in-process (typer's CliRunner): a load that fails costs
milliseconds, not a Python start-up.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compress.cli.main import app
from tests.real_shapes import save_real_shape_model

Breaker = Callable[[Path], str]  # breaks the model folder in place; returns a regex the error message must match


# --- helpers that edit a folder ---------------------------------------------------------------------


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 file: str = "model.safetensors") -> None:
    tensors = load_file(folder / file)
    save_file(edit(dict(tensors)), folder / file, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header: dict, body: bytes, *, header_bytes: bytes | None = None) -> None:
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def edit_header(folder: Path, edit: Callable[[dict], None], file: str = "model.safetensors") -> None:
    header, body = split_safetensors(folder / file)
    edit(header)
    write_safetensors(folder / file, header, body)


def first_weight(header: dict, fragment: str) -> dict:
    return header[next(name for name in sorted(header) if fragment in name)]


def drop(name: str) -> Breaker:
    def breaker(folder: Path) -> str:
        edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name})
        return name
    return breaker


def poison(name: str, value: float) -> Breaker:
    def breaker(folder: Path) -> str:
        def edit(tensors):
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[3] = value
            return tensors
        edit_tensors(folder, edit)
        return name
    return breaker


def config_change(expected: str, **changes) -> Breaker:
    def breaker(folder: Path) -> str:
        edit_config(folder, **changes)
        return expected
    return breaker


def header_change(expected: str, edit: Callable[[dict], None]) -> Breaker:
    def breaker(folder: Path) -> str:
        edit_header(folder, edit)
        return expected
    return breaker


# --- the variants -------------------------------------------------------------------------------------


def _rename(folder: Path) -> str:
    edit_tensors(folder, lambda t: {("model.final_norm.weight" if k == "model.norm.weight" else k): v for k, v in t.items()})
    return "model.norm.weight"  # missing (and, eagerly, model.final_norm.weight unexpected)


def _extra_tensor(folder: Path) -> str:
    edit_tensors(folder, lambda t: {**t, "model.extra_adapter.weight": torch.ones(4, 4)})
    return "model.extra_adapter.weight"


def _transposed(folder: Path) -> str:
    name = "model.layers.0.mlp.up_proj.weight"
    edit_tensors(folder, lambda t: {**t, name: t[name].t().contiguous()})
    return name


def _bad_header_json(folder: Path) -> str:
    header, body = split_safetensors(folder / "model.safetensors")
    encoded = json.dumps(header).encode()
    write_safetensors(folder / "model.safetensors", header, body, header_bytes=b"{" + b"x" * (len(encoded) - 1))
    return "header is not JSON"


def _header_not_utf8(folder: Path) -> str:
    header, body = split_safetensors(folder / "model.safetensors")
    encoded = json.dumps(header).encode()
    write_safetensors(folder / "model.safetensors", header, body, header_bytes=b"\xff\xfe" + encoded[2:])
    return "header is not JSON"


def _header_is_list(folder: Path) -> str:
    header, body = split_safetensors(folder / "model.safetensors")
    encoded = json.dumps([1, 2]).encode()
    write_safetensors(folder / "model.safetensors", header, body, header_bytes=encoded)
    return "not an object"


def _truncated(folder: Path) -> str:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return "truncated"


def _huge_header_length(folder: Path) -> str:
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + path.read_bytes()[8:])
    return "header claims"


def _header_past_end(folder: Path) -> str:
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return "header claims"


def _empty_file(folder: Path) -> str:
    (folder / "model.safetensors").write_bytes(b"")
    return "0 bytes"


def _four_bytes(folder: Path) -> str:
    (folder / "model.safetensors").write_bytes(b"\x01\x02\x03\x04")
    return "4 bytes"


def _past_end(folder: Path) -> str:
    header, body = split_safetensors(folder / "model.safetensors")
    # the last tensor claims 256 bytes more than the file holds, consistently with its shape
    last = max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
    last["shape"] = [last["shape"][0] + 1] + last["shape"][1:]
    row_bytes = (last["data_offsets"][1] - last["data_offsets"][0]) // (last["shape"][0] - 1)
    last["data_offsets"][1] += row_bytes
    write_safetensors(folder / "model.safetensors", header, body)
    return "truncated"


def _dtype_lie(header: dict) -> None:
    # a dtype of another width (a same-width swap, BF16 for F16, cannot be told from the header)
    entry = first_weight(header, "norm.weight")
    entry["dtype"] = "F16" if entry["dtype"] == "F32" else "F32"


def _shape_lie(header: dict) -> None:
    entry = first_weight(header, "up_proj.weight")
    entry["shape"] = [entry["shape"][0], entry["shape"][1] + 1]


def _overlap(header: dict) -> None:
    entries = sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    entries[1]["data_offsets"] = [entries[1]["data_offsets"][0] - 4, entries[1]["data_offsets"][1] - 4]


def _unknown_dtype(header: dict) -> None:
    first_weight(header, "norm.weight")["dtype"] = "F17"


def _no_offsets(header: dict) -> None:
    del first_weight(header, "norm.weight")["data_offsets"]


def _negative_shape(header: dict) -> None:
    first_weight(header, "norm.weight")["shape"] = [-64]


def _dangling_symlink(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(folder / "gone" / "model.safetensors")
    return "does not exist"


def _safetensors_is_folder(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    return "not a file"


def _sharded(folder: Path) -> dict:
    """Split model.safetensors into two shards with an index, as large hub checkpoints are."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, members in shards.items():
        save_file({n: tensors[n] for n in members}, folder / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, members in shards.items() for n in members}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def _missing_shard(folder: Path) -> str:
    _sharded(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors"


def _dangling_shard(folder: Path) -> str:
    _sharded(folder)
    (folder / "model-00001-of-00002.safetensors").unlink()
    (folder / "model-00001-of-00002.safetensors").symlink_to("../blobs/abc123")
    return "model-00001-of-00002.safetensors"


def _index_not_json(folder: Path) -> str:
    _sharded(folder)
    (folder / "model.safetensors.index.json").write_text("{weight_map: oops")
    return "model.safetensors.index.json"


def _index_without_map(folder: Path) -> str:
    _sharded(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return "weight_map"


def _index_wrong_shard(folder: Path) -> str:
    index = _sharded(folder)
    name = next(n for n, f in index["weight_map"].items() if f.startswith("model-00001"))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return name


def _index_names_absent_tensor(folder: Path) -> str:
    index = _sharded(folder)
    name = "model.layers.1.self_attn.k_proj.weight"
    index["weight_map"]["model.layers.1.self_attn.k_proj.bias"] = index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.layers.1.self_attn.k_proj.bias"


def _pickle_only(folder: Path) -> str:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return "pickle"


def _no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "holds no model weights"


def _empty_folder(folder: Path) -> str:
    shutil.rmtree(folder)
    folder.mkdir()
    return "holds no model weights|has no config.json"  # eager loads look at the weights first, lazy at the config


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "config"


def _config_not_json(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return "config.json"


def _config_not_utf8(folder: Path) -> str:
    (folder / "config.json").write_bytes('{"model_type": "llama", "name": "caf\u00e9"}'.encode("latin-1"))
    return "config"


def _config_list(folder: Path) -> str:
    (folder / "config.json").write_text("[1, 2, 3]")
    return "config"


VARIANTS: dict[str, Breaker] = {
    # weights that do not match the config (defects 1 and 2)
    "deleted-layer-tensor": drop("model.layers.0.mlp.up_proj.weight"),
    "deleted-final-norm": drop("model.norm.weight"),
    "deleted-embeddings": drop("model.embed_tokens.weight"),
    "deleted-head": drop("lm_head.weight"),
    "more-layers-than-checkpoint": config_change("model.layers.2", num_hidden_layers=3),
    "fewer-layers-than-checkpoint": config_change("model.layers.1", num_hidden_layers=1),
    "bert-over-llama": config_change("model_type", model_type="bert"),
    "gpt2-over-llama": config_change("model_type", model_type="gpt2"),
    "renamed-tensor": _rename,
    "extra-tensor": _extra_tensor,
    "intermediate-size-mismatch": config_change("up_proj", intermediate_size=128),
    "vocab-size-mismatch": config_change("embed_tokens", vocab_size=300),
    "transposed-tensor": _transposed,
    # non-finite weights, inside and outside the decoder layers (defect 4)
    "nan-embeddings": poison("model.embed_tokens.weight", float("nan")),
    "inf-final-norm": poison("model.norm.weight", float("inf")),
    "nan-head": poison("lm_head.weight", float("nan")),
    "inf-layer-weight": poison("model.layers.1.self_attn.q_proj.weight", float("-inf")),
    "nan-layer-norm": poison("model.layers.0.input_layernorm.weight", float("nan")),
    # corrupt safetensors files (defect 10)
    "bad-header-json": _bad_header_json,
    "header-not-utf8": _header_not_utf8,
    "header-is-a-list": _header_is_list,
    "truncated-body": _truncated,
    "huge-header-length": _huge_header_length,
    "header-length-past-end": _header_past_end,
    "offsets-past-end": _past_end,
    "empty-safetensors": _empty_file,
    "four-byte-safetensors": _four_bytes,
    "dtype-lie": header_change("needs", _dtype_lie),
    "shape-lie": header_change("needs", _shape_lie),
    "overlapping-offsets": header_change("overlaps", _overlap),
    "unknown-dtype": header_change("F17", _unknown_dtype),
    "missing-data-offsets": header_change("data_offsets", _no_offsets),
    "negative-shape": header_change("shape", _negative_shape),
    "dangling-symlink": _dangling_symlink,
    "safetensors-is-a-folder": _safetensors_is_folder,
    # sharded checkpoints
    "missing-shard": _missing_shard,
    "dangling-shard-symlink": _dangling_shard,
    "index-not-json": _index_not_json,
    "index-without-weight-map": _index_without_map,
    "index-names-wrong-shard": _index_wrong_shard,
    "index-names-absent-tensor": _index_names_absent_tensor,
    # not a usable folder at all
    "pickle-only": _pickle_only,
    "no-weights": _no_weights,
    "empty-folder": _empty_folder,
    "no-config": _no_config,
    "config-not-json": _config_not_json,
    "config-not-utf8": _config_not_utf8,
    "config-is-a-list": _config_list,
    "unknown-model-type": config_change("no_such_family", model_type="no_such_family"),
    # positions (defect 5): the recipe's perplexity seq_len is 32
    "fewer-positions-than-seq-len": config_change("max_position_embeddings", max_position_embeddings=16),
}

# The same breakage at the realistic shape: a 128,256-token vocabulary, bf16, untied head, rope scaling.
REAL_SHAPE_VARIANTS = ("deleted-head", "fewer-layers-than-checkpoint", "nan-embeddings", "inf-final-norm",
                       "truncated-body", "dtype-lie", "fewer-positions-than-seq-len")


RECIPE = """\
lazy: {lazy}
passes:
  - rtn: {{bits: 4, group_size: 32}}
evaluate:
  perplexity: [{{dataset: {text}, seq_len: 32, max_windows: 2}}]
"""


def run_cli(recipe: Path, model: Path, output: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", str(recipe), "--model", str(model), "--output", str(output), "--quiet"])
    return result.exit_code, result.output


def check_refused(name: str, breaker: Breaker, good: Path, tmp_path: Path, text_file: Path, *, lazy: bool = False) -> None:
    folder = tmp_path / name
    shutil.copytree(good, folder, symlinks=True)
    expected = breaker(folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(text=text_file, lazy=str(lazy).lower()))
    output = tmp_path / f"out-{name}"
    code, text = run_cli(recipe, folder, output)
    flat = " ".join(text.split())  # rich wraps long lines
    assert code == 2, f"{name}: exit {code}\n{text}"
    assert "Traceback" not in text and "internal error" not in text, f"{name}:\n{text}"
    assert str(folder) in flat.replace(" ", "") or str(folder) in flat, f"{name}: folder not named\n{text}"
    assert re.search(expected, flat) or re.search(expected, flat.replace(" ", "")), f"{name}: {expected!r} not in\n{text}"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((f"out-{name}", f".out-{name}"))], \
        f"{name}: a run folder was left behind"


def test_the_unbroken_model_runs(tiny_llama, tmp_path, text_file):
    """The harness itself: the same recipe on the unbroken copy exits 0 (so the refusals are the breakage's)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(text=text_file, lazy="false"))
    code, text = run_cli(recipe, tiny_llama, tmp_path / "out")
    assert code == 0, text
    assert (tmp_path / "out" / "report.json").is_file()


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_every_hostile_folder_is_refused(tiny_llama, tmp_path, text_file, lazy):
    """`lazy: true` reads the shards itself: the same checks, against the headers and the index."""
    assert len(VARIANTS) >= 40
    failures = []
    for name, breaker in VARIANTS.items():
        try:
            check_refused(name, breaker, tiny_llama, tmp_path, text_file, lazy=lazy)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(VARIANTS)} variants:\n\n" + "\n\n".join(failures)


@pytest.fixture(scope="module")
def llama3_shaped(tmp_path_factory) -> Path:
    return save_real_shape_model(tmp_path_factory.mktemp("llama3") / "model", "llama3")


def test_hostile_folders_at_the_real_shape(llama3_shaped, tmp_path, text_file):
    failures = []
    for name in REAL_SHAPE_VARIANTS:
        try:
            check_refused(name, VARIANTS[name], llama3_shaped, tmp_path, text_file)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)
