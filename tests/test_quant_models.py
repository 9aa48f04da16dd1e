"""Quantized models end to end: `llmkit quantize` (RTN, GPTQ), GGUF export read back by transformers
and by llmkit (bit-identical blocks), quantized GGUF loading, and the bad inputs of all three."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from conftest import add_gguf_value  # noqa: E402
from llmkit.io.checkpoint import save_checkpoint  # noqa: E402
from llmkit.compress.quantize import gptq_blocks, quantize_command, rtn_blocks  # noqa: E402
from llmkit.model.config import ModelConfig  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.infer import quant  # noqa: E402
from llmkit.infer.quant import QuantLinear  # noqa: E402
from llmkit.io.gguf import GGUFFile  # noqa: E402
from llmkit.io.gguf_blocks import load_gguf_quantized  # noqa: E402
from llmkit.io.gguf_write import save_gguf  # noqa: E402
from llmkit.model.decoder import GPT  # noqa: E402
from llmkit.io.resolve import convert, resolve_model  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not quant.available(), reason="quantized kernels need a C++ compiler")
TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small Llama-style llmkit model with peaked logits (so greedy ties are unlikely), saved."""
    tokenizer = Tokenizer.train_bpe([TEXT], vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=64, intermediate_size=128, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                         tie_embeddings=True)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_checkpoint(path, model, tokenizer)
    return path, model, tokenizer


def greedy(model, ids, n=12):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_gguf_export_loads_in_transformers_with_the_same_greedy_text(tiny, tmp_path, kind):
    path, _, tokenizer = tiny
    out = convert(path, tmp_path / "m.gguf", to="gguf", gguf_type=kind)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours, _ = resolve_model(out, dtype="float32")  # the same weights, as transformers expands them
    prompt = tokenizer.encode("the quick brown")
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
    assert greedy(ours, prompt) == expected
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert ref_tok.encode("the lazy dog sleeps", add_special_tokens=False) == tokenizer.encode("the lazy dog sleeps")


def test_gguf_round_trip_keeps_every_block(tiny, tmp_path):
    path, model, tokenizer = tiny
    first = convert(path, tmp_path / "a.gguf", to="gguf", gguf_type="q4_1")
    loaded, tok = load_gguf_quantized(first)
    assert isinstance(loaded.blocks[0].mlp.gate_up, QuantLinear) and loaded.blocks[0].mlp.gate_up.format == "q4_1"
    second = save_gguf(loaded, tok, tmp_path / "b.gguf", "q4_1")
    a, b = GGUFFile(first), GGUFFile(second)
    assert a.tensors.keys() == b.tensors.keys()
    for name, info in a.tensors.items():
        other = b.tensors[name]
        assert info.qtype == other.qtype and info.shape == other.shape
        assert a._buf[info.offset:info.offset + info.nbytes] == b._buf[other.offset:other.offset + other.nbytes], name
    # the blocks llmkit holds are gguf's RTN blocks of the float weights (q/k rows unpermuted)
    assert torch.equal(loaded.blocks[1].mlp.proj.blocks, rtn_blocks(model.blocks[1].mlp.proj.weight, "q4_1"))


def test_quantize_command_rtn_and_gptq(tiny, tmp_path):
    path, model, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    rtn = quantize_command(path, tmp_path / "rtn", "q4_1", "rtn", text)
    q8 = quantize_command(path, tmp_path / "q8", "q8_0", "rtn", text)
    assert abs(q8["perplexity_after"] / q8["perplexity_before"] - 1) < 0.01
    assert rtn["perplexity_before"] == q8["perplexity_before"]
    loaded, _ = resolve_model(tmp_path / "rtn", dtype="quantized")
    assert loaded.blocks[0].attn.qkv.format == "q4_1" and loaded.embed.format == "q8_0"
    expanded, _ = resolve_model(tmp_path / "rtn", dtype="float32")
    assert torch.equal(expanded.blocks[0].attn.qkv.weight, loaded.blocks[0].attn.qkv.dequantized())
    gptq = quantize_command(path, tmp_path / "gptq", "q4_1", "gptq", text)
    assert gptq["tokens"] == rtn["tokens"]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(fmt):
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((64, 64))
    x = torch.from_numpy(rng.standard_normal((512, 64)) @ mix)   # correlated input channels
    w = torch.randn(48, 64)
    hessian = x.T @ x

    def error(blocks):
        deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(quant.FORMATS[fmt])))
        return float((x @ (w.double() - deq.double()).T).norm())
    assert error(gptq_blocks(w, hessian, fmt)) < 0.9 * error(rtn_blocks(w, fmt))


def test_bad_inputs_are_one_clear_line(tiny, tmp_path):
    path, model, tokenizer = tiny
    out = convert(path, tmp_path / "f.gguf", to="gguf", gguf_type="f32")
    # an unsupported quant type: rewrite one layer's weight as Q5_0
    g = GGUFFile(out)
    writer = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), "llama")
    for key, value in g.meta.items():
        if key.startswith("general.architecture") or key.startswith("GGUF."):
            continue
        add_gguf_value(writer, key, value)
    for name in g.tensors:
        tensor = g.tensor(name).numpy()
        if name == "blk.0.ffn_down.weight":
            writer.add_tensor(name, gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q5_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q5_0)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(LlmkitError, match=r"blk.0.ffn_down.weight is Q5_0.*--dtype float32"):
        resolve_model(tmp_path / "q5.gguf", dtype="quantized")
    assert resolve_model(tmp_path / "q5.gguf", dtype="float32")[0] is not None  # expanding still works
    # as stored (the default), a file with a type the kernels lack loads expanded
    assert not any(isinstance(m, QuantLinear) for m in resolve_model(tmp_path / "q5.gguf")[0].modules())
    # a truncated tensor
    data = (tmp_path / "f.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(LlmkitError, match="truncated"):
        resolve_model(tmp_path / "cut.gguf", dtype="quantized")
    # a model too small for blocks of 32
    small = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=48, intermediate_size=96,
                            norm="rmsnorm", mlp="swiglu", pos="rope", bias=False))
    save_checkpoint(tmp_path / "small", small, tokenizer)
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(LlmkitError, match="rows of 48 values cannot be quantized in blocks of 32"):
        quantize_command(tmp_path / "small", tmp_path / "q", "q4_0", "rtn", tmp_path / "t.txt")
    with pytest.raises(LlmkitError, match="unsupported quantization format 'q6_k'"):
        quantize_command(path, tmp_path / "q", "q6_k", "rtn", tmp_path / "t.txt")
    with pytest.raises(LlmkitError, match="unsupported GGUF tensor type 'q5_k'"):
        convert(path, tmp_path / "x.gguf", to="gguf", gguf_type="q5_k")
    assert not (tmp_path / "q").exists() and not (tmp_path / "x.gguf").exists()


def test_smollm2_kept_in_blocks_answers_as_float32_does():
    """The GGUF's own blocks (Q4_1 layers, Q8_0 embedding and LM head) decode with the float32 model's
    greedy text. With llama.cpp's int8 activations both answers below changed ("L'Étoile, la Marseur, ...")."""
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.infer.generate import generate

    ours, tok = resolve_model("smollm2-135m-instruct")  # as stored: the default keeps the blocks
    assert isinstance(ours.blocks[0].mlp.gate_up, QuantLinear) and ours.lm_head.format == "q8_0"
    ref, _ = resolve_model("smollm2-135m-instruct", dtype="float32")
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    for question in ["What is the capital of France?", "What is 12 times 7?"]:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}])
        answers = [generate(optimize_for_inference(m, single_row=True), tok, prompt, max_new_tokens=14, temperature=0)
                   for m in (ours, ref)]
        assert answers[0] == answers[1], answers
