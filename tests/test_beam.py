"""Beam search against transformers' generate(num_beams=...): token-for-token equal on the same weights."""
import itertools
import os

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from llmkit.io.checkpoint import save_checkpoint  # noqa: E402
from llmkit.cli import app  # noqa: E402
from llmkit.model.config import preset  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.infer.generate import generate  # noqa: E402
from llmkit.infer.beam import BeamParams, ban_repeated_ngrams, beam_decode  # noqa: E402
from llmkit.io.hf import save_hf  # noqa: E402
from llmkit.model.decoder import GPT  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

VOCAB = 64


def until_end(row: list[int], ends) -> list[int]:
    """HF pads finished rows after their end token: cut there, keeping the end token."""
    return row[:next((i + 1 for i, t in enumerate(row) if t in ends), len(row))]


def hf_beams(hf, prompt: list[int], ends, params: BeamParams, repetition_penalty=1.0) -> list[list[int]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=params.max_new_tokens,
                          num_beams=params.num_beams, length_penalty=params.length_penalty,
                          early_stopping=params.early_stopping, no_repeat_ngram_size=params.no_repeat_ngram_size or None,
                          num_return_sequences=params.num_return_sequences, eos_token_id=list(ends), pad_token_id=0,
                          repetition_penalty=repetition_penalty)
    return [until_end(row[len(prompt):].tolist(), ends) for row in out]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A small random Llama in llmkit and the same weights in transformers. Weights are scaled up so
    the next-token distributions are peaked and end tokens are often chosen."""
    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", vocab_size=VOCAB, n_embd=32, n_head=4, n_kv_head=2, n_layer=2, block_size=64,
                       init_std=0.3)).eval()
    path = tmp_path_factory.mktemp("beam") / "hf"
    save_hf(model, None, path)
    return model, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


SETTINGS = list(itertools.product([3], [1.0, -1.5, 2.0], [False, True, "never"], [0, 2], [[5], [5, 9]]))


@pytest.mark.parametrize("chunk", range(3))
def test_beam_options_match_transformers(tiny_pair, chunk):
    model, hf = tiny_pair
    for seed, (nb, lp, early, ngram, ends) in enumerate(SETTINGS):
        if seed % 3 != chunk:
            continue
        prompt = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        params = BeamParams(num_beams=nb, max_new_tokens=10, length_penalty=lp, early_stopping=early,
                            no_repeat_ngram_size=ngram, num_return_sequences=min(2, nb))
        ours = [h.tokens for h in beam_decode(model, prompt, ends, params)]
        assert ours == hf_beams(hf, prompt, ends, params), params


def test_repetition_penalty_inside_beams_matches_transformers(tiny_pair):
    model, hf = tiny_pair
    params = BeamParams(num_beams=3, max_new_tokens=10, num_return_sequences=3)
    for seed in range(4):
        prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(100 + seed)).tolist()
        ours = [h.tokens for h in beam_decode(model, prompt, [5], params, repetition_penalty=1.3)]
        assert ours == hf_beams(hf, prompt, [5], params, repetition_penalty=1.3)


def test_one_beam_is_greedy(tiny_pair):
    model, _ = tiny_pair
    prompt = list(range(3, 9))
    tokens = beam_decode(model, prompt, [], BeamParams(num_beams=1, max_new_tokens=12))[0].tokens
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat((ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert tokens == ids[0, len(prompt):].tolist()


def test_ban_repeated_ngrams():
    history = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 4]])
    out = ban_repeated_ngrams(history, torch.zeros(2, 6), 3)
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [3]     # "1 2" was followed by 3
    assert torch.isinf(out[1]).nonzero().flatten().tolist() == [4]
    assert torch.equal(ban_repeated_ngrams(history, torch.zeros(2, 6), 6), torch.zeros(2, 6))


def test_bad_beam_options_are_one_line_errors():
    for bad, match in [(dict(num_beams=0), "num_beams"), (dict(num_return_sequences=5), "num_return_sequences"),
                       (dict(early_stopping="sometimes"), "early_stopping"), (dict(no_repeat_ngram_size=-1), "no_repeat"),
                       (dict(length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(LlmkitError, match=match):
            BeamParams(**bad)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    texts = ["the quick brown fox jumps over the lazy dog, 12 times!"] * 10
    tok = Tokenizer.train_bpe(texts, vocab_size=300)
    torch.manual_seed(1)
    model = GPT(preset("llama-tiny", vocab_size=tok.vocab_size, n_embd=32, n_head=4, n_kv_head=2, n_layer=2,
                       block_size=64, init_std=0.3)).eval()
    path = tmp_path_factory.mktemp("beamcli") / "m"
    save_checkpoint(path, model, tok)
    return path, model, tok


def test_python_api_and_cli(tiny_dir):
    path, model, tok = tiny_dir
    params = BeamParams(num_beams=3, max_new_tokens=8, num_return_sequences=2)
    hyps = beam_decode(model, tok.encode("the quick"), tok.stop_ids, params)
    texts = [tok.decode([t for t in h.tokens if t not in tok.stop_ids]) for h in hyps]
    assert generate(model, tok, "the quick", max_new_tokens=8, num_beams=3) == texts[0]
    assert generate(model, tok, ["the quick"], max_new_tokens=8, num_beams=3, num_return_sequences=2) == [texts]
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "the quick", "--max-new-tokens", "8",
                                      "--num-beams", "3", "--no-echo"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == texts[0].strip()
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "the quick", "--num-beams", "2",
                                      "--num-return-sequences", "3"])
    assert result.exit_code != 0 and "num_return_sequences" in str(result.exception or result.output)
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "the quick", "--num-beams", "0"])
    assert result.exit_code != 0 and "num_beams must be" in str(result.exception)


SMOL_QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
                  "Give me three tips for better sleep.", "Translate to French: The cat is very good.",
                  "What is 12 times 7?", "Name a famous painting by Leonardo da Vinci.",
                  "Explain what a black hole is in one sentence.", "Who wrote Romeo and Juliet?"]


@pytest.mark.slow
def test_smollm2_four_beams_match_transformers(tmp_path):
    from llmkit.io.resolve import resolve_model

    ours, tok = resolve_model("smollm2-135m-instruct", dtype="float32")  # fp32 (the GGUF's weights, dequantized)
    save_hf(ours, tok, tmp_path / "hf")                 # the same weights for transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    params = BeamParams(num_beams=4, max_new_tokens=12)
    for question in SMOL_QUESTIONS:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
        assert [beam_decode(ours, prompt, tok.stop_ids, params)[0].tokens] == hf_beams(hf, prompt, tok.stop_ids, params)


def test_server_num_beams_field(tmp_path):
    import httpx
    from conftest import make_tiny_model, server_thread

    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.serve import create_app
    from llmkit.serve.engine import Engine

    model, tok = load_checkpoint(make_tiny_model(tmp_path))
    want = generate(model, tok, ["The king"], max_new_tokens=8, num_beams=3, num_return_sequences=2)[0]
    with server_thread(create_app(Engine(model, tok, max_batch=2), "tiny")) as url:
        body = {"model": "tiny", "prompt": "The king", "max_tokens": 8, "num_beams": 3, "n": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert [c["text"] for c in r["choices"]] == want
        assert r["usage"]["completion_tokens"] > 0
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "num_beams": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
        assert r["choices"][0]["message"]["role"] == "assistant"
        for bad in ({**body, "stream": True}, {**body, "n": 4}, {**body, "num_beams": 0}):
            r = httpx.post(f"{url}/v1/completions", json=bad, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["message"]
