"""Data-parallel GPTQ calibration: two gloo processes, each with half the windows, give the same Hessian and the
same quantized weights as one process with all of them, bit for bit, in every layer."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from compress.engine.distributed import all_reduce_sum, shard_windows
from compress.recipe.errors import UserError
from tests.scale.dp_worker import gptq_on_share, worker


@pytest.fixture
def one_thread():
    """The workers run on one thread each; so does the single process, so both use the same matmul kernels
    (a different thread count splits the reductions differently and moves the last bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.scale.test_moe import moe_config
    from tests.tiny_models import save_tokenizer

    folder = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config("mixtral")).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def spawn_two(model_dir, windows, out_dir, deadline_s: float = 300.0) -> list[dict[str, torch.Tensor]]:
    """Run the two gloo ranks; a hang (ranks calling different collectives) fails the test instead of blocking it."""
    context = mp.spawn(worker, args=(2, str(model_dir), windows, str(out_dir)), nprocs=2, join=False)
    start = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - start > deadline_s:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {deadline_s:.0f} s (mismatched collectives?)")
    return [load_file(str(out_dir / f"rank{r}.safetensors")) for r in range(2)]


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_two_gloo_processes_match_one(family, tiny_llama, tiny_mixtral, tmp_path, one_thread):
    """Mixtral without route_all_experts: each rank's probe batch reaches different experts, and its experts see
    different token counts, yet the ranks walk the same sublayer groups and sum the same Hessians."""
    model_dir = tiny_llama if family == "llama" else tiny_mixtral
    # Mixtral: 3-token windows, so a probe row routes 6 tokens among 8 experts and misses some, differently per rank
    windows = torch.randint(2, 300, (8, 24 if family == "llama" else 3), generator=torch.Generator().manual_seed(3))
    single = gptq_on_share(str(model_dir), windows, str(tmp_path))
    ranks = spawn_two(model_dir, windows, tmp_path)

    code_keys = [k for k in single if k.startswith("codes/")]
    assert len(code_keys) == 2 * (7 if family == "llama" else 4 + 8 * 3)
    for got in ranks:
        assert int(got["samples"]) == int(single["samples"]) == 8  # counts were summed, not averaged
        # float64 sums of the same per-batch products: the split cannot change a bit (compressors/hessian.py)
        assert torch.equal(got["hessian"], single["hessian"])
        for key in code_keys:  # every layer: layer 1 is calibrated on what each rank's quantized layer 0 gave
            assert torch.equal(got[key], single[key]), key
            scale = key.replace("codes/", "scale/")
            assert torch.equal(got[scale], single[scale]), scale


def test_shares_are_whole_batches(monkeypatch):
    from compress.engine import distributed

    windows = torch.arange(10).reshape(10, 1)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    shares = []
    for r in range(2):
        monkeypatch.setattr(distributed.dist, "get_rank", lambda r=r: r)
        shares.append(distributed.shard_windows(windows, batch_size=4).flatten().tolist())
    # batches [0-3] [4-7] [8-9]: rank 0 takes the first two, rank 1 the rest; nothing lost or repeated
    assert shares == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    with pytest.raises(UserError, match="cannot feed 2 processes"):
        distributed.shard_windows(windows[:4], batch_size=4)


def test_alone_is_world_size_one():
    windows = torch.arange(12).reshape(6, 2)
    assert torch.equal(shard_windows(windows, 4), windows)
    matrix = torch.eye(3, dtype=torch.float64)
    assert all_reduce_sum(matrix, 5) == 5 and torch.equal(matrix, torch.eye(3, dtype=torch.float64))


def test_passes_that_cannot_sum_across_ranks_are_refused(monkeypatch, tiny_llama, tmp_path):
    from compress.engine import distributed
    from compress.recipe.schema import parse_recipe
    from compress.app.runner import run_recipe

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    (tmp_path / "calib.txt").write_text("some calibration text " * 50)
    text = (f"model: {tiny_llama}\ncalibration: {{dataset: {tmp_path / 'calib.txt'}, samples: 4, seq_len: 16}}\n"
            "passes:\n  - awq: {bits: 4, group_size: 32}\n")
    with pytest.raises(UserError, match=r"passes\[0\]\.awq cannot calibrate data-parallel .* 2 processes.*gptq, sparsegpt, wanda"):
        run_recipe(parse_recipe(text), tmp_path / "out")
    assert not (tmp_path / "out").exists()
