"""The HTTP API against the official `openai` client and raw requests, on a loopback port,
with a tiny random model: routes, streaming format, exact usage, errors, auth, back-pressure."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from llmkit.io.checkpoint import load_checkpoint
from llmkit.errors import LlmkitError
from llmkit.infer.generate import generate
from llmkit.serve import create_app
from llmkit.serve.engine import Engine
from conftest import make_tiny_model, server_process, server_thread

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="module")
def url(tiny):
    model, tok = tiny
    with server_thread(create_app(Engine(model, tok, max_batch=4), "tiny")) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models_health_page(url, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["queued"] == 0
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        body = httpx.get(url + asset)
        assert body.status_code == 200 and "http://" not in body.text and "https://" not in body.text


def test_completion_matches_generate_with_exact_usage(client, tiny):
    model, tok = tiny
    want = generate(model, tok, "The king", max_new_tokens=12, temperature=0)
    r = client.completions.create(model="tiny", prompt="The king", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.usage.prompt_tokens == len(tok.encode("The king"))
    n = r.usage.completion_tokens
    assert (r.choices[0].finish_reason, n) == ("length", 12) or (r.choices[0].finish_reason == "stop" and n < 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_chat_streaming_equals_non_streaming(client, tiny):
    model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do roses grow?"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    prompt = tok.encode(tok.apply_chat_template(messages))
    assert full.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    token_chunks, usage = chunks[:-1], chunks[-1].usage
    assert chunks[-1].choices == [] and usage == full.usage
    assert len(token_chunks) == usage.completion_tokens  # one chunk per generated token
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert token_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content for c in token_chunks)
    assert text == full.choices[0].message.content
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_completions_stream_several_prompts_and_choices(client):
    stream = client.completions.create(model="tiny", prompt=["a", "the moon"], n=2, max_tokens=5, stream=True,
                                       seed=7, stream_options={"include_usage": True})
    per_choice: dict[int, int] = {}
    finished = set()
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        per_choice[choice.index] = per_choice.get(choice.index, 0) + 1
        if choice.finish_reason:
            finished.add(choice.index)
    assert finished == {0, 1, 2, 3}
    assert usage.completion_tokens == sum(per_choice.values())


def test_seed_stop_top_p(client):
    kw = dict(model="tiny", prompt="Soldiers march", max_tokens=10, temperature=1.2, top_p=0.9)
    a = client.completions.create(seed=5, n=2, **kw)
    b = client.completions.create(seed=5, n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    greedy = client.completions.create(model="tiny", prompt="the", max_tokens=10, temperature=0).choices[0].text
    cut = client.completions.create(model="tiny", prompt="the", max_tokens=10, temperature=0, top_p=0.0,
                                    stop=[greedy[2:4], "never appears"]).choices[0]
    assert cut.finish_reason == "stop" and greedy.startswith(cut.text) and greedy[2:4] not in cut.text
    token_prompt = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2)
    assert token_prompt.usage.prompt_tokens == 3


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": []}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": 3}]}).encode(), 400, None),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
     "model_not_found"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}).encode(),
     400, "context_length_exceeded"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(),
     400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                 "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}', 400, None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": "\\udfff"}', 400, None),
])
def test_bad_chat_requests_get_openai_errors(url, body, status, code):
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = error_of(r, status)
    if code:
        assert error["code"] == code


def test_bad_completion_inputs(url):
    post = lambda body: httpx.post(f"{url}/v1/completions", json=body)  # noqa: E731
    assert error_of(post({"model": "tiny", "prompt": "x " * 400}), 400)["code"] == "context_length_exceeded"
    assert "vocabulary" in error_of(post({"model": "tiny", "prompt": [10 ** 6]}), 400)["message"]
    error_of(post({"model": "tiny", "prompt": []}), 400)
    error_of(post({"model": "tiny", "prompt": "x", "max_tokens": 0}), 400)
    error_of(httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": ["\\ud800"]}'), 400)
    error_of(post({"model": "tiny"}), 400)
    error_of(httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20)), 413)
    error_of(httpx.get(f"{url}/v1/nothing-here"), 404)
    error_of(httpx.get(f"{url}/v1/completions"), 405)
    error_of(httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "x"}), 404)  # no encoder
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).models.retrieve("other")


def test_metrics(url, client):
    client.completions.create(model="tiny", prompt="the", max_tokens=3)
    text = httpx.get(f"{url}/metrics").text
    for name in ("llmkit_requests_total", "llmkit_generated_tokens_total", "llmkit_prompt_tokens_total",
                 "llmkit_queue_depth", "llmkit_active_sequences", "llmkit_request_duration_seconds_bucket",
                 "llmkit_time_to_first_token_seconds_bucket", "llmkit_inter_token_seconds_bucket"):
        assert name in text
    assert 'llmkit_requests_total{route="/v1/completions",status="200"}' in text


class PausedEngine(Engine):
    """An engine whose scheduler never runs: whatever is submitted stays queued."""

    def start(self):
        pass

    def stop(self):
        pass


def test_queue_full_is_429_with_retry_after(tiny):
    model, tok = tiny
    app = create_app(PausedEngine(model, tok, max_batch=1, max_queue=2), "tiny")
    body = {"model": "tiny", "prompt": "the", "max_tokens": 20, "stream": True}
    with server_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**body, "n": 2}) as queued:
            assert queued.status_code == 200  # accepted: two sequences wait for a row
            assert http.get("/health").json()["queued"] == 2
            refused = http.post("/v1/completions", json=body)
            assert error_of(refused, 429)["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
        assert "llmkit_rejected_requests_total 1.0" in http.get("/metrics").text


def test_timeouts_are_4xx(tiny):
    model, tok = tiny
    app = create_app(Engine(model, tok, timeout=1e-6), "tiny")
    with server_thread(app) as url:
        body = {"model": "tiny", "prompt": "the", "max_tokens": 5}
        assert error_of(httpx.post(f"{url}/v1/completions", json=body), 408)["code"] == "request_timeout"
        streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 200
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[0])["error"]["type"] == "timeout_error" and events[-1] == "[DONE]"


def test_cli_serve_with_api_key_from_env(tiny_dir):
    """`llmkit serve` as users start it; LLMKIT_API_KEY guards /v1 (401 otherwise), /health stays open."""
    with server_process("--model", str(tiny_dir), env={"LLMKIT_API_KEY": "sekrit"}) as url:
        name = tiny_dir.name
        assert error_of(httpx.get(f"{url}/v1/models"), 401)["type"] == "authentication_error"
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert error_of(wrong, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1 and r.choices[0].message.role == "assistant"
        assert httpx.get(f"{url}/health").status_code == 200


def test_embeddings_beside_a_decoder_and_alone(tiny):
    """--embedding-model adds /v1/embeddings; an encoder as the only model serves embeddings only."""
    import numpy as np

    from llmkit.serve import build_app
    from llmkit.serve.embeddings import load_embedder

    model, tok = tiny
    embedder = load_embedder("all-minilm-l6-v2")
    app = create_app(Engine(model, tok), "tiny", embedder=embedder, embedding_model="all-minilm-l6-v2")
    texts = ["The cat sits on the mat.", "A feline rests on a rug.", "Stock markets fell sharply."]
    with server_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "all-minilm-l6-v2"]
        got = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the client asks for base64
        vectors = np.array([d.embedding for d in got.data])
        as_floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
        assert np.allclose(vectors, np.array([d.embedding for d in as_floats.data]), atol=1e-6)
        want, n_tokens = embedder(texts)
        assert vectors.shape == (3, 384) and np.allclose(vectors, want, atol=1e-5)
        assert got.usage.prompt_tokens == n_tokens == got.usage.total_tokens
        sims = vectors @ vectors.T
        assert sims[0, 1] > sims[0, 2]  # paraphrases are closer than unrelated text
        error_of(httpx.post(f"{url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": []}), 400)
        error_of(httpx.post(f"{url}/v1/chat/completions", json={
            "model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": "x"}]}), 400)
    with server_thread(build_app("all-minilm-l6-v2")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert len(client.embeddings.create(model="all-minilm-l6-v2", input="hello").data[0].embedding) == 384
        assert httpx.get(f"{url}/health").json()["models"] == ["all-minilm-l6-v2"]


def test_bfloat16_server_matches_bfloat16_generate(tiny_dir):
    """--dtype bfloat16: batched requests (prompts of >= 8 tokens prefill through fp32 GEMMs on CPUs
    without bf16 matmuls, as generate() does) give generate()'s greedy text."""
    from llmkit.serve import build_app

    model, tok = load_checkpoint(tiny_dir)
    model = model.to(torch.bfloat16).eval()
    prompts = ["The king is dead, long live", "To be"]
    want = [generate(model, tok, p, max_new_tokens=8, temperature=0) for p in prompts]
    with server_thread(build_app(str(tiny_dir), dtype="bfloat16", max_batch=4)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        got = [client.completions.create(model=tiny_dir.name, prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in prompts]
    assert got == want
    with pytest.raises(LlmkitError, match="unknown dtype"):
        build_app(str(tiny_dir), dtype="int3")


def test_request_larger_than_the_queue_is_a_400(tiny):
    model, tok = tiny
    with server_thread(create_app(Engine(model, tok, max_queue=4), "tiny")) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2})
        assert "queue size of 4" in error_of(r, 400)["message"]


def test_sse_chunks_survive_unicode_line_separators():
    """Text with NEL / LINE SEPARATOR stays on one SSE line even for clients that split like str.splitlines."""
    from llmkit.serve.openai_stream import _sse

    event = _sse({"text": "a\u0085b\u2028c\u2029d\x1ce\n"})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and json.loads(lines[0][len("data: "):])["text"] == "a\u0085b\u2028c\u2029d\x1ce\n"
