"""The chat page in a real headless Chromium (Debian's, driven by Playwright; no browser download):
send a message, watch the answer stream in, continue, start over, and keep a screenshot."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from llmkit.io.checkpoint import load_checkpoint
from llmkit.serve import create_app
from llmkit.serve.engine import Engine
from conftest import make_tiny_model, server_thread

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test installs it)"),
]


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
    model, tok = load_checkpoint(make_tiny_model(tmp_path_factory.mktemp("tiny")))
    with server_thread(create_app(StepEngine(model, tok, max_batch=2), "tiny")) as base:
        yield base


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        outside = []
        # the page must need nothing but this server: record any request elsewhere
        page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
        page.goto(url + "/")
        yield page
        browser.close()
        assert not outside, outside


def test_chat_page_streams_answers(page, tmp_path):
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    page.fill("#max-tokens", "60")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#temperature", "0.5")
    page.dispatch_event("#temperature", "input")
    assert page.text_content("#temperature-value") == "0.50"

    page.fill("#prompt", "Where do roses grow?")
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant").first
    # mid-stream: some text is there, the answer is still marked as streaming, Stop is offered
    page.wait_for_function("""() => {
        const a = document.querySelector('.message.assistant.streaming');
        return a && a.textContent.length > 0;
    }""", timeout=30_000)
    partial = answer.text_content()
    assert page.is_visible("#stop") and page.is_disabled("#send")
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)
    meta = answer.locator(".meta").text_content()
    assert meta == "stopped at max tokens, 60 tokens"  # finish reason and usage under the answer
    final = answer.text_content()[:-len(meta)]
    assert final.startswith(partial) and len(final) > len(partial)
    assert page.locator(".message.user").first.text_content() == "Where do roses grow?"

    out = Path(os.environ.get("LLMKIT_SCREENSHOT_DIR", tmp_path)) / "serve_chat_page.png"
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 5000

    # the conversation continues: the second request carries both earlier turns
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#prompt", "And then?")
        page.click("#send")
    messages = sent.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == final
    assert sent.value.post_data_json["temperature"] == 0.5 and sent.value.post_data_json["max_tokens"] == 60
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 2")
    page.click("#stop")  # stopping mid-answer keeps what arrived
    page.wait_for_selector("#stop", state="hidden")

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    with page.expect_request("**/v1/chat/completions") as fresh:
        page.fill("#prompt", "Hello again")
        page.press("#prompt", "Enter")
    assert [m["role"] for m in fresh.value.post_data_json["messages"]] == ["user"]
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)

