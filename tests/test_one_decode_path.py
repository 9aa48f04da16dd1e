"""One decode path: the same request gives the same tokens through generate, stream, chat and the
HTTP server, greedy and with seeded sampling."""
from __future__ import annotations

import httpx
import pytest

from llmkit.infer.chat import ChatSession
from llmkit.io.checkpoint import load_checkpoint
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.generate import generate, stream
from llmkit.serve import create_app
from llmkit.serve.engine import Engine
from conftest import make_tiny_model, server_thread

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, tok = load_checkpoint(make_tiny_model(tmp_path_factory.mktemp("tiny")))
    with server_thread(create_app(Engine(model, tok, max_batch=4), "tiny")) as url:
        yield model, tok, url


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_generate_stream_chat_and_server_agree(served, sampling):
    model, tok, url = served
    messages = [{"role": "user", "content": "Where do the soldiers march?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=24, **sampling)
    generated = generate(model, tok, prompt, params)
    assert len(tok.encode(generated)) >= 5  # real completions, not an immediate stop
    assert "".join(stream(model, tok, prompt, params)) == generated
    assert ChatSession(model, tok, params=params).reply(messages[0]["content"]) == generated
    body = {"model": "tiny", "messages": messages, "max_tokens": 24, **sampling}
    if "top_p" not in sampling:
        body["top_p"] = 1.0
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == generated
    # the engine keeps serving other rows beside it: batched with a different prompt, still the same
    other = {**body, "messages": [{"role": "user", "content": "a"}], "max_tokens": 8}
    with httpx.Client(timeout=60) as client:
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(2) as pool:
            mine, _ = pool.map(lambda b: client.post(f"{url}/v1/chat/completions", json=b), [body, other])
    assert mine.json()["choices"][0]["message"]["content"] == generated
