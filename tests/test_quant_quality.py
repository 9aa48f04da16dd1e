"""Quantization quality on a small trained model (the cheap half of benchmarks/quant_quality.py): q8_0 keeps
held-out perplexity within 0.5% of float32, and GPTQ's 4-bit blocks fit the calibration text no worse than
round-to-nearest's, layer by layer (the error GPTQ minimizes) and in perplexity."""
from __future__ import annotations

import pytest
import torch

from conftest import make_corpus, trained_tiny_model
from llmkit.compress.quantize import input_hessians, quantize_model, quantized_modules, save_quantized
from llmkit.eval.lm import perplexity
from llmkit.infer import quant
from llmkit.io.resolve import resolve_model

pytestmark = pytest.mark.skipif(not quant.available(), reason="quantized kernels need a C++ compiler")
WINDOW = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A char-level model (2 layers, 64 wide) trained for ~10 s, its calibration and held-out tokens. Trained
    less (60 steps), its block layers barely matter yet and 4-bit rounding moves perplexity by noise only."""
    root = tmp_path_factory.mktemp("quality")
    _, path = trained_tiny_model(root, steps=300, model={"n_embd": 64, "n_head": 4}, block_size=WINDOW,
                                 batch_size=8, eval_interval=0, log_interval=100, warmup_steps=5, lr_decay_steps=300)
    model, tokenizer = resolve_model(path, dtype="float32")
    text = make_corpus(root / "other.txt", n_words=1500, seed=7).read_text(encoding="utf-8")  # words unseen in order
    tokens = torch.tensor(tokenizer.encode(text))
    return path, model, tokenizer, tokens[:len(tokens) // 2], tokens[len(tokens) // 2:]


def quantized_perplexity(model, tokenizer, weights, tokens, out) -> float:
    save_quantized(out, model, tokenizer, weights)
    loaded, _ = resolve_model(out, dtype="quantized")
    return perplexity(loaded, tokens, block_size=WINDOW)["perplexity"]


def test_q8_0_is_within_half_a_percent_of_float32(trained, tmp_path):
    _, model, tokenizer, _, held_out = trained
    base = perplexity(model, held_out, block_size=WINDOW)["perplexity"]
    assert base < 0.5 * tokenizer.vocab_size  # trained: far from a uniform guess
    q8 = quantized_perplexity(model, tokenizer, quantize_model(model, "q8_0"), held_out, tmp_path / "q8")
    assert abs(q8 / base - 1) < 0.005, (q8, base)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_gptq_fits_the_calibration_text_no_worse_than_round_to_nearest(trained, tmp_path, fmt):
    _, model, tokenizer, calibration, _ = trained
    names = quantized_modules(model)
    hessians = input_hessians(model, names, calibration, WINDOW)
    rtn = quantize_model(model, fmt, "rtn")
    gptq = quantize_model(model, fmt, "gptq", calibration, WINDOW, hessians=hessians)

    def layer_error(weights, name):  # tr(E H E^T): the squared output error on the calibration inputs
        e = model.get_submodule(name).weight.detach().double() - quant.dequantize(weights[name].blocks, fmt).double()
        return float(((e @ hessians[name]) * e).sum())
    for name in names:
        assert layer_error(gptq, name) <= layer_error(rtn, name), name
    ppl = {m: quantized_perplexity(model, tokenizer, w, calibration, tmp_path / m) for m, w in
           (("rtn", rtn), ("gptq", gptq))}
    assert ppl["gptq"] <= ppl["rtn"], ppl
