"""The fused decoding step (llmkit_quant::decode_block, installed by optimize_for_inference as CpuBlock):
one token of one row through a quantized Llama-style block in one call must give what the block's own
modules give (the same kernels, op by op), step after step, and must stay out of every other case."""
from __future__ import annotations

import copy

import pytest
import torch

from llmkit.compress.quantize import rtn_blocks
from llmkit.infer import quant
from llmkit.infer.cpu import optimize_for_inference
from llmkit.model.config import ModelConfig
from llmkit.model.decoder import GPT

pytestmark = pytest.mark.skipif(not quant.available() or "avx2" not in quant.supported_isas(),
                                reason="the fused step needs the quantized kernels on an AVX2 CPU")


def quantized_model(fmt: str, qkv_bias: bool = False) -> GPT:
    """A small GQA model (4 query heads over 2 key/value heads of 16) with its linears in blocks."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         intermediate_size=96, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                         qkv_bias=qkv_bias, tie_embeddings=False)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # peaked logits: greedy choices far from ties
    weights = {name: quant.QuantWeight(fmt, rtn_blocks(m.weight, fmt)) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")}
    return optimize_for_inference(quant.quantize_linears(model, weights).requires_grad_(False))


def unfused(model: GPT) -> GPT:
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block._fused = None  # decode_block_applies: not a block it runs
    return twin


def decode(model: GPT, prompt: list[int], steps: int):
    """Greedy steps after a prompt: every step's logits, and the cache."""
    cache = model.new_cache(1, len(prompt) + steps + 1)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[0][:, -1]
        out = [logits]
        for _ in range(steps):
            logits = model(logits.argmax(-1, keepdim=True), cache=cache, last_only=True)[0][:, -1]
            out.append(logits)
    return torch.cat(out), cache


@pytest.mark.parametrize("fmt,qkv_bias", [("q4_1", False), ("q4_0", True), ("q8_0", False)])
def test_fused_step_equals_the_blocks_own_modules(fmt, qkv_bias, monkeypatch):
    model = quantized_model(fmt, qkv_bias)
    calls = []
    real = quant.decode_block
    monkeypatch.setattr(quant, "decode_block", lambda *a: calls.append(1) or real(*a))
    # 13 prompt tokens: the steps attend over 14..25 keys, through attend_one's 8-key groups and its tail
    fused_logits, fused_cache = decode(model, list(range(3, 16)), steps=12)
    assert len(calls) == 12 * 2  # every step, every layer
    calls.clear()
    plain_logits, plain_cache = decode(unfused(model), list(range(3, 16)), steps=12)
    assert not calls
    assert torch.equal(fused_logits.argmax(-1), plain_logits.argmax(-1))
    # Bit-identical on this machine's build; the bound leaves room for one SiLU rounding (std::exp in
    # the step, PyTorch's vectorised exp in the module) flipping an int16 activation (~1e-4 of the
    # scale), where a wrong head, position or rotation would be off by ~1e-1.
    scale = plain_logits.abs().max().item()
    torch.testing.assert_close(fused_logits, plain_logits, rtol=0, atol=2e-4 * scale)
    for a, b in zip(fused_cache.k + fused_cache.v, plain_cache.k + plain_cache.v):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4 * b.abs().max().item())


def test_fused_step_stays_out_of_every_other_case(monkeypatch):
    model = quantized_model("q4_1")
    block, x = model.blocks[0], torch.randn(1, 1, 64)
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache=cache)
        cache.begin(1, 1)
        layer, rope = cache.layer(0), model.rope(1, 3)
        assert quant.decode_block_applies(block, x, rope, layer, None)
        assert not quant.decode_block_applies(block, x.bfloat16(), rope, layer, None)   # not float32
        assert not quant.decode_block_applies(block, x.expand(1, 2, 64), rope, layer, None)  # two tokens
        assert not quant.decode_block_applies(block, x, rope, None, None)                # no cache
        cache.begin(2, 1)  # two rows at once: the server's batched steps keep the modules
        assert not quant.decode_block_applies(block, x.expand(2, 1, 64), rope, cache.layer(0), None)
        monkeypatch.setenv("LLMKIT_QUANT_ISA", "generic")  # the plain C++ path stays testable
        assert not quant.decode_block_applies(block, x, rope, layer, None)
    assert not quant.decode_block_applies(block, x, rope, layer, None)  # autograd on: training
    float_model = optimize_for_inference(GPT(model.config).eval())      # float linears
    with torch.no_grad():
        assert not quant.decode_block_applies(float_model.blocks[0], x, rope, layer, None)
