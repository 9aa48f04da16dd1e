"""Quantized kernels and layers (llmkit.infer.quant) against float64 references built from gguf's own
quantizer and dequantizer, per format and per instruction-set path (each forced in turn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmkit.errors import LlmkitError
from llmkit.infer import quant

pytestmark = pytest.mark.skipif(not quant.available(), reason="quantized kernels need a C++ compiler")
FORMATS = list(quant.FORMATS)
ISAS = ["generic", "avx2", "avx512_vnni"]


def blocks_of(weight: np.ndarray, fmt: str) -> torch.Tensor:
    return torch.from_numpy(gguf_quantize(weight, GGMLQuantizationType(quant.FORMATS[fmt])))


def reference_weight(blocks: torch.Tensor, fmt: str) -> np.ndarray:
    return gguf_dequantize(blocks.numpy(), GGMLQuantizationType(quant.FORMATS[fmt])).astype(np.float64)


def int16_rows(x: np.ndarray) -> np.ndarray:
    """The activation rows as the kernels round them (per block of 32: d = max|x| / 32767, q = round(x / d))."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(-1, keepdims=True) / np.float32(32767)
    inverse = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return (np.rint(blocks * inverse) * d.astype(np.float64)).reshape(x.shape)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param not in quant.supported_isas():
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("LLMKIT_QUANT_ISA", request.param)
    yield request.param


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, quant.INTEGER_ROWS])
def test_integer_linear_matches_float64_reference(fmt, rows, isa):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((67, 96)).astype(np.float32)
    blocks, bias = blocks_of(weight, fmt), torch.randn(67)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    layer = quant.QuantLinear(quant.QuantWeight(fmt, blocks), bias)
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).double().numpy()
    w64 = reference_weight(blocks, fmt)
    # the same int16 activation rounding as the kernels: only float32 accumulation differs
    np.testing.assert_allclose(y, int16_rows(x) @ w64.T + bias.double().numpy(), rtol=1e-5, atol=1e-4)
    # and against exact activations, within what rounding them to int16 costs (1 / 65534 of a block's
    # max |x| per value): llama.cpp's int8 rounding (1 / 254) would fail this bound
    exact = x.astype(np.float64) @ w64.T + bias.double().numpy()
    bound = 1e-4 * np.abs(x).astype(np.float64) @ np.abs(w64).T + 1e-4
    assert (np.abs(y - exact) <= bound).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_computed_in_a_group_of_four_equals_it_computed_alone(fmt, isa):
    rng = np.random.default_rng(3)
    blocks = blocks_of(rng.standard_normal((67, 96)).astype(np.float32), fmt)
    x = torch.from_numpy(rng.standard_normal((2, 96)).astype(np.float32))
    with torch.no_grad():
        together = quant.QuantLinear(quant.QuantWeight(fmt, blocks))(x)
        for r in range(67):
            alone = quant.QuantLinear(quant.QuantWeight(fmt, blocks[r:r + 1]))(x)
            assert torch.equal(alone[:, 0], together[:, r]), r


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_rows_use_dequantized_tiles(fmt, isa, monkeypatch):
    monkeypatch.setattr(quant, "TILE_VALUES", 96 * 16)  # several tiles for 67 rows
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((67, 96)).astype(np.float32)
    blocks = blocks_of(weight, fmt)
    x = rng.standard_normal((2, 9, 96)).astype(np.float32)
    with torch.no_grad():
        y = quant.QuantLinear(quant.QuantWeight(fmt, blocks))(torch.from_numpy(x))
    assert y.shape == (2, 9, 67)
    np.testing.assert_allclose(y.double().numpy(), x.astype(np.float64) @ reference_weight(blocks, fmt).T,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_and_embedding_are_exact(fmt, isa):
    rng = np.random.default_rng(2)
    blocks = blocks_of(rng.standard_normal((50, 64)).astype(np.float32) * 3, fmt)
    expected = reference_weight(blocks, fmt).astype(np.float32)
    assert torch.equal(quant.dequantize(blocks, fmt), torch.from_numpy(expected))
    assert torch.equal(quant.dequantize(blocks, fmt, 7, 5), torch.from_numpy(expected[7:12]))
    ids = torch.tensor([[3, 49, 0], [3, 3, 11]])
    rows = quant.QuantEmbedding(quant.QuantWeight(fmt, blocks))(ids)
    assert torch.equal(rows, torch.from_numpy(expected)[ids])


def test_forced_isa_this_cpu_lacks_is_one_clear_error(monkeypatch):
    missing = [name for name in ISAS if name not in quant.supported_isas()]
    monkeypatch.setenv("LLMKIT_QUANT_ISA", missing[0] if missing else "no-such-isa")
    with pytest.raises(LlmkitError, match="LLMKIT_QUANT_ISA"):
        quant.isa()


def test_bad_blocks_and_shapes_are_clear_errors():
    with pytest.raises(LlmkitError, match="unsupported quantization format 'q6_k'"):
        quant.QuantWeight("q6_k", torch.zeros(2, 34, dtype=torch.uint8))
    with pytest.raises(LlmkitError, match="blocks of 32"):
        quant.check_blockable("fc.weight", (16, 40))
    model = torch.nn.Sequential(torch.nn.Linear(64, 4))
    with pytest.raises(LlmkitError, match=r"shape \(4, 32\)"):
        quant.quantize_linears(model, {"0": quant.QuantWeight("q8_0", torch.zeros(4, 34, dtype=torch.uint8))})
