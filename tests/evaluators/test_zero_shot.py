"""The log-likelihood scorer against a naive one-request-at-a-time reference, and lm-eval's metric rules."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from compress.engine.context import RunContext, RunInputs
from compress.engine.model_io import load_model
from compress.evaluators.tasks import Doc
from compress.evaluators.zero_shot import (
    Loglikelihood,
    TokenRequest,
    ZeroShotConfig,
    encode_request,
    evaluate_zero_shot,
    first_argmax,
    mean_stderr,
    multiple_choice_metrics,
    score_requests,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama), device="cpu")


def naive_loglikelihood(model, request: TokenRequest) -> tuple[float, bool]:
    """One unpadded forward per request, scoring the continuation token by token."""
    ids = torch.tensor([request.context + request.continuation])
    logprobs = F.log_softmax(model(ids[:, :-1]).logits[0].double(), dim=-1)  # (T-1, vocab)
    total, greedy = 0.0, True
    for position in range(len(request.context), ids.shape[1]):
        token = ids[0, position].item()
        total += logprobs[position - 1, token].item()
        greedy &= logprobs[position - 1].argmax().item() == token
    return total, greedy


def test_encoding_moves_trailing_space_to_the_continuation(tiny):
    tok = tiny.tokenizer
    request = encode_request(tok, "the model ", "layer")
    assert list(request.context) == tok.encode("the model")
    assert list(request.context + request.continuation) == tok.encode("the model layer")
    empty = encode_request(tok, "", " weight")
    assert empty.context == (tok.bos_token_id,) and list(empty.continuation) == tok.encode(" weight")


def test_batched_scores_equal_the_naive_reference(tiny):
    texts = [("the model", " layer weight"), ("the model", " token"), ("import class object error", " test data"),
             ("zero one two", " three four eight"), ("python function", " return value list dict string file")]
    requests = [encode_request(tiny.tokenizer, c, k) for c, k in texts]
    batched = score_requests(tiny.model, requests, batch_size=2, max_length=256, device=CPU)
    for request, got in zip(requests, batched):
        logprob, greedy = naive_loglikelihood(tiny.model, request)
        assert got.logprob == pytest.approx(logprob, abs=1e-4) and got.is_greedy == greedy


def test_left_truncation_keeps_the_last_max_length_tokens(tiny):
    request = encode_request(tiny.tokenizer, "the model layer weight scale group token python function", " return value")
    short = TokenRequest(request.context[-3:], request.continuation)  # what a 3 + len(cont) - 1 window sees
    max_length = len(short.context) + len(short.continuation) - 1
    truncated = score_requests(tiny.model, [request], batch_size=1, max_length=max_length, device=CPU)[0]
    assert truncated.logprob == pytest.approx(naive_loglikelihood(tiny.model, short)[0], abs=1e-4)


def test_identical_inputs_run_once(tiny, monkeypatch):
    calls = []
    original = tiny.model.forward
    monkeypatch.setattr(tiny.model, "forward", lambda ids, **kw: calls.append(ids.shape) or original(ids, **kw))
    # One-token choices after the same context read the same model input: one row serves both.
    context = encode_request(tiny.tokenizer, "the model", " layer").context
    requests = [TokenRequest(context, (5,)), TokenRequest(context, (9,))]
    scores = score_requests(tiny.model, requests, batch_size=8, max_length=256, device=CPU)
    assert calls == [torch.Size([1, len(context)])] and scores[0].logprob != scores[1].logprob


def test_acc_norm_divides_by_choice_length_in_characters():
    doc = Doc(((" c", " a"), (" c", " bbbbbbbbb")), gold=1, norm_texts=("a", "bbbbbbbbb"))
    scores = [[Loglikelihood(-2.0, False), Loglikelihood(-9.0, False)]]
    metrics = multiple_choice_metrics([doc], scores)
    assert metrics == {"acc": [0.0], "acc_norm": [1.0]}  # -2/1 < -9/9


def test_ties_pick_the_first_choice_like_numpy_argmax():
    assert first_argmax([-1.0, -1.0, -3.0]) == 0 and first_argmax([-5.0, -1.0, -1.0]) == 1


def test_stderr_is_lm_evals_sample_stderr():
    values = [1.0] * 7 + [0.0] * 13
    p, n = 7 / 20, 20
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_evaluator_reports_acc_acc_norm_stderr_and_protocol(tiny, tmp_path):
    path = tmp_path / "task.jsonl"
    docs = [{"context": "the model", "choices": ["layer weight", "zero one two three"], "gold": i % 2} for i in range(6)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    results = evaluate_zero_shot(tiny, ZeroShotConfig(tasks=[str(path)], batch_size=4), RunContext(RunInputs(device=CPU)))
    by_metric = {r.metric: r for r in results}
    assert set(by_metric) == {"acc", "acc_norm"}
    # Same context and choices in every document: the model picks the same choice each time, right on half.
    assert by_metric["acc"].value == 0.5 and by_metric["acc"].details["stderr"] == pytest.approx(mean_stderr([1, 0] * 3))
    assert by_metric["acc"].details["name"] == "lm_eval_loglikelihood" and by_metric["acc"].details["docs"] == 6


def test_unknown_task_is_a_config_error():
    with pytest.raises(ValueError, match="unknown task 'piqaa'.*Did you mean: piqa"):
        ZeroShotConfig(tasks=["piqaa"])
