"""llmkit.infer.kernels: the CPU decoding kernels against PyTorch's own ops, and the swapped-in model paths that take them."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmkit.infer import kernels
from llmkit.model.config import preset
from llmkit.infer.cpu import optimize_for_inference
from llmkit.model.decoder import GPT

pytestmark = pytest.mark.skipif(not kernels.available(), reason="llmkit's CPU kernels need AVX2 and a C++ compiler")


@pytest.fixture
def two_threads():
    """The kernels split rows or heads between threads; the suite otherwise runs one per worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_features, in_features", [(3000, 64), (960, 576), (7, 13), (100, 43)])
def test_matvec_equals_linear(dtype, out_features, in_features, two_threads):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    x = torch.randn(1, 1, 2 * in_features).to(dtype)[..., ::2]  # a strided row is read as it lies
    with torch.no_grad():
        for b in (None, bias):
            exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
            got = kernels.matvec(x, weight, b)
            assert got.shape == (1, 1, out_features) and got.dtype == dtype
            # fp32 accumulation (in its own order, as BLAS has its own), then one rounding to dtype
            tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
            torch.testing.assert_close(got.double(), exact, rtol=tolerance, atol=1e-4)


@pytest.mark.parametrize("rows", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_of_a_few_rows_is_each_row_alone(rows, dtype, two_threads):
    """Beam search's beams (and a server's few rows) share one pass over the weights; every row's
    result is bit for bit what it gives alone, and F.linear's up to the accumulation order."""
    torch.manual_seed(0)
    weight, bias = torch.randn(960, 576).to(dtype), torch.randn(960).to(dtype)
    x = torch.randn(rows, 1, 576).to(dtype)  # (beams, one new token, features)
    with torch.no_grad():
        got = kernels.matvec(x, weight, bias)
        assert got.shape == (rows, 1, 960) and kernels.matvec_applies(x, weight)
        for r in range(rows):
            assert torch.equal(got[r], kernels.matvec(x[r].clone(), weight, bias))
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(got.double(), F.linear(x.double(), weight.double(), bias.double()),
                                   rtol=tolerance, atol=1e-4)
        assert not kernels.matvec_applies(torch.randn(kernels.MATVEC_ROWS + 1, 576).to(dtype), weight)


@pytest.mark.parametrize("B, H, K, D, S", [(2, 9, 3, 64, 20), (1, 4, 4, 16, 5), (1, 8, 2, 128, 603),
                                           (3, 6, 6, 64, 1), (1, 2, 1, 80, 77), (1, 12, 4, 96, 9),
                                           (2, 9, 3, 64, 256), (1, 4, 2, 32, 129)])
def test_decode_attention_equals_sdpa(B, H, K, D, S, two_threads):
    torch.manual_seed(0)
    q = torch.randn(B, H, 1, D) * 3   # scores spread over tens: the softmax's exp is exercised widely
    k_cache, v_cache = torch.randn(B, K, S + 7, D) * 3, torch.randn(B, K, S + 7, D)
    expected = F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], enable_gqa=H != K)
    with torch.no_grad():
        torch.testing.assert_close(kernels.decode_attention(q, k_cache[:, :, :S], v_cache[:, :, :S]), expected)
        # the same over a preallocated cache whose slots past last_slot hold garbage
        last_slot = torch.tensor([S - 1])
        torch.testing.assert_close(kernels.decode_attention(q, k_cache, v_cache, last_slot), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_equals_the_module(dtype, two_threads):
    from llmkit.infer.cpu import CpuRMSNorm

    torch.manual_seed(0)
    norm = CpuRMSNorm(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    for shape in [(1, 1, 576), (3, 150, 576)]:   # one decode row; a batch of prompts across threads
        x = (torch.randn(shape) * 5).to(dtype)
        expected = norm(x)  # gradients enabled: the module's own PyTorch ops
        with torch.no_grad():
            got = kernels.rms_norm(x, norm.weight, norm.eps)
            assert torch.equal(norm(x), got)  # the swapped module takes the kernel at inference
        # the mean of squares summed in another order: at most one rounding of the output apart
        torch.testing.assert_close(got, expected)


def count_calls(monkeypatch, name):
    calls = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *args: calls.append(1) or real(*args))
    return calls


@pytest.mark.parametrize("name", ["gpt2-124m", "llama-tiny"])
def test_decoding_with_kernels_matches_pytorch(name, monkeypatch):
    """Greedy batch-1 decoding takes both kernels at every step and gives PyTorch's logits; prompts
    (many rows) and training (gradients) keep PyTorch's ops."""
    torch.manual_seed(0)
    model = GPT(preset(name, n_layer=2, n_head=4, n_kv_head=2 if name == "llama-tiny" else 4, n_embd=64,
                       vocab_size=97, block_size=64)).eval()
    optimize_for_inference(model)
    matvecs, attentions = count_calls(monkeypatch, "matvec"), count_calls(monkeypatch, "decode_attention")
    ids = torch.randint(0, 97, (1, 12))

    def decode():
        with torch.inference_mode():
            cache = model.new_cache(1, 16)
            steps = [model(ids[:, :8], cache=cache)[0][:, -1]]
            steps += [model(ids[:, t:t + 1], cache=cache)[0][:, -1] for t in range(8, 12)]
        return torch.stack(steps)

    got = decode()
    assert len(attentions) == 4 * 2 and len(matvecs) == 4 * (2 * 4 + 1)  # 4 linears per layer + head
    monkeypatch.setitem(kernels._state, "loaded", False)
    torch.testing.assert_close(got, decode(), atol=1e-5, rtol=1e-5)
    monkeypatch.setitem(kernels._state, "loaded", True)
    model.train()
    model(ids[:, :1], targets=ids[:, 1:2])[1].backward()
    assert len(matvecs) == 4 * (2 * 4 + 1) and len(attentions) == 4 * 2


def test_without_a_compiler_pytorch_decodes(tmp_path):
    """A failed build warns once and leaves PyTorch's kernels in place."""
    code = """
import warnings, torch
from llmkit.infer import kernels
from llmkit.model.config import preset
from llmkit.infer.cpu import optimize_for_inference
from llmkit.model.decoder import GPT
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = optimize_for_inference(GPT(preset("llama-tiny", n_layer=1, vocab_size=50)).eval())
    with torch.inference_mode():
        cache = model.new_cache(1, 4)
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
print(kernels.available(), [str(w.message) for w in caught])
"""
    env = {**os.environ, "CXX": "false", "LLMKIT_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("False") and out.count("could not be built") == 1
    assert not list(tmp_path.rglob("*.so"))
