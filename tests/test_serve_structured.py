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

from llmkit.infer.generate import generate
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
    for seed in range(4):  # any object: a random model never closes its strings by itself
        choice = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=60, seed=seed,
                                                response_format={"type": "json_object"}).choices[0]
        assert isinstance(json.loads(choice.message.content), dict)
    chunks = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=120, seed=7, stream=True,
                                            response_format=schema_format(PERSON))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_closes_within_max_tokens(served, tiny_dir):
    """However small max_tokens, as long as the shortest valid reply fits, the JSON closes in time;
    a reply closed early says finish_reason "length" (chat, streamed, completions, generate())."""
    client = served[1]
    reasons = set()
    for max_tokens in (2, 9, 45, 60):  # 45: room for the shortest PERSON in this 384-token vocabulary
        for seed in range(3):
            fmt = {"type": "json_object"} if max_tokens < 45 else schema_format(PERSON)
            choice = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=max_tokens, seed=seed,
                                                    temperature=1.5, response_format=fmt).choices[0]
            value = json.loads(choice.message.content)
            if fmt["type"] == "json_schema":
                jsonschema.validate(value, PERSON)
            reasons.add(choice.finish_reason)
    assert reasons == {"stop", "length"}
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, seed=1, stream=True,
                                                 response_format={"type": "json_object"}))
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    # /v1/completions takes response_format too (the official client sends it through extra_body)
    done = client.completions.create(model="tiny", prompt="A point:", max_tokens=30, seed=2,
                                     extra_body={"response_format": schema_format(POINT, "point")})
    jsonschema.validate(json.loads(done.choices[0].text), POINT)
    model, tok = load_checkpoint(tiny_dir)
    for n in (16, 20, 40):  # 16: the shortest POINT in this vocabulary
        jsonschema.validate(json.loads(generate(model, tok, "x", max_new_tokens=n, json_schema=POINT, seed=n)), POINT)


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
