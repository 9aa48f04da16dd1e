"""CPU speed-ups for inference, installed by swapping modules at load time.

    model = optimize_for_inference(model)            # generate, chat, serve, embed, eval call this

The model in llmkit/model/ is plain PyTorch. `optimize_for_inference` walks it and replaces modules
by type with subclasses that take a faster route where one applies and otherwise run the plain math:
  nn.Linear            -> CpuLinear: products of 1-4 rows (one decoding step, beam search's beams)
                          through the C++ matrix-vector kernel (it streams the weight ~1.4x faster than
                          PyTorch's, once for all the rows); bf16/fp16 products of >= 8 rows as
                          fp32 GEMMs where the CPU has no native half-precision matmul
  RMSNorm              -> CpuRMSNorm: the C++ kernel (its eight small ops cost as much as a matvec)
  CausalSelfAttention  -> CpuAttention: the C++ kernel for one query per row, batched matmuls for
                          short sequences
  Block                -> CpuBlock: one decoding step of a Llama-style block with quantized linears
                          in one C++ call (quant.decode_block): ~65 PyTorch ops fewer per layer
  encoder SelfAttention-> CpuEncoderAttention: batched matmuls for short sequences
and caches a decoder's keys/values in float32. Every route but one checks that autograd is off;
training calls `optimize_for_training` instead, which installs only CpuAttention (its short-sequence
route runs forward and backward, with dropout).

Other swaps (quantized layers) plug in through `swap_modules(model, rules)`, rules mapping a module
type to a function that returns its replacement.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.infer import kernels, quant
from llmkit.model import encoder
from llmkit.model.decoder import Block
from llmkit.model.layers import CausalSelfAttention, RMSNorm

SHORT_ATTENTION = 128  # on CPU, sequences up to this long attend through matmul_attention
HALF = (torch.bfloat16, torch.float16)
MIN_ROWS = 8  # fewer rows stay in half precision: reading half the bytes is what makes decoding fast


def swap_modules(model: nn.Module, rules: dict[type, Callable[[nn.Module], nn.Module]]) -> nn.Module:
    """Replace, depth first, every submodule whose exact type has a rule by what the rule returns."""
    for name, child in model.named_children():
        rule = rules.get(type(child))
        if rule is not None:
            new = rule(child)
            if new is not child:
                setattr(model, name, new)
            child = new
        swap_modules(child, rules)
    return model


def recast(cls: type) -> Callable[[nn.Module], nn.Module]:
    """A rule that turns a module into subclass `cls` in place: same parameters, buffers and ties."""
    def rule(module: nn.Module) -> nn.Module:
        module.__class__ = cls
        return module
    return rule


@functools.cache
def cpu_has_half_matmuls(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices natively (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    return cpu._is_amx_fp16_supported()


def half_gemm_in_float32(x: torch.Tensor) -> bool:
    """Whether F.linear on x should run upcast to fp32. Without AVX512-BF16/AMX, PyTorch's CPU bf16
    GEMM computes row by row (~16 GFLOP/s on 2 AVX2 cores against ~100 for the upcast fp32 GEMM): a
    512-token bf16 prompt took 6 s to prefill. The products and fp32 accumulation are the same."""
    return (x.dtype in HALF and x.device.type == "cpu" and x.numel() >= MIN_ROWS * x.shape[-1]
            and not torch.is_grad_enabled() and not cpu_has_half_matmuls(x.dtype))


class CpuLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.matvec_applies(x, self.weight):
            return kernels.matvec(x, self.weight, self.bias)
        if half_gemm_in_float32(x):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return super().forward(x)


class CpuRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.rms_norm_applies(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def short_cpu_sequence(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether q attends over a CPU sequence of its own length short enough for matmul_attention."""
    return q.device.type == "cpu" and q.shape[2] == k.shape[2] <= SHORT_ATTENTION


def matmul_attention(q, k, v, mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), masked) v as plain batched matmuls; mask is bool, True = may attend.

    On CPU, for short sequences, this beats SDPA's tiled flash kernel, forward and backward (2 cores,
    48 heads of 64 tokens: 0.72x its time; 128 tokens: 0.86x; 256: 1.8x, slower)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    return torch.matmul(F.dropout(weights, dropout_p) if dropout_p > 0 else weights, v)


class CpuAttention(CausalSelfAttention):
    def attend(self, q, k, v, mask, causal: bool, cache=None) -> torch.Tensor:
        T = q.shape[2]
        if T == 1 and not self.training and kernels.decode_attention_applies(q, k):
            last_slot = None if mask is None else getattr(cache, "last_slot", None)
            if mask is None or last_slot is not None:
                return kernels.decode_attention(q, k, v, last_slot)
        # without a cache only (training windows, scoring, plotting): cached prefill keeps SDPA's numerics
        if cache is None and mask is None and causal and short_cpu_sequence(q, k):
            if self.n_head != self.n_kv_head:
                k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            return matmul_attention(q, k, v, torch.ones(T, T, dtype=torch.bool, device=q.device).tril(),
                                    self.dropout if self.training else 0.0)
        return super().attend(q, k, v, mask, causal, cache)


class CpuBlock(Block):
    def forward(self, x, rope=None, cache=None, mask=None, causal=True):
        if quant.decode_block_applies(self, x, rope, cache, mask):
            return quant.decode_block(self, x, rope, cache)
        return super().forward(x, rope, cache, mask, causal)


class CpuEncoderAttention(encoder.SelfAttention):
    def attend(self, q, k, v, mask) -> torch.Tensor:
        # sentence embedding: the padding mask on the scores, ~25% faster than SDPA at T ~ 32
        if not self.training and short_cpu_sequence(q, k):
            return matmul_attention(q, k, v, mask)
        return super().attend(q, k, v, mask)


DECODER_SWAPS = {nn.Linear: recast(CpuLinear), RMSNorm: recast(CpuRMSNorm), CausalSelfAttention: recast(CpuAttention),
                 Block: recast(CpuBlock)}
ENCODER_SWAPS = {encoder.SelfAttention: recast(CpuEncoderAttention)}


def optimize_for_training(model: nn.Module) -> nn.Module:
    """The one CPU route that also pays in training: short causal windows (a char-level model's 64
    tokens) attend through plain matmuls, forward and backward (~12% of a small model's step)."""
    if next(model.parameters()).device.type != "cpu":
        return model
    return swap_modules(model, {CausalSelfAttention: recast(CpuAttention)})


def decode_layout(model: nn.Module) -> nn.Module:
    """Store every linear weight column-major (the same values, transposed in memory) where PyTorch's
    BLAS decodes batch-1 steps, i.e. fp32 CPU weights without llmkit's kernels.

    Without the kernels, BLAS streams an fp32 (out, in) matrix about 1.8x faster laid out as its
    transpose (SmolLM2-135M, 2 cores: 17 GB/s instead of 10), while CPU bf16 products are ~15x slower
    transposed, and batched decoding (the server's rows) is slower with it. Checkpoints are saved
    contiguous as before."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or kernels.available():
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # a tied lm_head shares its Parameter with the embedding
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def optimize_for_inference(model: nn.Module, *, single_row: bool = False) -> nn.Module:
    """Install the CPU routes above in `model` (in place; returns it). A no-op off the CPU.
    `single_row`: the model will decode one sequence at a time (generate, chat), see decode_layout."""
    if next(model.parameters()).device.type != "cpu":
        return model
    if getattr(model, "arch", None) == "encoder":
        return swap_modules(model, ENCODER_SWAPS)
    swap_modules(model, DECODER_SWAPS)
    if hasattr(model, "cache_dtype"):
        # CPU attention in bf16/fp16 is several times slower (0.4 ms instead of 0.15 per SmolLM2 layer
        # at 600 keys), and the cache is small next to the weights
        model.cache_dtype = torch.float32
    return decode_layout(model) if single_row else model
