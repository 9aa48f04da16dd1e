"""The chat page in a real headless Chromium (Debian's, driven by Playwright; no browser download).

Streaming, stop, regenerate and edit run against the server with a tiny random model; markdown,
highlighting and copy get a scripted reply (a Playwright route) so the text is known. Screenshots
go to $LLMKIT_SCREENSHOT_DIR (else the test's tmp dir) for a person to look at."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from llmkit.io.checkpoint import load_checkpoint
from llmkit.serve import create_app
from llmkit.serve.engine import Engine
from conftest import make_tiny_model, server_thread

CHROMIUM = "/usr/bin/chromium"
CONTEXT = 256
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test installs it)"),
]
MARKDOWN = ("# Plan\n\nSome **bold** text and `inline` code.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
            "```python\ndef add(x, y):\n    return x + y\n```\n\n<img src=x onerror=\"window.pwned = 1\">\n")


class StepEngine(Engine):
    """30 ms per decode step and no stop tokens, so the page is caught mid-stream."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_ids = frozenset()

    def _decode(self):
        time.sleep(0.03)
        super()._decode()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model, tok = load_checkpoint(make_tiny_model(tmp_path_factory.mktemp("tiny"), block_size=CONTEXT))
    with server_thread(create_app(StepEngine(model, tok, max_batch=2), "tiny")) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def open_page(browser, url, scheme="light"):
    """A fresh browser context (empty localStorage) on the chat page; records requests elsewhere."""
    context = browser.new_context(viewport={"width": 1100, "height": 720}, color_scheme=scheme)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = context.new_page()
    page.outside, page.errors = [], []
    page.on("request", lambda r: None if r.url.startswith(url) else page.outside.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    return page


@pytest.fixture
def page(browser, url):
    page = open_page(browser, url)
    yield page
    assert not page.outside, page.outside  # the page needs nothing but this server
    assert not page.errors, page.errors
    page.context.close()


def screenshot(page, tmp_path, name):
    out = Path(os.environ.get("LLMKIT_SCREENSHOT_DIR", tmp_path)) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 5000


def send(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_idle(page, count):
    page.wait_for_function(f"document.querySelectorAll('.message.assistant:not(.streaming)').length === {count}"
                           " && document.getElementById('stop').hidden", timeout=60_000)


def script_reply(page, text):
    """Answer the next chat requests with `text` as one SSE stream of one chunk per character."""
    def fulfill(route):
        chunks = [{"choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in text]
        chunks[-1]["choices"][0]["finish_reason"] = "stop"
        chunks.append({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": len(text),
                                                "total_tokens": 20 + len(text)}})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
    page.route("**/v1/chat/completions", fulfill)


def test_streams_with_speed_and_context_use(page, tmp_path):
    page.click("#toggle-settings")
    page.fill("#max-tokens", "60")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#temperature", "0.5")
    page.dispatch_event("#temperature", "input")
    assert page.text_content("#temperature-value") == "0.50"
    send(page, "Where do roses grow?")
    # mid-stream: some text is there, the answer is still marked as streaming, Stop is offered
    page.wait_for_function("""() => {
        const a = document.querySelector('.message.assistant.streaming .content');
        return a && a.textContent.length > 0;
    }""", timeout=30_000)
    assert page.is_visible("#stop") and page.is_disabled("#send")
    wait_idle(page, 1)
    answer = page.locator(".message.assistant").first
    assert answer.locator(".meta .tokens").text_content() == "60 tokens"
    assert re.fullmatch(r"\d+\.\d tok/s", answer.locator(".meta .speed").text_content())
    used = re.fullmatch(r"context (\d+)/256 \(\d+%\)", answer.locator(".meta .context-use").text_content())
    assert used and int(used[1]) > 60  # prompt + 60 generated tokens
    assert answer.locator(".meta .note").text_content() == "stopped at max tokens"
    assert page.locator(".message.user .content").first.text_content() == "Where do roses grow?"
    screenshot(page, tmp_path, "serve_chat_page.png")

    # the conversation continues: the second request carries both earlier turns and the settings
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "And then?")
    body = sent.value.post_data_json
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["temperature"] == 0.5 and body["max_tokens"] == 60
    page.wait_for_function("document.querySelectorAll('.message.assistant .content')[1]?.textContent.length > 0")
    page.click("#stop")  # stopping mid-answer keeps what arrived
    page.wait_for_selector("#stop", state="hidden")
    assert page.locator(".message.assistant").nth(1).locator(".meta .note").text_content() == "stopped"


def test_markdown_code_highlighting_and_copy(page, tmp_path):
    script_reply(page, MARKDOWN)
    send(page, "Show me some markdown")
    wait_idle(page, 1)
    answer = page.locator(".message.assistant").first
    assert answer.locator("h1").text_content() == "Plan"
    assert answer.locator("strong").text_content() == "bold"
    assert answer.locator("td").all_text_contents() == ["1", "2"]
    code = answer.locator("pre code.hljs.language-python")
    assert code.locator(".hljs-keyword").first.text_content() == "def"  # highlighted, not plain text
    # raw HTML in a reply is sanitised: no element keeps an event handler, nothing ran
    assert page.evaluate("document.querySelectorAll('#messages [onerror]').length") == 0
    assert page.evaluate("window.pwned === undefined")

    answer.locator("button.copy-code").click()
    assert answer.locator("button.copy-code").text_content() == "Copied"
    assert page.evaluate("navigator.clipboard.readText()") == "def add(x, y):\n    return x + y\n"
    answer.locator("button.copy-message").click()
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN
    page.locator(".message.user button.copy-message").click()
    assert page.evaluate("navigator.clipboard.readText()") == "Show me some markdown"
    screenshot(page, tmp_path, "serve_chat_markdown.png")


def test_regenerate_and_edit_and_resend(page):
    page.click("#toggle-settings")
    page.fill("#max-tokens", "30")
    send(page, "First question")
    page.wait_for_function("document.querySelector('.message.assistant .content')?.textContent.length > 0")
    page.click("#stop")
    wait_idle(page, 1)
    # regenerate: the last reply is dropped and asked for again
    with page.expect_request("**/v1/chat/completions") as again:
        page.click(".message.assistant button.regenerate")
    assert again.value.post_data_json["messages"] == [{"role": "user", "content": "First question"}]
    wait_idle(page, 1)
    assert page.locator(".message").count() == 2
    send(page, "Second question")
    wait_idle(page, 2)
    assert page.locator(".message.assistant button.regenerate").count() == 1  # on the last reply only

    # edit the first question: what followed it is replaced by the new answer
    page.locator(".message.user button.edit").first.click()
    page.fill(".edit-box", "First question, reworded")
    with page.expect_request("**/v1/chat/completions") as edited:
        page.click("button.save-edit")
    assert edited.value.post_data_json["messages"] == [{"role": "user", "content": "First question, reworded"}]
    wait_idle(page, 1)
    assert page.locator(".message.user .content").all_text_contents() == ["First question, reworded"]


def test_conversations_survive_reload_and_switch(page, url):
    script_reply(page, "Answer **one**")
    send(page, "Conversation one")
    wait_idle(page, 1)
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.unroute("**/v1/chat/completions")
    script_reply(page, "Answer two")
    send(page, "Conversation two")
    wait_idle(page, 1)
    titles = page.locator("#conversation-list .conversation")
    assert titles.all_text_contents() == ["Conversation two", "Conversation one"]  # newest first

    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    assert titles.all_text_contents() == ["Conversation two", "Conversation one"]
    assert page.locator(".message.user .content").all_text_contents() == ["Conversation two"]
    titles.nth(1).click()
    assert page.locator(".message.user .content").all_text_contents() == ["Conversation one"]
    assert page.locator(".message.assistant strong").text_content() == "one"
    assert page.locator("#conversation-list li.active .conversation").text_content() == "Conversation one"
    page.locator("#conversation-list li.active .delete-conversation").click()
    assert titles.all_text_contents() == ["Conversation two"]
    assert page.locator(".message.user .content").all_text_contents() == ["Conversation two"]


def test_system_prompt_and_sampling_settings_are_sent_and_kept(page):
    page.click("#toggle-settings")
    page.fill("#system-prompt", "You are terse.")
    page.fill("#top-p", "0.9")
    page.dispatch_event("#top-p", "change")
    page.fill("#seed", "7")
    page.dispatch_event("#seed", "change")
    script_reply(page, "ok")
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Hi")
    body = sent.value.post_data_json
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert body["top_p"] == 0.9 and body["seed"] == 7 and body["stream"] is True
    wait_idle(page, 1)
    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    assert page.input_value("#top-p") == "0.9" and page.input_value("#seed") == "7"
    assert page.input_value("#system-prompt") == "You are terse."  # kept with its conversation
    page.click("#new-chat")
    assert page.input_value("#system-prompt") == ""


def test_dark_mode_follows_the_system(browser, url, tmp_path):
    page = open_page(browser, url, scheme="dark")
    try:
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(15, 17, 21)"
        script_reply(page, "```js\nconst x = 1;\n```")
        send(page, "dark?")
        wait_idle(page, 1)
        keyword = page.locator(".hljs-keyword").first
        assert keyword.evaluate("e => getComputedStyle(e).color") == "rgb(255, 123, 114)"  # github-dark's red
        screenshot(page, tmp_path, "serve_chat_dark.png")
    finally:
        page.context.close()
    light = open_page(browser, url)
    assert light.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"
    light.context.close()
