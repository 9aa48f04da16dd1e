"""The chat page with a model whose context is shorter than the conversation (and than the reply
length asked for): it drops the oldest exchanges and lets the reply take what is left, as
`llmkit chat` does, instead of failing every turn with context_length_exceeded."""
from __future__ import annotations

import os

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


def test_page_trims_old_turns_to_fit_a_short_context(tmp_path):
    from playwright.sync_api import sync_playwright

    model, tok = load_checkpoint(make_tiny_model(tmp_path / "tiny", block_size=48))
    with server_thread(create_app(Engine(model, tok, max_batch=2), "tiny")) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
        page.click("#toggle-settings")  # the settings panel starts closed
        page.fill("#system-prompt", "Be brief.")
        page.fill("#max-tokens", "200")  # more than the whole context
        page.dispatch_event("#max-tokens", "change")
        page.fill("#seed", "7")  # the same replies every run, so the trimming sees the same lengths
        page.dispatch_event("#seed", "change")
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
        for i, text in enumerate(["the king speaks of love and war", "roses grow under a pale moon",
                                  "soldiers march home through rain"], start=1):
            page.fill("#prompt", text)
            page.press("#prompt", "Enter")
            # a finished reply, or an error (which then fails below with its text, not as a timeout)
            page.wait_for_function(f"document.querySelectorAll('.message.assistant:not(.streaming)').length === {i}"
                                   " || document.querySelectorAll('.message.error').length > 0", timeout=60_000)
            assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_text_contents()
        last = sent[-1]
        assert "max_tokens" not in last and last["messages"][-1]["content"] == "soldiers march home through rain"
        assert last["messages"][0] == {"role": "system", "content": "Be brief."}  # the system prompt stays
        contents = [m["content"] for m in last["messages"]]
        assert "the king speaks of love and war" not in contents  # the first exchange was left out of the request
        assert len(last["messages"]) < 6  # all of it: system, three questions, two answers
        assert "left out to fit the context" in page.locator(".message.assistant .meta").last.text_content()
        assert page.locator(".message.user").count() == 3  # but the whole conversation is still shown
        browser.close()
