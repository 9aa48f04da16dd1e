"""Sampling functions, incremental detokenization, stop handling, the batched decoding loop and the CLI."""
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from llmkit.io.checkpoint import save_checkpoint
from llmkit.cli import app
from llmkit.model.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.infer.sampling import SamplingParams, apply_repetition_penalty, sample_next, top_k_filter, top_p_filter
from llmkit.infer.generate import Completion, IncrementalDecoder, generate, stream
from llmkit.model.decoder import GPT
from llmkit.model.cache import KVCache
from llmkit.tokenizer import Tokenizer

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. Café crème, naïve façade — ÉTÉ ✓ ")
UNICODE = "naïve café — 日本語 ✓ ok"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe([TEXT] * 4, vocab_size=300)


class ScriptedModel(torch.nn.Module):
    """Greedily emits a fixed token script per row whatever the prompt, so text-level tests are exact."""

    def __init__(self, scripts, vocab_size, block_size=64):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=2)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives generate() a device
        self.scripts = scripts
        self.calls = []

    def new_cache(self, batch_size, max_len=None, static=False):
        return KVCache(0, batch_size, 1, max_len or self.config.block_size, 1)

    def forward(self, idx, targets=None, *, cache, lengths=None, last_only=False):
        step = len(self.calls) if max(cache.lengths) else 0
        cache.begin(*idx.shape)
        self.calls = self.calls[:step] + [idx.shape[0]]
        logits = torch.zeros(idx.shape[0], 1, self.config.vocab_size)
        for row in range(idx.shape[0]):
            script = self.scripts[row % len(self.scripts)]
            logits[row, 0, script[min(step, len(script) - 1)]] = 10.0
        cache.advance(idx.shape[1] if lengths is None else lengths)
        return logits, None


def tiny_gpt(tok, style, seed=0):
    torch.manual_seed(seed)
    extra = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False) if style == "llama" else {}
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32, init_std=0.3, **extra)).eval()


# ---- pure sampling functions -------------------------------------------------------------------


def test_top_k_keeps_exactly_k():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = top_k_filter(logits, 5)
    assert (torch.isfinite(out).sum(-1) == 5).all()
    kept = torch.isfinite(out).nonzero()[:, 1].view(3, 5).sort(-1).values
    assert torch.equal(kept, logits.topk(5).indices.sort(-1).values)
    torch.testing.assert_close(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    assert top_k_filter(logits, None) is logits and top_k_filter(logits, 50) is logits


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # shuffled so the filter must undo its sort
    logits = probs.log()[None]
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.1) == [1]            # the top token alone already covers 10%
    assert kept(0.6) == [1, 3]         # 0.5 < 0.6, 0.5 + 0.3 >= 0.6
    assert kept(0.85) == [1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    rows = torch.randn(8, 40, generator=torch.Generator().manual_seed(1)) * 2
    for p in (0.3, 0.9):
        out = top_p_filter(rows, p)
        for row, filtered in zip(rows.softmax(-1), out):
            keep = torch.isfinite(filtered)
            assert row[keep].sum() >= p - 1e-6                        # enough mass
            assert row[keep].sum() - row[keep].min() < p              # and no token more than needed


def test_repetition_penalty_follows_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1, -1]]), 2.0)  # -1 = padding
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.5]]))
    ragged = apply_repetition_penalty(torch.ones(2, 4), [[3], [0, 1]], 4.0)
    torch.testing.assert_close(ragged, torch.tensor([[1, 1, 1, 0.25], [0.25, 0.25, 1, 1]]))
    assert apply_repetition_penalty(logits, [[0]], 1.0) is logits


def test_sample_next_greedy_seeded_and_distribution():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=5.0, top_k=1), logits.argmax(-1))
    draw = lambda seed: sample_next(logits, 1.0, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not all(torch.equal(draw(7), draw(s)) for s in range(8, 12))
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = sample_next(probs.log().expand(4000, 3), 1.0, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    sharp = sample_next(probs.log().expand(2000, 3), 0.1, generator=torch.Generator().manual_seed(4))
    assert (sharp == 0).float().mean() > 0.99  # low temperature concentrates on the mode


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(repetition_penalty=0), dict(max_new_tokens=-1), dict(stop=[""])])
def test_sampling_params_validation(bad):
    with pytest.raises(LlmkitError):
        SamplingParams(**bad)


# ---- text helpers ---------------------------------------------------------------------------


def test_incremental_decoder_never_splits_characters(tok):
    ids = tok.encode(UNICODE)
    assert len(ids) > len(UNICODE.encode()) / 2  # several characters span more than one token
    decoder = IncrementalDecoder(tok, tok.encode("Say: "))
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == UNICODE
    assert not any("\ufffd" in p for p in pieces)


def test_completion_holds_back_possible_stop_prefix(tok):
    done = Completion(tok, [], stop=["END"])
    assert done._add("abc E") == "abc "   # "E" might start "END"
    assert done._add("Nx") == "ENx"       # it did not
    assert done._add("yEN") == "y"
    assert done._add("D more") == "" and done.text == "abc ENxy" and done.finish_reason == "stop"


# ---- the decoding loop ----------------------------------------------------------------------


def test_stop_strings_and_stream_equal_generate(tok):
    text = "the question: café ✓ whether"
    model = ScriptedModel([tok.encode(text)], tok.vocab_size)
    full = generate(model, tok, "x", max_new_tokens=len(tok.encode(text)), temperature=0)
    assert full == text
    assert "".join(stream(model, tok, "x", max_new_tokens=40, temperature=0, stop=["ther"])) == "the question: café ✓ whe"
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=("é ✓", ": "))  # earliest match wins
    assert generate(model, tok, "x", params) == "the question"
    pieces = list(stream(model, tok, "x", params))
    assert "".join(pieces) == "the question" and all(":" not in p for p in pieces)


def test_unicode_stream_concatenation_equals_generate(tok):
    model = ScriptedModel([tok.encode(UNICODE)], tok.vocab_size)
    params = SamplingParams(max_new_tokens=len(tok.encode(UNICODE)), temperature=0)
    pieces = list(stream(model, tok, "Q", params))
    assert "".join(pieces) == UNICODE == generate(model, tok, "Q", params)
    assert not any("\ufffd" in p for p in pieces)


def test_eos_ends_a_row_and_finished_rows_stop(tok):
    eos = tok.eos_id
    short, long = tok.encode("abc") + [eos], tok.encode("longer text here")
    model = ScriptedModel([short + tok.encode("zzz"), long], tok.vocab_size)
    out = generate(model, tok, ["p", "q"], max_new_tokens=len(long), temperature=0)
    assert out == ["abc", "longer text here"]
    assert len(model.calls) == len(long)  # the batch ran until the long row was done
    both_stop = ScriptedModel([short], tok.vocab_size)
    assert generate(both_stop, tok, ["p", "q"], max_new_tokens=30, temperature=0) == ["abc", "abc"]
    assert len(both_stop.calls) == len(short)  # no step after every row has finished


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_batch_of_different_lengths_equals_single_prompts(tok, style):
    model = tiny_gpt(tok, style)
    prompts = ["To be, or not", "the", "Café crème, naïve façade — whether 'tis nobler"]
    batched = generate(model, tok, prompts, max_new_tokens=12, temperature=0)
    singles = [generate(model, tok, p, max_new_tokens=12, temperature=0) for p in prompts]
    assert batched == singles
    assert all(len(tok.encode(s)) >= 6 for s in singles)  # sanity: real completions were produced


def test_seeded_sampling_is_reproducible(tok):
    model = tiny_gpt(tok, "llama")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=11)
    first = generate(model, tok, ["to be", "or not"], params)
    assert generate(model, tok, ["to be", "or not"], params) == first
    assert generate(model, tok, ["to be", "or not"], params, seed=12) != first
    assert "".join(stream(model, tok, "to be", params)) == generate(model, tok, "to be", params)


def test_generation_leaves_model_and_autograd_state_alone(tok):
    model = tiny_gpt(tok, "gpt2").train()
    for _ in stream(model, tok, "the", max_new_tokens=4, seed=0):
        assert not torch.is_inference_mode_enabled()  # inference mode never leaks across a yield
    assert model.training
    assert generate(model, tok, "", max_new_tokens=3, seed=0) != ""  # empty prompt starts from BOS
    assert generate(model, tok, ["a", "b"], max_new_tokens=0) == ["", ""]


def test_prompt_too_long_names_both_lengths(tok):
    model = tiny_gpt(tok, "gpt2")  # block_size 64
    prompt = "the " * 80
    n = len(tok.encode(prompt))
    with pytest.raises(LlmkitError, match=rf"{n} tokens.*{n + 30}.*context of 64"):
        generate(model, tok, ["ok", prompt], max_new_tokens=30)


def test_max_new_tokens_is_clamped_to_the_room_the_context_leaves(tok, caplog):
    model = tiny_gpt(tok, "gpt2")  # block_size 64
    n = len(tok.encode("the " * 20))
    text = generate(model, tok, "the " * 20, max_new_tokens=500, temperature=0)
    assert generate(model, tok, "the " * 20, max_new_tokens=64 - n, temperature=0) == text  # greedy: same text
    assert "does not fit the model's context of 64 tokens" in caplog.text


# ---- CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(out, tiny_gpt(tok, "llama"), tok)
    return out


def test_cli_streams_a_prompt(model_dir, tok):
    from llmkit.io.checkpoint import load_checkpoint
    model, _ = load_checkpoint(model_dir)
    expected = generate(model, tok, "To be", max_new_tokens=10, temperature=0)
    result = CliRunner().invoke(app, ["generate", "To be", "--model", str(model_dir), "--max-new-tokens", "10",
                                      "--temperature", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output == "To be" + expected + "\n"
    sampled = CliRunner().invoke(app, ["generate", "To be", "--model", str(model_dir), "--num-samples", "2",
                                       "--seed", "3", "--top-p", "0.9", "--no-echo", "--max-new-tokens", "8"])
    assert sampled.exit_code == 0 and sampled.output.count("\n---\n") == 1


def test_cli_generates_in_bfloat16_and_rejects_unknown_dtypes(model_dir, tok):
    from llmkit.io.checkpoint import load_checkpoint
    model, _ = load_checkpoint(model_dir)
    expected = generate(model.to(torch.bfloat16), tok, "To be", max_new_tokens=8, temperature=0)
    result = CliRunner().invoke(app, ["generate", "To be", "--model", str(model_dir), "--max-new-tokens", "8",
                                      "--temperature", "0", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert result.output == "To be" + expected + "\n"
    bad = CliRunner().invoke(app, ["generate", "To be", "--model", str(model_dir), "--dtype", "float8"])
    assert bad.exit_code != 0 and "unknown dtype 'float8'" in str(bad.exception)


def test_cli_prompt_file_batch(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n\nCafé crème\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["generate", "--prompt-file", str(prompts), "--model", str(model_dir),
                                      "--max-new-tokens", "6", "--temperature", "0", "--stop", "zz"])
    assert result.exit_code == 0, result.output
    blocks = result.output.split("---\n")
    assert len(blocks) == 2 and blocks[0].startswith("To be") and blocks[1].startswith("Café crème")


def test_cli_reports_errors_on_one_line(model_dir):
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "generate", "hi " * 80, "--model", str(model_dir),
                           "--max-new-tokens", "100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "context of 64" in proc.stderr and proc.stderr.count("\n") == 1
