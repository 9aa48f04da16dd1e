"""Function calling through the official `openai` client: tools and tool_choice (auto, none, required,
a named function), arguments constrained to the function's schema, tool-role messages in a two-step
conversation, streamed tool-call deltas, and templates that render tools themselves."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from llmkit.io.checkpoint import load_checkpoint
from llmkit.serve import create_app, schemas as S
from llmkit.serve.engine import Engine
from llmkit.serve.openai_stream import Streamer
from llmkit.serve.tools import CallStream, parse_call, plan
from llmkit.tokenizer import Tokenizer
from conftest import make_tiny_model, server_thread

pytestmark = pytest.mark.timeout(240)
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny():
    import tempfile
    from pathlib import Path
    return load_checkpoint(make_tiny_model(Path(tempfile.mkdtemp()), block_size=1024))  # room for tool lists


@pytest.fixture(scope="module")
def served(tiny):
    with server_thread(create_app(Engine(*tiny, max_batch=4), "tiny")) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_two_step_conversation_with_a_required_call(served):
    client = served[1]
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=60, seed=1)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER if call.function.name == "get_weather" else TIME)

    result = json.dumps({"temperature": 21, "sky": "clear"})
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, tool_choice="none",
                                            max_tokens=8, seed=1)
    assert second.choices[0].message.tool_calls is None and second.choices[0].finish_reason in ("stop", "length")
    # the call and its result are in the second prompt ("none": no tool list in it)
    alone = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1).usage.prompt_tokens
    assert second.usage.prompt_tokens > alone + len(result) // 4 + len(call.function.arguments) // 4


def test_named_choice_streamed_as_tool_call_deltas(served):
    """The official client's way: the first delta names the call, the arguments come in pieces as they
    are generated, and the pieces join to arguments that follow the function's schema."""
    client = served[1]
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True, seed=2,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}},
                                            max_tokens=60, temperature=1.5)
    deltas, finish = [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        deltas += chunk.choices[0].delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
        assert not chunk.choices[0].delta.content
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.function.name == "get_time" and first.function.arguments == ""
    assert len(rest) > 3 and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert finish == "tool_calls"
    jsonschema.validate(json.loads("".join(d.function.arguments for d in rest)), TIME)


def test_call_stream_pieces():
    """tools.CallStream on its own: a constrained call's arguments go out as generated (a "}" that may
    close the call held back); "auto" streams text at once and holds a reply that may be a call."""
    tools = [S.ToolDef(**t) for t in TOOLS]
    required = CallStream(plan(tools, "required"))
    pieces = ['{"name":"get_t', 'ime","argu', 'ments":{"zo', 'ne":"a}', 'b"}', "}"]
    out = [required.push(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert out[:2] == [[], []] and out[2][0]["role"] == "assistant"
    assert out[2][0]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    arguments = [d["tool_calls"][0]["function"]["arguments"] for ds in out for d in ds][1:]
    assert arguments == ['{"zo', 'ne":"a', '}b"', "}"] and required.finish_reason("stop") == "tool_calls"
    text = CallStream(plan(tools, "auto"))
    assert text.push(" It is", False) == [{"role": "assistant", "content": " It is"}]
    assert text.push(" sunny.", True) == [{"content": " sunny."}] and text.finish_reason("stop") == "stop"
    held = CallStream(plan(tools, "auto"))
    call = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}'
    assert held.push(call[:30], False) == [] and held.finish_reason("stop") == "stop"
    last = held.push(call[30:], True)
    assert last[0]["tool_calls"][0]["function"]["name"] == "get_weather" and held.finish_reason("stop") == "tool_calls"


def test_auto_and_none_leave_text_alone(served):
    client = served[1]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                           max_tokens=10, seed=3)
        assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    # with "auto", a reply that is a call to a listed function becomes a tool call
    tools = [S.ToolDef(**t) for t in TOOLS]
    auto = plan(tools, "auto")
    call = parse_call('{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}', auto)
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "C"}'}
    assert parse_call('{"name": "launch", "arguments": {}}', auto) is None and parse_call("Sunny.", auto) is None


@pytest.mark.parametrize("extra, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "no tools"),
    ({"messages": [{"role": "assistant"}]}, "content is required"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]}]},
     "not JSON"),
])
def test_bad_tool_requests_are_400(served, extra, words):
    r = httpx.post(f"{served[0]}/v1/chat/completions", json={"model": "tiny", "messages": ASK, **extra})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_templates_that_render_tools_get_them(tiny):
    model, tok = tiny
    template = ("{% for t in tools %}TOOL {{ t.name }}\n{% endfor %}"
                "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>")
    native = Tokenizer(tok.hf, bos=tok.bos_token, eos=tok.eos_token, chat_template=template)
    streamer = Streamer(Engine(model, native), "tiny", None)
    body = S.ChatRequest(model="tiny", messages=ASK + [{"role": "tool", "tool_call_id": "c1", "content": "21C"}],
                         tools=TOOLS)
    text = native.decode(streamer.chat_prompt(body.messages, streamer.tool_plan(body)))
    assert text.startswith("TOOL get_weather\nTOOL get_time\n") and "<|tool|>21C" in text
    # the default template has no tool role: tools go in a system message, results in a user turn
    plain = Streamer(Engine(model, tok), "tiny", None)
    text = tok.decode(plain.chat_prompt(body.messages, plain.tool_plan(body)))
    assert "get_weather" in text and "Result of the function call c1: 21C" in text
