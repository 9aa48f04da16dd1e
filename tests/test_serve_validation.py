"""The server against malformed requests: no coercion of wrong types, unknown fields refused by
name, messages that name the real problem, no NaN (or HTTP 500) from blank embedding inputs, and a
meaningful served model id. In-process through Starlette's TestClient (no port, no subprocess)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from conftest import fox_model, fox_tokenizer
from llmkit.io.checkpoint import save_checkpoint
from llmkit.serve import build_app, create_app, served_name

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = fox_tokenizer()
    return save_checkpoint(tmp_path_factory.mktemp("runs") / "demo" / "model", fox_model(tok), tok)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(build_app(str(model_dir), name="tiny", max_batch=2)) as c:
        yield c


def error(response, field: str | None = None) -> str:
    assert response.status_code == 400, response.text
    body = response.json()["error"]
    if field is not None:
        assert body["param"] == field, body
    return body["message"]


@pytest.mark.parametrize("extra, field, says", [
    ({"prompt": [[False]]}, "prompt", "prompt: must be a string, a list of strings, a list of token ids"),
    ({"prompt": [True, 1]}, "prompt", "prompt: must be"),
    ({"n": 1.0}, "n", "n: Input should be a valid integer"),
    ({"ignore_eos": 0}, "ignore_eos", "ignore_eos: Input should be a valid boolean"),
    ({"stream": "yes"}, "stream", "stream: Input should be a valid boolean"),
    ({"max_tokens": True}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"seed": "7"}, "seed", "seed: Input should be a valid integer"),
    ({"temperature": "0.5"}, "temperature", "temperature: Input should be a valid number"),
    ({"prompt": []}, "prompt", "at least 1 item"),
    ({"best_of": 3}, "best_of", "unknown field 'best_of': this server does not implement it"),
    ({"logprobs": 99}, "logprobs", "logprobs: Input should be less than or equal to"),
    ({"frobnicate": {"a": 1}}, "frobnicate", "unknown field 'frobnicate'"),
    ({"stream_options": {"include_usage": True, "chunk": 1}}, "stream_options.chunk", "unknown field"),
])
def test_completion_requests_are_strict(client, extra, field, says):
    body = {"model": "tiny", "prompt": "the fox", "max_tokens": 2, **extra}
    assert says in error(client.post("/v1/completions", json=body), field)


def test_chat_messages_are_strict(client):
    base = {"model": "tiny", "max_tokens": 2}
    message = error(client.post("/v1/chat/completions", json={
        **base, "messages": [{"role": "user", "content": "hi", "audio": {"id": "x"}}]}), "messages.0.audio")
    assert "unknown field 'messages.0.audio'" in message
    message = error(client.post("/v1/chat/completions", json={**base, "messages": [{"role": "user", "content": 5}]}))
    assert message.startswith("messages.0.content: must be a string or a list of text parts")


def test_well_formed_requests_still_work(client):
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": [[5, 6]], "max_tokens": 2, "n": 1,
                                              "temperature": 1, "top_p": 1, "ignore_eos": True, "user": "u"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["model"] == "tiny" and client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_served_name_is_meaningful(model_dir, tmp_path):
    assert served_name(str(model_dir)) == "demo/model"  # not just "model"
    (tmp_path / "shakespeare").mkdir()
    assert served_name(str(tmp_path / "shakespeare")) == "shakespeare"
    assert served_name("smollm2-135m-instruct") == "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def embed_client():
    from llmkit.serve.embeddings import load_embedder

    with TestClient(create_app(None, embedder=load_embedder("all-minilm-l6-v2"), embedding_model="mini")) as c:
        yield c


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_blank_embedding_input_is_a_400_not_nan(embed_client, blank, encoding):
    r = embed_client.post("/v1/embeddings", json={"model": "mini", "input": ["a normal sentence", blank],
                                                  "encoding_format": encoding})
    assert "text 1 is empty or only whitespace" in error(r)


def test_embeddings_stay_finite_and_strict(embed_client):
    import numpy as np

    r = embed_client.post("/v1/embeddings", json={"model": "mini", "input": ["one", "two"]})
    assert r.status_code == 200
    assert np.isfinite(np.array([d["embedding"] for d in r.json()["data"]])).all()
    assert "unknown field 'dimensions'" in error(embed_client.post(
        "/v1/embeddings", json={"model": "mini", "input": "x", "dimensions": 8}), "dimensions")
