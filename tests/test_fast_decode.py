"""llmkit.infer.compiled.CompiledDecoder gives the model's own logits, eager and compiled."""
import pytest
import torch

from llmkit.model.config import preset
from llmkit.errors import LlmkitError
from llmkit.infer.compiled import CompiledDecoder, decode_layout
from llmkit.model.decoder import GPT


@pytest.mark.parametrize("name, compiled", [
    ("gpt2-124m", False), ("llama-tiny", False),
    pytest.param("llama-tiny", True, marks=pytest.mark.slow),   # inductor compiles one block: ~10 s
])
def test_matches_the_model_step_by_step(name, compiled):
    torch.manual_seed(0)
    model = GPT(preset(name, n_layer=2, n_head=4, n_kv_head=2 if name == "llama-tiny" else 4, n_embd=64,
                       vocab_size=97, block_size=64)).eval()
    ids = torch.randint(0, 97, (2, 12))
    decoder = CompiledDecoder(model, max_len=20, batch_size=2, compile=compiled)
    with torch.inference_mode():
        assert torch.allclose(decoder.prefill(ids[:, :8]), model(ids[:, :8])[0][:, -1], atol=1e-5)
        for t in range(8, 12):   # each step sees exactly the tokens before it
            expected = model(ids[:, :t + 1])[0][:, -1]
            assert torch.allclose(decoder.decode(ids[:, t:t + 1]), expected, atol=1e-5)
        # starting over reuses the cache: stale slots beyond the new prompt stay masked
        assert torch.allclose(decoder.prefill(ids[:, :3]), model(ids[:, :3])[0][:, -1], atol=1e-5)
        assert torch.allclose(decoder.decode(ids[:, 3:4]), model(ids[:, :4])[0][:, -1], atol=1e-5)


def test_cache_limits():
    model = GPT(preset("llama-tiny", n_layer=1, vocab_size=50)).eval()
    decoder = CompiledDecoder(model, max_len=4, compile=False)
    with pytest.raises(LlmkitError, match="no room"):
        decoder.prefill(torch.zeros(1, 4, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 3, dtype=torch.long))
    decoder.decode(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(LlmkitError, match="full"):
        decoder.decode(torch.zeros(1, 1, dtype=torch.long))


def test_bf16_model_keeps_an_fp32_cache():
    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", n_layer=2, vocab_size=97)).eval().to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 9))
    decoder = CompiledDecoder(model, max_len=16, compile=False)
    assert decoder.k.dtype == torch.float32
    with torch.inference_mode():
        decoder.prefill(ids[:, :8])
        got, expected = decoder.decode(ids[:, 8:]), model(ids)[0][:, -1]
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
