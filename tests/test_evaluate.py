"""Perplexity over windows, batched log-likelihoods, and the `llmkit eval` command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import make_data_dir, run_cli, tiny_config

from llmkit.model.config import preset
from llmkit.data.corpus import load_split
from llmkit.errors import LlmkitError
from llmkit.eval.lm import loglikelihood, perplexity, windows
from llmkit.model.decoder import GPT
from llmkit.tokenizer import Tokenizer
from llmkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(preset("char-tiny", vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 23, size=100)


def next_token_logprobs(model, context) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([list(context)]))
    return F.log_softmax(logits[0, -1].float(), dim=-1)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), block=st.integers(1, 40), data=st.data())
def test_windows_score_every_target_once(n, block, data):
    stride = data.draw(st.integers(1, block))
    scored = []
    for begin, end, first in windows(n, block, stride):
        assert 0 <= begin < end <= n - 1 and end - begin <= block
        assert begin + 1 <= first <= end
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def test_perplexity_matches_chunked_cross_entropy(model, tokens):
    total, count = 0.0, 0
    for begin in range(0, len(tokens) - 1, 16):
        x = torch.tensor(tokens[begin:begin + 16][None])
        y = torch.tensor(tokens[begin + 1:begin + 17][None])
        x = x[:, :y.shape[1]]
        with torch.no_grad():
            logits, _ = model(x)
        total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        count += y.shape[1]
    result = perplexity(model, tokens, batch_size=3)
    assert result["tokens"] == count == len(tokens) - 1
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_perplexity_gives_each_token_its_full_context(model, tokens):
    tokens = tokens[:40]
    expected = -np.mean([next_token_logprobs(model, tokens[max(0, t - 16):t])[tokens[t]].item()
                         for t in range(1, len(tokens))])
    result = perplexity(model, tokens, stride=1, batch_size=5)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    strided = perplexity(model, tokens, stride=4, block_size=8)
    assert strided["tokens"] == len(tokens) - 1


def test_perplexity_batching_and_inputs(model, tokens):
    one = perplexity(model, tokens, batch_size=1)
    many = perplexity(model, torch.tensor(tokens), batch_size=7)
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert model.training is False
    tok = Tokenizer.train_char(["abcdefghij klmnop"])
    small = GPT(preset("char-tiny", vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    small.train()
    by_text = perplexity(small, "abc def ghij", tokenizer=tok)
    assert by_text["tokens"] == len(tok.encode("abc def ghij")) - 1
    assert small.training  # the caller's mode is restored
    with pytest.raises(LlmkitError, match="needs a tokenizer"):
        perplexity(small, "abc")
    with pytest.raises(LlmkitError, match="at least 2 tokens"):
        perplexity(model, [3])
    with pytest.raises(LlmkitError, match="exceeds the model's context"):
        perplexity(model, tokens, block_size=32)
    with pytest.raises(LlmkitError, match="stride"):
        perplexity(model, tokens, stride=17)


def test_loglikelihood_matches_token_by_token(model):
    context, continuation = [1, 5, 7, 2], [9, 3, 4]
    expected = sum(next_token_logprobs(model, context + continuation[:i])[tok].item()
                   for i, tok in enumerate(continuation))
    greedy, ctx = [], [4, 4, 8]
    for _ in range(3):
        greedy.append(int(next_token_logprobs(model, ctx + greedy).argmax()))
    not_greedy = [(greedy[0] + 1) % 23] + greedy[1:]
    long_ctx = list(range(20)) * 2  # longer than block_size: left-truncated
    results = loglikelihood(model, [(context, continuation), (ctx, greedy), (ctx, not_greedy), (long_ctx, [3])],
                            batch_size=3)
    assert results[0][0] == pytest.approx(expected, rel=1e-5)
    assert results[1][1] is True and results[2][1] is False
    assert results[3][0] == pytest.approx(next_token_logprobs(model, long_ctx[-16:])[3].item(), rel=1e-5)
    with pytest.raises(LlmkitError, match="non-empty continuation"):
        loglikelihood(model, [([1], [])])


# ---- the `llmkit eval` command -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data_dir = make_data_dir(root)
    Trainer(tiny_config(data_dir, root / "model", max_steps=4, eval_interval=0)).fit()
    return data_dir, root / "model"


def test_eval_cli_reports_perplexity_as_exp_loss(trained, monkeypatch, capsys, tmp_path):
    data_dir, model_dir = trained
    code, out, _ = run_cli(monkeypatch, capsys, "eval", "--model", model_dir, "--data", data_dir, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["tokens"] == len(load_split(data_dir, "val")) - 1
    from llmkit.io.checkpoint import load_checkpoint

    model, _ = load_checkpoint(model_dir)
    assert result["loss"] == pytest.approx(perplexity(model, load_split(data_dir, "val"))["loss"], rel=1e-6)
    text = tmp_path / "sample.txt"
    text.write_text("the queen walks in gardens of stone", encoding="utf-8")
    code, out, _ = run_cli(monkeypatch, capsys, "eval", "--model", model_dir, "--text", text)
    assert code == 0 and "perplexity" in out and str(text) in out


@pytest.mark.parametrize("args, message", [
    (["--data", "DATA", "--text", "x.txt"], "exactly one of"),
    ([], "exactly one of"),
    (["--data", "/nonexistent/data"], "does not exist"),
    (["--text", "/nonexistent/file.txt"], "cannot read text file"),
])
def test_eval_cli_errors(trained, monkeypatch, capsys, args, message):
    data_dir, model_dir = trained
    args = [str(data_dir) if a == "DATA" else a for a in args]
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", model_dir, *args)
    assert code == 1
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", data_dir.parent / "missing", "--data", data_dir)
    assert code == 1 and "no such model" in err
