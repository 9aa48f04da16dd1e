"""Chat sessions and the interactive loop: history, /reset, /exit, stopping on end-of-turn,
context trimming, and the embedded default model answering through its chat template."""
import io
import os
import subprocess
import sys

import pytest
import torch

from llmkit.infer.chat import ChatSession, ask, chat_loop
from llmkit.model.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.infer.sampling import SamplingParams
from llmkit.model.decoder import GPT
from llmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(["hello there, how are you? fine thanks."] * 5, vocab_size=300)


def parrot(tokenizer, token: str, block_size=256):
    """A GPT that always predicts `token`: zero weights everywhere, and the final LayerNorm's bias
    (its output for a zero input) lined up with that token's lm_head row only."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.final_norm.bias.fill_(1.0)
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None, token
        model.lm_head.weight[token_id] = 1.0  # tied: also that token's embedding
    return model


def test_reply_stops_on_end_of_turn_token(tokenizer):
    session = ChatSession(parrot(tokenizer, "<|end|>"), tokenizer, params=SamplingParams(max_new_tokens=5, temperature=0))
    assert session.reply("hi") == ""
    assert session.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]


def test_history_is_sent_back_and_reset_keeps_system(tokenizer):
    params = SamplingParams(max_new_tokens=3, temperature=0)
    session = ChatSession(parrot(tokenizer, "hello"), tokenizer, system="be brief", params=params)
    assert session.reply("first") == "hellohellohello"
    session.messages.append({"role": "user", "content": "second"})
    prompt = session.prompt()
    assert prompt == ("<|system|>\nbe brief<|end|>\n<|user|>\nfirst<|end|>\n"
                      "<|assistant|>\nhellohellohello<|end|>\n<|user|>\nsecond<|end|>\n<|assistant|>\n")
    session.reset()
    assert session.messages == [{"role": "system", "content": "be brief"}]


def test_old_turns_are_dropped_when_the_context_is_full(tokenizer):
    params = SamplingParams(max_new_tokens=4, temperature=0)
    session = ChatSession(parrot(tokenizer, "hello", block_size=48), tokenizer, system="sys", params=params)
    for text in ("one", "two", "three", "four"):
        session.reply(text)
    assert len(session.messages) == 9          # the full history is kept...
    prompt = session.prompt()                   # ...but only what fits is sent
    assert prompt.startswith("<|system|>\nsys<|end|>\n") and "four" in prompt and "one" not in prompt
    with pytest.raises(LlmkitError, match="does not fit in the model's context of 48 tokens"):
        session.reply("word " * 100)
    assert len(session.messages) == 9          # the rejected message is not kept


def test_tokenizer_without_template_is_rejected(tokenizer):
    plain = Tokenizer.train_bpe(["abc"], vocab_size=260, special_tokens=["<|eos|>"])
    with pytest.raises(LlmkitError, match="no chat template"):
        ChatSession(parrot(tokenizer, "hello"), plain)


def test_chat_loop_commands(tokenizer):
    session = ChatSession(parrot(tokenizer, "hello"), tokenizer, params=SamplingParams(max_new_tokens=2, temperature=0))
    lines = iter(["hi", "/reset", "/nope", "   ", "again", "/exit", "never read"])
    out = io.StringIO()
    chat_loop(session, input_fn=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert "(history cleared)" in text and "unknown command /nope" in text
    assert text.count("hellohello") == 2
    assert [m["content"] for m in session.messages] == ["again", "hellohello"]
    assert next(lines) == "never read"


def test_chat_loop_ends_at_end_of_input(tokenizer):
    session = ChatSession(parrot(tokenizer, "hello"), tokenizer, params=SamplingParams(max_new_tokens=1, temperature=0))
    lines = iter(["hi"])

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    chat_loop(session, input_fn=read, out=io.StringIO())
    assert len(session.messages) == 2


def test_ask_streams_and_returns_the_answer(tokenizer):
    out = io.StringIO()
    answer = ask("hi", parrot(tokenizer, "hello"), tokenizer, out=out, max_new_tokens=2)
    assert answer == "hellohello" and out.getvalue() == "hellohello\n"


@pytest.mark.slow
def test_cli_chat_with_the_default_model():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "chat", "--temperature", "0", "--max-new-tokens", "16"],
                          input="What is the capital of France?\n/reset\n/exit\n", capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "(history cleared)" in proc.stdout
