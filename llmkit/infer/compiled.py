"""Fast decoding for inference: a static KV cache and a torch.compile'd transformer block.

Decoding one token reads every weight once, so on a CPU its time is (a) memory traffic (SmolLM2-135M
in fp32: 540 MB per token) plus (b) per-op overhead: the eager model runs ~40 small ops per layer
(norm statistics, RoPE halves, cache writes, activations), each a dispatch and, with several threads,
an OpenMP fork/join. `CompiledDecoder` removes most of (b):
  - keys/values live in fixed-size buffers and unwritten slots are masked, so every decode step has
    the same shapes and one compiled graph serves the whole generation;
  - one transformer block is compiled (inductor fuses the norms, RoPE, SiLU*up and residual adds into
    a few C++ loops around the matmuls) and reused for every layer: the blocks differ only in their
    weights, which the compiled graph takes as inputs, so compile time is that of one block.
It calls the model's own modules (norms, projections, MLP), so its logits are the model's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.infer import kernels
from llmkit.errors import LlmkitError
from llmkit.model.layers import apply_rotary, half_matmuls_in_float32


def block_step(block, x, k_cache, v_cache, cos, sin, positions, mask):
    """One pre-norm block on x (B, T, C) whose tokens sit at `positions` (T,): writes their keys and
    values into the (B, K, max_len, D) caches and attends over every slot `mask` (T, max_len) allows."""
    attn = block.attn
    B, T, _ = x.shape
    H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(block.attn_norm(x)).split((H * D, K * D, K * D), dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, K, D).transpose(1, 2)
    v = v.view(B, T, K, D).transpose(1, 2)
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache.index_copy_(2, positions, k.to(k_cache.dtype))
    v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
    q = q.to(k_cache.dtype)
    if T == 1 and kernels.decode_attention_applies(q, k_cache):
        y = kernels.decode_attention(q, k_cache, v_cache, positions)  # slots 0..positions[0]
    else:
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=H != K)
    y = y.to(x.dtype)
    x = x + attn.proj(y.transpose(1, 2).reshape(B, T, H * D))
    return x + block.mlp(block.mlp_norm(x))


def decode_layout(model):
    """Store every linear weight column-major (the same values, transposed in memory) where PyTorch's
    BLAS decodes batch-1 steps; returns `model`.

    A one-token decode step is a matrix-vector product per weight, bound by reading the weights.
    llmkit's own kernel (llmkit.infer.kernels) wants them row-major, as they are; without it, BLAS streams an
    fp32 (out, in) matrix about 1.8x faster laid out as its transpose (SmolLM2-135M, 2 cores: 17 GB/s
    instead of 10), while CPU bf16 products are ~15x slower transposed. Batched decoding (the server's
    16 rows) is slower with it, so only batch-1 paths (generate, chat) use it. A no-op off the CPU;
    checkpoints are saved contiguous as before.
    """
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or kernels.available():
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # a tied lm_head shares its Parameter with the embedding
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


_compiled_block_step = None


def compiled_block_step():
    """block_step through torch.compile, built once per process and shared by every decoder."""
    global _compiled_block_step
    if _compiled_block_step is None:
        _compiled_block_step = torch.compile(block_step, dynamic=False, fullgraph=True)
    return _compiled_block_step


class CompiledDecoder(nn.Module):
    """Prefill + one-token decode steps for `batch_size` rows of up to `max_len` tokens.

        dec = CompiledDecoder(model, max_len=600)
        logits = dec.prefill(prompt_ids)          # (B, T) ids -> (B, V) logits after the prompt
        logits = dec.decode(next_ids)             # (B, 1) ids -> (B, V) logits

    Rows advance in lockstep (no padding: batch-1 chat and benchmarks are the use). The prefill runs
    eagerly (prompt lengths vary); decode steps run the compiled block unless compile=False.
    """

    def __init__(self, model, max_len: int, batch_size: int = 1, compile: bool = True):
        super().__init__()
        cfg = model.config
        if cfg.pos == "sinusoidal" or model.training:
            raise LlmkitError("CompiledDecoder needs a model in eval mode with learned or rotary positions")
        self.model, self.max_len, self.pos = model, max_len, 0
        weight = model.embed.weight
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        # Zeros, not empty: masked slots still meet V in the weighted sum, and 0 * NaN would be NaN.
        cache_dtype = model.kv_dtype()
        self.register_buffer("k", torch.zeros(shape, dtype=cache_dtype, device=weight.device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=cache_dtype, device=weight.device), persistent=False)
        self._slots = torch.arange(max_len, device=weight.device)
        self._step = compiled_block_step() if compile else block_step
        self._warm = not compile

    def _forward(self, idx, positions, step):
        m = self.model
        x = m.embed(idx)
        if m.pos_embed is not None:
            x = x + m.pos_embed(positions)
        cos = sin = None
        if m.rope is not None:
            m.rope(1, int(positions[-1]))  # grows the tables if needed
            cos, sin = m.rope.cos[positions].to(x.dtype), m.rope.sin[positions].to(x.dtype)
        mask = self._slots <= positions[:, None]  # (T, max_len): causal, and unwritten slots hidden
        for i, block in enumerate(m.blocks):
            x = step(block, x, self.k[i], self.v[i], cos, sin, positions, mask)
        return m.lm_head(m.final_norm(x[:, -1]))

    @torch.inference_mode()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Start over with prompt ids (B, T); return the logits after its last token."""
        T = idx.shape[1]
        if T >= self.max_len:
            raise LlmkitError(f"a prompt of {T} tokens leaves no room in a cache of {self.max_len}")
        self.pos = T
        with half_matmuls_in_float32(self.model.embed.weight, idx.numel()):
            return self._forward(idx, torch.arange(T, device=idx.device), block_step)

    @torch.inference_mode()
    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """Append one token per row (idx (B, 1)); return the logits after it."""
        if self.pos >= self.max_len:
            raise LlmkitError(f"the cache of {self.max_len} tokens is full")
        positions = self._slots[self.pos:self.pos + 1]
        self.pos += 1
        if not self._warm:  # the first step compiles and checks every guard
            self._warm = True
            return self._forward(idx, positions, self._step)
        # Later steps have the same shapes and dtypes, so one compiled graph is all there is; checking
        # its guards (every weight's metadata, for every layer) would cost ~0.25 ms per layer.
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self._forward(idx, positions, self._step)
