"""Sampling and scoring fields of the API through the official `openai` client: logprobs/top_logprobs
(chat and completions, streamed too), echo with prompt scoring, top_k, min_p, the three penalties, seed,
stop and n; fields the server does not implement refused by name. Log-probabilities are checked against
the model's own forward pass; penalties and min-p against transformers' logits processors or OpenAI's
documented formula on the same logits."""
from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from llmkit.infer.logprobs import token_bytes
from llmkit.io.checkpoint import load_checkpoint
from llmkit.serve import create_app
from llmkit.serve.engine import Engine
from llmkit.serve.sampling import min_p_filter, penalize
from conftest import make_tiny_model, server_thread

pytestmark = pytest.mark.timeout(180)
PROMPT = [5, 6, 7, 8]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_checkpoint(make_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def served(tiny):
    """(base URL, official client) of a server over the tiny model."""
    with server_thread(create_app(Engine(*tiny, max_batch=4), "tiny")) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def client(served):
    return served[1]


@torch.inference_mode()
def greedy(model, ids, steps, process=lambda ids, logits: logits):
    """Reference decoding: full forward pass per step, argmax of the processed last logits."""
    ids, out = list(ids), []
    for _ in range(steps):
        logits = process(ids, model(torch.tensor([ids]))[0][0, -1].float())
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@torch.inference_mode()
def log_probs(model, ids):
    return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def test_completion_logprobs_and_echo_match_the_model(client, tiny):
    model, tok = tiny
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3, echo=True,
                                  extra_body=NO_EOS)
    out = greedy(model, PROMPT, 5)
    choice = r.choices[0]
    assert choice.text == tok.decode(PROMPT) + tok.decode(out)
    lp = choice.logprobs
    full = PROMPT + out
    assert lp.tokens == [tok.decode([t]) for t in full] and lp.token_logprobs[0] is None
    ref = log_probs(model, full)
    for i in range(1, len(full)):
        assert math.isclose(lp.token_logprobs[i], float(ref[i - 1, full[i]]), abs_tol=1e-4)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert len(lp.top_logprobs[i]) <= 3 and math.isclose(top[0], float(ref[i - 1].max()), abs_tol=1e-4)
    assert lp.text_offset[:2] == [0, len(tok.decode([PROMPT[0]]))]

    # streamed: the echoed prompt first, then one chunk per token carrying its logprob
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1,
                                            echo=True, stream=True, extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and all(math.isclose(a, b, abs_tol=1e-5)
                                       for a, b in zip(streamed[1:], lp.token_logprobs[1:]))


def test_chat_logprobs_streamed_and_not(client, tiny):
    model, tok = tiny
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Name a flower"}], max_tokens=6, temperature=0,
              logprobs=True, top_logprobs=2, extra_body=NO_EOS)
    r = client.chat.completions.create(**kw)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 6 == r.usage.completion_tokens
    # token strings may hold half a character each; their bytes join into the text (a random model
    # may emit byte sequences that are not UTF-8: then the text holds replacement characters)
    joined = b"".join(bytes(e.bytes) for e in entries)
    assert joined.decode("utf-8", errors="replace").replace("\ufffd", "") == \
        r.choices[0].message.content.replace("\ufffd", "")
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name a flower"}]))
    first = log_probs(model, prompt)[-1]
    assert math.isclose(entries[0].logprob, float(first.max()), abs_tol=1e-4)  # greedy: the top token
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-5)
        try:
            assert bytes(e.bytes).decode("utf-8") == e.token
        except UnicodeDecodeError:  # part of a character: its string shows a replacement character
            assert "\ufffd" in e.token
    streamed = [e for c in client.chat.completions.create(stream=True, **kw) if c.choices
                for e in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_token_bytes_join_into_the_text(tiny):
    _, tok = tiny
    text = "Roses – are réd, 日本 ✓"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    assert b"".join(bytes(token_bytes(tok, i)) for i in ids) == text.encode("utf-8")


def test_penalties_match_reference_processors(client, tiny):
    model, tok = tiny
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    hf = RepetitionPenaltyLogitsProcessor(1.8)
    rep = greedy(model, PROMPT, 12, lambda ids, x: hf(torch.tensor([ids]), x[None])[0])
    assert client.completions.create(extra_body={**NO_EOS, "repetition_penalty": 1.8}, **kw).choices[0].text == tok.decode(rep)

    def openai_formula(ids, logits):  # OpenAI's documented rule over the generated tokens only
        counts = torch.bincount(torch.tensor(ids[len(PROMPT):], dtype=torch.long), minlength=logits.shape[-1])
        return logits - counts * 0.7 - (counts > 0).float() * 1.1
    penalized = greedy(model, PROMPT, 12, openai_formula)
    r = client.completions.create(frequency_penalty=0.7, presence_penalty=1.1, extra_body=NO_EOS, **kw)
    assert r.choices[0].text == tok.decode(penalized)
    assert tok.decode(penalized) != tok.decode(greedy(model, PROMPT, 12))  # the penalties changed something


def test_penalize_and_min_p_units_against_transformers():
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    params = type("P", (), dict(repetition_penalty=1.3, presence_penalty=0.0, frequency_penalty=0.0))
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 2, 3, 3]]), logits[None].clone())[0]
    assert torch.allclose(penalize(logits, params, [1, 2], [3, 3]), hf)
    for temperature in (0.5, 1.0, 1.7):
        ours = min_p_filter(logits, 0.2, temperature).isinf()
        theirs = MinPLogitsWarper(0.2)(None, (logits / temperature)[None])[0].isinf()
        assert torch.equal(ours, theirs) and 0 < int(ours.sum()) < 50


def test_top_k_min_p_seed_stop_n(client, tiny):
    model, tok = tiny
    greedy_text = tok.decode(greedy(model, PROMPT, 8))
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.8, extra_body=NO_EOS)
    # top_k=1 and min_p=1 each leave only the most likely token: hot sampling becomes greedy
    assert client.completions.create(n=3, **{**kw, "extra_body": {**NO_EOS, "top_k": 1}}).choices[2].text == greedy_text
    assert client.completions.create(**{**kw, "extra_body": {**NO_EOS, "min_p": 1.0}}).choices[0].text == greedy_text
    hot = [client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)]
    assert any(t != greedy_text for t in hot)  # without them it is not greedy
    again = client.completions.create(seed=2, **kw).choices[0].text
    assert again == hot[1]  # a per-request seed repeats its draw
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, seed=3, logprobs=True, top_logprobs=1)
    assert len(chat.choices) == 2 and all(len(c.logprobs.content) >= 1 for c in chat.choices)
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stop=[greedy_text[3:5]],
                                    extra_body=NO_EOS).choices[0]
    assert cut.finish_reason == "stop" and greedy_text.startswith(cut.text) and len(cut.text) < len(greedy_text)


@pytest.mark.parametrize("body, word", [
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
])
def test_bad_sampling_fields_name_the_field(served, body, word):
    url = served[0]
    route = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(f"{url}/v1/{route}", json={"model": "tiny", **body})
    assert r.status_code == 400 and word in r.json()["error"]["message"]


def test_models_report_context_length(client):
    assert client.models.list().data[0].context_length == 256


def test_fields_not_implemented_are_refused_by_name_through_the_client(client):
    """The official client's own parameters that this server does not implement: a 400 naming the field."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for call, kw, field in ((client.completions.create, {"model": "tiny", "prompt": "x", "best_of": 2}, "best_of"),
                            (client.completions.create, {"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
                            (client.chat.completions.create, {**chat, "logit_bias": {"5": 1}}, "logit_bias"),
                            (client.chat.completions.create, {**chat, "parallel_tool_calls": False},
                             "parallel_tool_calls")):
        with pytest.raises(openai.BadRequestError) as e:
            call(**kw)
        assert f"unknown field '{field}'" in e.value.body["message"] and e.value.body["param"] == field
