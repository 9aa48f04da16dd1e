"""The server under pressure, on loopback: schemathesis over its own OpenAPI schema (no 5xx),
16 concurrent streaming clients for 30 s (no 5xx, every stream complete and exactly counted),
and clients that drop mid-stream (their batch rows and queue places come back)."""
from __future__ import annotations

import itertools
import json
import re
import threading
import time

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from llmkit.io.checkpoint import load_checkpoint
from llmkit.serve import create_app
from llmkit.serve.engine import Engine
from conftest import make_tiny_model, server_process, server_thread

LOAD_CLIENTS, LOAD_SECONDS = 16, 30


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), block_size=128)


@pytest.fixture(scope="module")
def fuzz_url(tiny_dir):
    from llmkit.serve.embeddings import load_embedder

    model, tok = load_checkpoint(tiny_dir)
    app = create_app(Engine(model, tok, max_batch=8, max_queue=64), "tiny",
                     embedder=load_embedder("all-minilm-l6-v2"), embedding_model="all-minilm-l6-v2")
    with server_thread(app) as url:
        yield url


@pytest.mark.timeout(300)
def test_fuzzed_requests_never_get_a_5xx(fuzz_url):
    """Schemathesis draws requests (valid and invalid) for every operation of /openapi.json."""
    api = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"}
    for operation, mode in itertools.product(operations, GenerationMode):  # valid and invalid requests
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        try:
            check()
        except Unsatisfiable:  # an operation without parameters or body has no invalid form
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert httpx.get(f"{fuzz_url}/health").json()["status"] == "ok"


def stream_once(http: httpx.Client, url: str, body: dict) -> tuple[int, int, bool]:
    """(status, token chunks received, usage.completion_tokens or -1); the stream must end with [DONE]."""
    received, usage, done = 0, -1, False
    with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, 0, -1
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            received += len(chunk["choices"])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    assert done, "stream ended without [DONE]"
    return 200, received, usage


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sixteen_streaming_clients_for_thirty_seconds(tiny_dir):
    with server_process("--model", str(tiny_dir), "--max-batch", "16") as url:
        stats = {"streams": 0, "tokens": 0, "statuses": {}}
        failures: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + LOAD_SECONDS

        def client(i: int) -> None:
            chat = i % 2 == 0
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body = {"model": tiny_dir.name, "max_tokens": 8 + i % 5 * 8, "stream": True, "temperature": 0.9,
                    "stream_options": {"include_usage": True}}
            body.update({"messages": [{"role": "user", "content": f"client {i} says hello"}]} if chat
                        else {"prompt": f"client {i}: the king"})
            with httpx.Client(base_url=url, timeout=60) as http:
                while time.monotonic() < stop_at:
                    try:
                        status, got, usage = stream_once(http, path, body)
                    except Exception as e:  # noqa: BLE001 - every failure is reported below
                        with lock:
                            failures.append(f"client {i}: {e!r}")
                        return
                    with lock:
                        stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
                        if status == 200:
                            stats["streams"] += 1
                            stats["tokens"] += got
                            if got != usage:
                                failures.append(f"client {i}: received {got} tokens, usage says {usage}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(LOAD_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=LOAD_SECONDS + 120)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
        assert set(stats["statuses"]) == {200}, stats["statuses"]
        assert stats["streams"] >= LOAD_CLIENTS
        metrics = httpx.get(f"{url}/metrics").text
        assert not re.search(r'status="5\d\d"', metrics)
        generated = float(re.search(r"^llmkit_generated_tokens_total (\S+)", metrics, re.M).group(1))
        assert generated == stats["tokens"]
        health = httpx.get(f"{url}/health").json()
        assert (health["active"], health["queued"]) == (0, 0)


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health").json()
        if (health["active"], health["queued"]) == (0, 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


class SlowEngine(Engine):
    """20 ms per decode step and no stop tokens: every stream outlives the checks below."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_ids = frozenset()

    def _decode(self):
        time.sleep(0.02)
        super()._decode()


@pytest.mark.timeout(120)
def test_dropped_clients_free_their_rows(tiny_dir):
    model, tok = load_checkpoint(tiny_dir)
    engine = SlowEngine(model, tok, max_batch=2, context=128)
    with server_thread(create_app(engine, "tiny")) as url:
        body = {"model": "tiny", "prompt": "the king", "max_tokens": 120, "stream": True}
        streams = []
        for _ in range(4):  # two hold the batch, two wait in the queue
            http = httpx.Client(base_url=url, timeout=30)
            response = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
            streams.append((http, response))
        lines = streams[0][1].iter_lines()
        next(lines)
        health = httpx.get(f"{url}/health").json()
        assert health["active"] == 2 and health["queued"] == 2
        for http, response in streams:  # the clients vanish mid-stream
            response.close()
            http.close()
        assert wait_idle(url) == {"status": "ok", "models": ["tiny"], "active": 0, "queued": 0}
        # a non-streaming request whose client goes away is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        assert wait_idle(url)["active"] == 0
        # and the server still answers
        done = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 3}).json()
        assert done["usage"]["completion_tokens"] >= 1
