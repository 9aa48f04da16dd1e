"""llmkit.infer.generate.Decoder, the one decode path: ragged rows, the compiled option, cache limits."""
import pytest
import torch

from llmkit.model.config import preset
from llmkit.errors import LlmkitError
from llmkit.infer.generate import CompiledBlock, Decoder
from llmkit.infer.cpu import decode_layout, optimize_for_inference
from llmkit.model.decoder import GPT


def small(name):
    torch.manual_seed(0)
    return GPT(preset(name, n_layer=2, n_head=4, n_kv_head=2 if name == "llama-tiny" else 4, n_embd=64,
                      vocab_size=97, block_size=64)).eval()


@pytest.mark.parametrize("name, compiled", [
    ("gpt2-124m", False), ("llama-tiny", False),
    pytest.param("llama-tiny", True, marks=pytest.mark.slow),   # inductor compiles one block: ~10 s
])
def test_matches_the_model_step_by_step(name, compiled):
    model = optimize_for_inference(small(name))
    ids = torch.randint(0, 97, (2, 12))
    decoder = Decoder(model, batch_size=2, max_len=20, compile=compiled)
    assert compiled == all(isinstance(b, CompiledBlock) for b in model.blocks)
    with torch.inference_mode():
        assert torch.allclose(decoder.prefill(ids[:, :8].tolist()), model(ids[:, :8])[0][:, -1], atol=1e-5)
        for t in range(8, 12):   # each step sees exactly the tokens before it
            expected = model(ids[:, :t + 1])[0][:, -1]
            assert torch.allclose(decoder.step(ids[:, t]), expected, atol=1e-5)
        # starting over reuses the cache: stale slots beyond the new prompt stay masked
        decoder.cache.reset()
        assert torch.allclose(decoder.prefill(ids[:, :3].tolist()), model(ids[:, :3])[0][:, -1], atol=1e-5)
        assert torch.allclose(decoder.step(ids[:, 3]), model(ids[:, :4])[0][:, -1], atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2-124m", "llama-tiny"])
def test_rows_of_different_lengths_decode_together(name):
    """No left padding: each row keeps its own length, prompts and steps give each row its own logits."""
    model = small(name)
    prompts = [[11, 12], [5, 6, 7, 8, 9, 10], [13, 14, 15, 16]]  # row 0 shorter than the longest
    decoder = Decoder(model, batch_size=4, max_len=12)
    with torch.inference_mode():
        got = decoder.prefill(prompts)
        assert decoder.cache.lengths == [2, 6, 4, 0]
        for i, p in enumerate(prompts):
            torch.testing.assert_close(got[i], model(torch.tensor([p]))[0][0, -1], atol=1e-5, rtol=0)
        for t in range(3):
            nxt = [20 + t, 30 + t, 40 + t]
            got = decoder.step(torch.tensor(nxt))
            prompts = [p + [n] for p, n in zip(prompts, nxt)]
            for i, p in enumerate(prompts):
                torch.testing.assert_close(got[i], model(torch.tensor([p]))[0][0, -1], atol=1e-5, rtol=0)
        # beam search's reorder: rows follow their index, lengths too
        decoder.cache.reorder([2, 2, 0, 1])
        assert decoder.cache.lengths == [7, 7, 5, 9]
        got = decoder.step(torch.tensor([1, 2, 3, 4]))
        for i, p in enumerate([prompts[2] + [1], prompts[2] + [2], prompts[0] + [3], prompts[1] + [4]]):
            torch.testing.assert_close(got[i], model(torch.tensor([p]))[0][0, -1], atol=1e-5, rtol=0)


def test_cache_limits():
    model = GPT(preset("llama-tiny", n_layer=1, vocab_size=50)).eval()
    decoder = Decoder(model, 1, max_len=4)
    with pytest.raises(LlmkitError, match="capacity"):
        decoder.prefill([[0] * 5])
    decoder.cache.reset()
    decoder.prefill([[0] * 3])
    decoder.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(LlmkitError, match="capacity"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(LlmkitError, match="equal length"):
        Decoder(model, 2, 8, compile=True).prefill([[1, 2], [3]])


def test_bf16_model_keeps_an_fp32_cache():
    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", n_layer=2, vocab_size=97)).eval().to(torch.bfloat16)
    optimize_for_inference(model)  # the CPU swaps choose the fp32 cache
    ids = torch.randint(0, 97, (1, 9))
    decoder = Decoder(model, 1, max_len=16)
    assert decoder.cache.k[0].dtype == torch.float32
    with torch.inference_mode():
        decoder.prefill(ids[:, :8].tolist())
        got, expected = decoder.step(ids[:, 8]), model(ids)[0][:, -1]
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", ["gpt2-124m", "llama-tiny"])
def test_decode_layout_keeps_values_and_checkpoints(name, tmp_path, monkeypatch):
    """Column-major weights where PyTorch's BLAS decodes: same logits (tied head included), and the
    checkpoint still saves and loads. llmkit's own kernel reads them row-major, as they are."""
    from llmkit.infer import kernels
    from llmkit.io.checkpoint import load_checkpoint, save_checkpoint
    from llmkit.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = GPT(preset(name, n_layer=2, n_head=4, n_kv_head=2 if name == "llama-tiny" else 4, n_embd=64,
                       vocab_size=300, block_size=64)).eval()
    if kernels.available():
        decode_layout(model)
        assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setitem(kernels._state, "loaded", False)
    ids = torch.randint(0, 300, (1, 10))
    with torch.inference_mode():
        before = model(ids)[0]
    decode_layout(model)
    assert all(not m.weight.is_contiguous() and m.weight.t().is_contiguous()
               for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert (model.lm_head.weight is model.embed.weight) == model.config.tie_embeddings
    with torch.inference_mode():
        assert torch.allclose(model(ids)[0], before, atol=1e-5)
    save_checkpoint(tmp_path, model, Tokenizer.train_char(["some text"]))
    again, _ = load_checkpoint(tmp_path)
    with torch.inference_mode():
        assert torch.allclose(again(ids)[0], before, atol=1e-5)
    bf16 = GPT(preset(name, n_layer=1, n_head=4, n_embd=64, vocab_size=300)).to(torch.bfloat16)
    decode_layout(bf16)  # bf16 keeps row-major: transposed bf16 matrix-vector products are slow on CPU
    assert all(m.weight.is_contiguous() for m in bf16.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("name", ["gpt2-124m", "llama-tiny"])
def test_long_prompts_prefill_in_chunks_with_the_same_logits(name, monkeypatch):
    import llmkit.infer.generate as generate

    monkeypatch.setattr(generate, "PREFILL_CHUNK", 5)  # 12 tokens: chunks of 5, 5 and 2
    model = optimize_for_inference(small(name))
    ids = torch.randint(0, 97, (2, 14))
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[1]), with_kwargs=True)
    decoder = Decoder(model, batch_size=2, max_len=20)
    with torch.inference_mode():
        expected = model(ids[:, :12])[0][:, -1]
        calls.clear()
        assert torch.allclose(decoder.prefill(ids[:, :12].tolist()), expected, atol=1e-5)
        assert calls == [5, 5, 2] and decoder.cache.lengths == [12, 12]
        assert torch.allclose(decoder.step(ids[:, 12]), model(ids[:, :13])[0][:, -1], atol=1e-5)
