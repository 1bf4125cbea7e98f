"""Sensitivity estimators against exact references on tiny layers."""

import pytest
import torch
import torch.nn.functional as F

from compress.compressors.sensitivity import fisher_diagonals, hutchinson_trace, loss_hvp, next_token_loss


def _tiny_classifier_loss():
    """A tiny layer with a non-quadratic loss: softmax regression, W (6, 10) -> 60 parameters."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(10, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 10, generator=gen) * 0.5)
    x = torch.randn(64, 10, generator=gen)
    y = torch.randint(0, 6, (64,), generator=gen)
    return layer, lambda: F.cross_entropy(layer(x), y), lambda w: F.cross_entropy(x @ w.t(), y)


def test_hutchinson_trace_within_5_percent_of_the_exact_hessian_trace():
    layer, loss, loss_of_weight = _tiny_classifier_loss()
    exact = torch.autograd.functional.hessian(loss_of_weight, layer.weight.detach()).reshape(60, 60).trace().item()
    estimate = hutchinson_trace(loss_hvp([loss], [layer.weight]), [layer.weight.shape], tol=1e-3, max_probes=500,
                                generator=torch.Generator().manual_seed(1))
    assert exact > 0
    assert abs(estimate.traces[0] - exact) / exact < 0.05, (estimate, exact)
    assert 4 <= estimate.probes <= 500


def test_hutchinson_gives_each_block_its_own_trace_from_shared_probes():
    # H = blockdiag(A, B) of a quadratic form: the per-block estimates must be Tr(A) and Tr(B), not their sum.
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    b = torch.diag(torch.tensor([10.0, 20.0]))
    estimate = hutchinson_trace(lambda probes: [[a @ vs[0], b @ vs[1]] for vs in probes],
                                [torch.Size([3]), torch.Size([2])], tol=1e-6, max_probes=20, probes_per_round=2)
    # Rademacher v has v_i^2 = 1, so diagonal blocks are estimated exactly by every probe.
    assert estimate.traces == (6.0, 30.0)
    assert estimate.converged and estimate.probes == 4  # min_probes


def test_hutchinson_stops_at_max_probes_when_not_settled():
    full = torch.tensor([[1.0, 5.0], [5.0, 1.0]])  # off-diagonal terms make every probe differ
    estimate = hutchinson_trace(lambda probes: [[full @ vs[0]] for vs in probes], [torch.Size([2])], tol=1e-9,
                                max_probes=7, generator=torch.Generator().manual_seed(0))
    assert estimate.probes == 7 and not estimate.converged


def test_fisher_is_the_mean_of_per_window_squared_gradients(tiny_llama):
    from compress.engine.model_io import load_model

    handle = load_model(str(tiny_llama), dtype="float32", device="cpu")
    module = handle.model.model.layers[1].mlp.down_proj
    windows = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    fisher = fisher_diagonals(handle.model, {"down": module}, windows)["down"]
    expected = torch.zeros_like(module.weight)
    for window in windows:
        handle.model.zero_grad()
        next_token_loss(handle.model, window[None]).backward()
        expected += module.weight.grad.pow(2) / 3
    assert torch.allclose(fisher, expected, rtol=1e-4, atol=1e-12)
    assert fisher.sum() > 0


def test_position_chunked_losses_give_the_whole_batch_trace_at_a_128k_vocabulary(tmp_path):
    """hessian_trace at logit_chunk_mb=1 (2 positions per closure at 128,256 tokens) equals one closure per batch."""
    from compress.compressors.sensitivity import calibration_losses, hessian_traces
    from compress.engine.model_io import load_model
    from tests.real_shapes import save_real_shape_model

    handle = load_model(str(save_real_shape_model(tmp_path / "llama3", "llama3", layers=1)), device="cpu")
    batches = [torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))]
    assert len(calibration_losses(handle.model, batches, logit_chunk_mb=1)) == 4  # 8 predicted positions, 2 each
    assert len(calibration_losses(handle.model, batches, logit_chunk_mb=64)) == 1
    layer = handle.model.model.layers[0]
    modules = [{"down": layer.mlp.down_proj, "q": layer.self_attn.q_proj}]
    traces = [hessian_traces(handle.model, modules, batches, tol=1e-2, max_probes=4, seed=0, logit_chunk_mb=mb)
              for mb in (1, 64)]
    for name in ("down", "q"):
        chunked, whole = traces[0][name].traces[0], traces[1][name].traces[0]
        assert chunked == pytest.approx(whole, rel=1e-4, abs=1e-9) and whole != 0.0
