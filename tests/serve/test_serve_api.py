"""The HTTP API against a live uvicorn server on loopback: the official openai client, SSE, auth, bad input."""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time

import httpx
import openai
import pytest

from bayeslora.serve import InferenceService, ServeSettings
from bayeslora.serve.service import ServiceBusy

MODEL = "tiny-random-llama"
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=30))


def test_openai_client_chat_with_confidence(server):
    resp = client(server).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                                  logprobs=True, top_logprobs=2)
    choice = resp.choices[0]
    conf = choice.confidence  # the extension field, reachable through the response object
    assert 0.0 <= conf["score"] <= 1.0 and conf["method"] == "mle" and conf["n_tokens"] == 5
    assert conf["mean_epistemic"] == 0.0 and conf["max_entropy"] >= conf["mean_entropy"] > 0
    assert resp.usage.completion_tokens == 5 and choice.finish_reason == "length"
    tokens = choice.logprobs.content
    assert len(tokens) == 5 and len(tokens[0].top_logprobs) == 2
    assert tokens[0].entropy > 0 and tokens[0].epistemic == 0.0
    # a point estimate has no weight samples: asking for 4 decodes the model once and says 0
    four = client(server).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                                  extra_body={"samples": 4})
    assert four.choices[0].confidence["n_samples"] == 0 and four.choices[0].message.content == choice.message.content


def test_openai_client_stream_matches_non_stream(server):
    c = client(server)
    full = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    last = [ch for ch in chunks if ch.choices][-1].choices[0]
    assert last.finish_reason == "length" and last.confidence["n_tokens"] == 12
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_client_completions_with_logprobs_and_seed(server):
    c = client(server)
    a = c.completions.create(model=MODEL, prompt="1+1=", max_tokens=6, temperature=1.0, seed=7, logprobs=2)
    b = c.completions.create(model=MODEL, prompt="1+1=", max_tokens=6, temperature=1.0, seed=7, logprobs=2)
    assert a.choices[0].text == b.choices[0].text
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.token_entropy) == 6 and len(lp.top_logprobs[0]) <= 2
    assert 0.0 <= a.choices[0].confidence["score"] <= 1.0
    two = c.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2, n=2)
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
    one = c.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # each prompt counted once, whatever n
    streamed = list(c.completions.create(model=MODEL, prompt="1+1=", max_tokens=6, temperature=1.0, seed=7,
                                         logprobs=2, stream=True))
    parts = [ch.choices[0].logprobs for ch in streamed if ch.choices and ch.choices[0].logprobs]
    assert [t for part in parts for t in part.tokens] == lp.tokens
    assert [o for part in parts for o in part.text_offset] == lp.text_offset
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_stop_string_and_stream_completion(server, http):
    full = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10, "temperature": 0})
    text = full.json()["choices"][0]["text"]
    stop = text[3:5]
    cut = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10, "temperature": 0,
                                             "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10,
                                                      "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_choices_endpoint(http):
    r = http.post("/v1/choices", json={"question": "2+2?", "choices": ["3", "4", "5"], "abstain_threshold": 0.9})
    body = r.json()
    assert r.status_code == 200 and len(body["probs"]) == 3 and abs(sum(body["probs"]) - 1) < 1e-5
    assert body["prediction_text"] == ["3", "4", "5"][body["prediction"]]
    assert body["abstain"] is True and body["uncertainty"]["epistemic"] == 0.0
    assert body["uncertainty"]["total"] == pytest.approx(body["uncertainty"]["aleatoric"])


def test_bayesian_server_auth_samples_and_epistemic(stochastic_server):
    with pytest.raises(openai.AuthenticationError):
        client(stochastic_server, "wrong").models.list()
    assert httpx.get(f"{stochastic_server}/health", trust_env=False).status_code == 200
    r = httpx.post(f"{stochastic_server}/v1/choices", json={"question": "q", "choices": ["a", "b"]}, trust_env=False)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    c = client(stochastic_server, "sekret")
    resp = c.chat.completions.create(model="tiny-bayes", messages=CHAT, max_tokens=4, seed=0, logprobs=True)
    conf = resp.choices[0].confidence
    assert conf["method"] == "test-gaussian" and conf["n_samples"] == 4 and conf["mean_epistemic"] > 0
    assert all(t.epistemic > 0 for t in resp.choices[0].logprobs.content)
    one = c.chat.completions.create(model="tiny-bayes", messages=CHAT, max_tokens=2, extra_body={"samples": 1})
    assert one.choices[0].confidence["n_samples"] == 0 and one.choices[0].confidence["mean_epistemic"] == 0
    r = httpx.post(f"{stochastic_server}/v1/choices", json={"question": "q", "choices": ["a", "b"], "seed": 1},
                   headers={"Authorization": "bearer sekret"}, trust_env=False).json()  # the scheme in any case
    assert r["n_samples"] == 4 and r["uncertainty"]["epistemic"] > 0
    r = httpx.get(f"{stochastic_server}/v1/models", headers={"Authorization": "Basic sekret"}, trust_env=False)
    assert r.status_code == 401


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": -0.1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "samples": 33}, 400, "samples"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "n": 5}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": ["a"] * 5}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "presence_penalty": 1}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}, 400,
     "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 3000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": 12}, 400, None),
    ("/v1/choices", {"question": "q", "choices": ["a"]}, 400, "choices"),
    ("/v1/choices", {"question": "q", "choices": ["a", " "]}, 400, "choices"),
    ("/v1/choices", {"question": "", "choices": ["a", "b"]}, 400, "question"),
    ("/v1/choices", {"question": "q", "choices": ["a", "b"], "abstain_threshold": 1.5}, 400, "abstain_threshold"),
    ("/v1/choices", {"question": "q", "choices": ["a", "b"], "model": "other"}, 404, "model"),
    # OpenAI features the server does not implement are refused, not ignored
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {}}}], "tool_choice": "required"}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logit_bias": {"50": 100}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_001}]}, 400,
     "messages.0.content"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 100_001}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gives_openai_error(http, path, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = http.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_every_validation_error_is_named(http):
    error = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": -5}).json()["error"]
    assert "(at model)" in error["message"] and "(at max_tokens)" in error["message"] and error["param"] == "model"
    error = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
                      ).json()["error"]
    assert "at character" in error["message"] and error["param"] is None and error["code"] == "json_invalid"


def test_oversized_body_is_refused(http):
    r = http.post("/v1/completions", content=b"x" * (4 * 1024 * 1024 + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_no_op_values_of_unsupported_features_are_accepted(http):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "tool_choice": "none", "response_format": {"type":
            "text"}, "logit_bias": {}, "tools": []}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "best_of": 1}
                     ).status_code == 200


def test_chunked_body_is_refused_unread(http):
    def chunks():
        yield b'{"model": "tiny-random-llama", '
        yield b'"prompt": "x"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 411 and r.json()["error"]["code"] == "length_required"


def test_model_retrieve(server):
    c = client(server)
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_an_internal_error_is_a_500_and_the_connection_stays_usable(tiny_base_run, start_server, monkeypatch):
    settings = ServeSettings(max_tokens=8)
    service = InferenceService(tiny_base_run, settings)

    def broken(req):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "choose", broken)
    with start_server(settings, service) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
        body = {"question": "q", "choices": ["a", "b"]}
        for _ in range(2):
            r = http.post("/v1/choices", json=body)
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert http.get("/health").status_code == 200  # same connection, still served


def test_unknown_route_and_method_are_openai_errors(http):
    assert http.get("/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_concurrent_requests_get_their_own_answers(server):
    prompts = [f"prompt number {i}:" for i in range(8)]
    c = client(server)

    def ask(prompt: str) -> str:
        return c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    serial = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(ask, prompts))
    assert parallel == serial


def test_full_queue_answers_503(tiny_base_run, start_server):
    settings = ServeSettings(queue_size=1, max_tokens=8)
    service = InferenceService(tiny_base_run, settings)
    with start_server(settings, service) as url:
        gate = threading.Event()
        blocker = service.submit(gate.wait, 30)  # occupies the worker
        while not blocker.running():
            time.sleep(0.01)
        queued = service.submit(lambda: None)  # fills the one queue slot
        try:
            with pytest.raises(ServiceBusy):
                service.submit(lambda: None)
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, trust_env=False)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            assert httpx.get(f"{url}/health", trust_env=False).json()["queued"] == 1
        finally:
            gate.set()
        blocker.result(10), queued.result(10)
        ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, trust_env=False, timeout=30)
        assert ok.status_code == 200


def test_cancelled_stream_stops_generating(tiny_base_run):
    from bayeslora.serve.protocol import CompletionRequest

    service = InferenceService(tiny_base_run, ServeSettings(max_tokens=64))
    cancelled = threading.Event()
    chunks = []

    def emit(chunk):  # the client "disconnects" after the first chunk
        chunks.append(chunk)
        cancelled.set()

    req = CompletionRequest(model=MODEL, prompt="x", max_tokens=64, temperature=0, stream=True)
    out = service.completion(req, emit, cancelled)
    assert chunks and out.usage.completion_tokens < 64


def test_an_abandoned_request_stops_generating(tiny_base_run, start_server, monkeypatch):
    """A client that gives up on a non-streamed answer cancels its generation (the worker used to finish all
    max_tokens, and the next request waited behind it)."""
    settings = ServeSettings(max_tokens=1000, queue_size=4)
    service = InferenceService(tiny_base_run, settings)
    answers = []
    original = service.completion

    def recording(req, emit=None, cancelled=None):
        answers.append(original(req, emit, cancelled))
        return answers[-1]

    monkeypatch.setattr(service, "completion", recording)
    with start_server(settings, service) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1000,
                                                       "temperature": 0},  # greedy: no early stop here
                       trust_env=False, timeout=0.3)
        service.submit(lambda: None).result(60)  # behind the abandoned request on the worker
    assert len(answers) == 1 and answers[0].usage.completion_tokens < 1000


def test_an_ending_stop_token_is_not_part_of_the_answer(tiny_base_run):
    """The end-of-turn token ends the text: it is counted in the usage but is in neither the logprobs (streamed or
    not: they agree) nor the confidence, which describes the answer's own tokens."""
    from bayeslora.serve import protocol as P

    service = InferenceService(tiny_base_run, ServeSettings(max_tokens=8))
    ask = dict(model=MODEL, prompt="1+1=", max_tokens=8, temperature=1.0, seed=7, logprobs=1)
    free = service.completion(P.CompletionRequest(**ask))
    tokens = free.choices[0].logprobs.tokens
    req = P.CompletionRequest(**ask)
    ids = [s.token_id for s in service._generate(service._ids("1+1="), service._decode_params(req, 8, 1), [],
                                                 service._generator(7)).steps]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # its first new token ends it
    service.stop_ids = frozenset({ids[k]})
    chunks: list = []
    out = service.completion(P.CompletionRequest(**ask))
    streamed = service.completion(P.CompletionRequest(**ask, stream=True), emit=chunks.append)
    for resp in (out, streamed):
        choice = resp.choices[0]
        assert choice.finish_reason == "stop" and choice.logprobs.tokens == tokens[:k]
        assert choice.confidence.n_tokens == k and resp.usage.completion_tokens == k + 1
    streamed_tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert streamed_tokens == tokens[:k]
    kept = free.choices[0].logprobs.token_logprobs[:k]
    assert out.choices[0].confidence.score == pytest.approx(math.exp(sum(kept) / k), rel=1e-5)
