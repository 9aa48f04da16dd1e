"""Structured outputs: response_format json_object / json_schema through the official `openai` client,
rows of one batch each following their own schema (or none), streamed too; `llmkit generate --json-schema`.
A random tiny model is the hardest case: only the grammar makes its output JSON, so every reply must
parse and validate (jsonschema, the reference validator)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from llmkit.io.checkpoint import load_checkpoint
from llmkit.serve import create_app
from llmkit.serve.engine import Engine
from conftest import make_tiny_model, run_cli, server_thread

pytestmark = pytest.mark.timeout(240)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "none"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
POINT = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "boolean"}},
         "required": ["x", "y"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe someone as JSON"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def served(tiny_dir):
    with server_thread(create_app(Engine(*load_checkpoint(tiny_dir), max_batch=8), "tiny")) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def schema_format(schema, name="person"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_each_row_follows_its_own_schema(served):
    client = served[1]

    def ask(i):
        kind = i % 3
        fmt = schema_format(PERSON) if kind == 0 else schema_format(POINT, "point") if kind == 1 else None
        kw = {"response_format": fmt} if fmt else {}
        r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=120, temperature=1.0, seed=i,
                                           n=2, **kw)
        return kind, r
    with ThreadPoolExecutor(6) as pool:  # concurrent: schema rows and free rows share decode steps
        results = list(pool.map(ask, range(6)))
    for kind, r in results:
        for choice in r.choices:
            if kind == 2:
                continue  # free text from a random model: anything
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON if kind == 0 else POINT)


def test_json_object_and_streaming(served):
    client = served[1]
    # any object: strings are unbounded, so a random model may run out of tokens inside one
    # ("length", as OpenAI's API too); every reply that ends by itself is a JSON object
    finished = 0
    for seed in range(4):
        choice = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=150, seed=seed,
                                                response_format={"type": "json_object"}).choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            finished += 1
    assert finished
    chunks = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=120, seed=7, stream=True,
                                            response_format=schema_format(PERSON))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "response_format"),
    ({"type": "yaml"}, "response_format"),
])
def test_bad_response_format_is_a_400(served, fmt, words):
    r = httpx.post(f"{served[0]}/v1/chat/completions", json={"model": "tiny", "messages": ASK,
                                                              "response_format": fmt})
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_cli_generate_json_schema(monkeypatch, capsys, tiny_dir, tmp_path):
    schema = tmp_path / "point.json"
    schema.write_text(json.dumps(POINT))
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--model", tiny_dir, "The point", "--no-echo",
                             "--json-schema", schema, "--seed", "3", "--max-new-tokens", "80")
    assert code == 0, err
    jsonschema.validate(json.loads(out), POINT)
    schema.write_text('{"type": "nonsense"}')
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--model", tiny_dir, "x", "--json-schema", schema)
    assert code != 0 and "JSON schema" in err and len(err.strip().splitlines()) == 1
