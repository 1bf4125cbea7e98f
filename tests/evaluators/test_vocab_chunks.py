"""Vocabulary-chunked scoring equals the old full-table numbers, at a real 128,256-token vocabulary.

The old evaluators kept `log_softmax(logits)` over the whole (T, vocab) table of every input; the references below
are that computation, written out. With `logit_chunk_mb=1` the new code scores 2 positions per chunk at this
vocabulary, so every chunk boundary case is crossed many times.
"""

import pytest
import torch
import torch.nn.functional as F

from compress.engine.model_io import load_model
from compress.engine.vocab_head import final_hidden, output_head, rows_per_chunk, target_nll, target_scores
from compress.evaluators.perplexity import perplexity_of, sliding_perplexity_of
from compress.evaluators.zero_shot import TokenRequest, encode_request, score_requests
from compress.recipe.errors import UserError
from tests.real_shapes import LLAMA3_VOCAB, save_real_shape_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return load_model(str(save_real_shape_model(tmp_path_factory.mktemp("llama3"), "llama3", layers=1)), device="cpu")


@torch.no_grad()
def full_table_scores(model, requests, max_length):
    """The old zero-shot scorer: a (T, vocab) log-softmax table per distinct input, then gather and argmax."""
    results = []
    for request in requests:
        ids = (request.context + request.continuation)[-(max_length + 1):][:-1]
        table = F.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)  # (T, vocab)
        cont = torch.tensor(request.continuation)
        rows = table[len(ids) - len(cont):]
        results.append((float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())))
    return results


def test_zero_shot_equals_the_full_table(llama3):
    tok = llama3.tokenizer
    pairs = [("the model", " layer weight"), ("the model", " token"), ("import class object error", " test data"),
             ("zero one two", " three four eight"), ("python function", " return value")]
    requests = [encode_request(tok, c, k) for c, k in pairs]
    context = requests[0].context
    # Requests sharing one model input (one-token choices) and one whose input is another's prefix + continuation.
    requests += [TokenRequest(context, (5,)), TokenRequest(context, (9,)),
                 TokenRequest(context[:-1], context[-1:] + (5,))]
    assert rows_per_chunk(LLAMA3_VOCAB, 1) == 2
    got = score_requests(llama3.model, requests, batch_size=3, max_length=256, device=CPU, logit_chunk_mb=1)
    for (logprob, greedy), scored in zip(full_table_scores(llama3.model, requests, 256), got):
        assert scored.logprob == pytest.approx(logprob, abs=1e-4) and scored.is_greedy == greedy
    truncated = score_requests(llama3.model, requests, batch_size=8, max_length=20, device=CPU, logit_chunk_mb=1)
    for (logprob, _), scored in zip(full_table_scores(llama3.model, requests, 20), truncated):
        assert scored.logprob == pytest.approx(logprob, abs=1e-4)


def test_perplexity_equals_the_full_table(llama3):
    ids = torch.tensor(llama3.tokenizer.encode("the model layer weight token python function return value " * 2))
    assert ids.numel() >= 48
    windows = ids[:48].view(2, 24)
    logits = llama3.model(windows).logits[:, :-1].float()  # (W, 23, vocab): the old table
    old = F.cross_entropy(logits.reshape(-1, LLAMA3_VOCAB), windows[:, 1:].reshape(-1), reduction="mean")
    new, counts = perplexity_of(llama3.model, ids, 24, 1, CPU, max_windows=2, logit_chunk_mb=1)
    assert counts["scored_tokens"] == windows[:, 1:].numel() and new == pytest.approx(float(old.exp()), rel=1e-5)

    table = F.log_softmax(llama3.model(ids[None]).logits[0].float(), dim=-1)  # (T, vocab), one window sees all
    old_sliding = -table[:-1].gather(1, ids[1:, None]).mean()
    sliding, _ = sliding_perplexity_of(llama3.model, ids, ids.numel(), ids.numel(), 2, CPU, logit_chunk_mb=1)
    assert sliding == pytest.approx(float(old_sliding.exp()), rel=1e-5)


def test_chunked_nll_has_the_full_table_gradient_and_second_derivative(llama3):
    """What the sensitivity estimators backpropagate through: value, gradient and a Hessian-vector product."""
    head = output_head(llama3.model)
    torch.manual_seed(0)
    weight = (torch.randn(64, 64) / 8).requires_grad_(True)
    features, targets, probe = torch.randn(7, 64), torch.randint(0, LLAMA3_VOCAB, (7,)), torch.randn(64, 64)

    def derivatives(loss_of_hidden):
        loss = loss_of_hidden(torch.tanh(features @ weight))
        (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
        (hvp,) = torch.autograd.grad(grad, weight, grad_outputs=probe)
        return loss.detach(), grad.detach(), hvp

    old = derivatives(lambda h: F.cross_entropy(head(h).float(), targets, reduction="sum"))
    new = derivatives(lambda h: target_nll(head, h, targets, chunk_rows=rows_per_chunk(LLAMA3_VOCAB, 1)))
    for expected, got in zip(old, new):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_head_transform_we_do_not_reproduce_is_refused(llama3):
    ids = torch.tensor([[3, 4, 5, 6]])
    head = output_head(llama3.model)
    assert final_hidden(llama3.model, head, ids).shape == (1, 4, 64)
    llama3.model.config.logit_scale = 0.5  # Cohere's setting: our head would scale, Llama's forward does not
    try:
        with pytest.raises(UserError, match="llama: this model's forward transforms the output head's logits"):
            final_hidden(llama3.model, output_head(llama3.model), ids)
    finally:
        del llama3.model.config.logit_scale


def test_gemma2_soft_capping_is_reproduced(tmp_path):
    import transformers as tf

    config = tf.Gemma2Config(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[2, 7, 1, 9, 4, 4, 8]])
    with torch.no_grad():
        expected = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        head = output_head(model)
        hidden = final_hidden(model, head, ids)[0, :-1]
        got = target_scores(head, hidden, torch.arange(6), ids[0, 1:], chunk_rows=4)
    assert head.softcap == 3.0 and torch.allclose(got.logprobs, expected, atol=1e-5)
